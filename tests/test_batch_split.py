"""Cutting a batch into forward passes of similar prompt lengths (no model needed)."""

from __future__ import annotations

import itertools

import pytest

from pytest_mtserve.server.architecture import ModelArchitecture
from pytest_mtserve.server.batch_split import ForwardCost, split_by_length

SMOLLM2 = ModelArchitecture(
    num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
    kv_channels=64, vocab_size=49152, padded_vocab_size=49152, seq_length=8192,
)  # fmt: skip
CPU, GPU = ForwardCost.for_model(SMOLLM2, "cpu"), ForwardCost.for_model(SMOLLM2, "cuda")
# Five-shot MMLU prompts of one demo batch on the CPU: this batch took 270 s as one pass.
MMLU_BATCH = [826, 848, 1077, 1180, 1293, 1732, 2207, 2724]


def total_cost(groups: list[range], lengths: list[int], new_tokens: list[int], cost: ForwardCost) -> float:
    return sum(cost.of_group(len(g), lengths[g[-1]], max(max(new_tokens[i] for i in g) - 1, 0)) for g in groups)


def every_split(count: int):
    for cuts in itertools.product((False, True), repeat=count - 1):
        bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), count]
        yield [range(a, b) for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("cost", [CPU, GPU], ids=["cpu", "cuda"])
@pytest.mark.parametrize("new_tokens", [1, 2, 40])
def test_the_split_is_the_cheapest_of_all_consecutive_splits(cost, new_tokens) -> None:
    tokens = [new_tokens] * len(MMLU_BATCH)
    groups = split_by_length(MMLU_BATCH, tokens, cost)
    assert [i for g in groups for i in g] == list(range(len(MMLU_BATCH)))
    cheapest = min(total_cost(split, MMLU_BATCH, tokens, cost) for split in every_split(len(MMLU_BATCH)))
    assert total_cost(groups, MMLU_BATCH, tokens, cost) == pytest.approx(cheapest)


def test_a_long_tail_is_cut_off_on_the_cpu_and_similar_lengths_stay_together() -> None:
    groups = split_by_length(MMLU_BATCH, [2] * 8, CPU)
    assert len(groups) > 1 and groups[-1] == range(7, 8)  # the 2,724-token prompt alone
    assert split_by_length([500, 510, 520, 530], [2] * 4, CPU) == [range(0, 4)]


def test_a_gpu_pass_costs_more_so_it_cuts_less() -> None:
    assert len(split_by_length(MMLU_BATCH, [2] * 8, GPU)) < len(split_by_length(MMLU_BATCH, [2] * 8, CPU))
    assert split_by_length([60, 80, 120, 200], [1] * 4, GPU) == [range(0, 4)]


def test_long_generations_keep_rows_together() -> None:
    """Every extra group pays its own decode steps."""
    assert len(split_by_length([100, 400], [256, 256], CPU)) < len(split_by_length([100, 400], [1, 1], CPU))


def test_rows_must_come_sorted_by_length() -> None:
    with pytest.raises(ValueError, match="sorted"):
        split_by_length([5, 3], [1, 1], CPU)
