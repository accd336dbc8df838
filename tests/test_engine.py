"""The engine on the tiny model, in this process (TP1, CPU, float32)."""

from __future__ import annotations


import pytest
import torch

from pytest_mtserve.server.work import SamplingParams, WorkItem

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def make_engine(local_model, server_tokenizer):
    from pytest_mtserve.server.engine import InferenceEngine

    def make(eos_token_ids: set[int] | None = None, group_by_length: bool = True, share_prefixes: bool = True) -> InferenceEngine:
        return InferenceEngine(
            local_model.runner,
            is_leader=True,
            share_tokens=lambda tokens: tokens,
            eos_token_ids={server_tokenizer.eos_token_id} if eos_token_ids is None else eos_token_ids,
            detokenizer=server_tokenizer,
            group_by_length=group_by_length,
            share_prefixes=share_prefixes,
        )

    return make


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    texts = ["Question: What color is the sky?\nAnswer: blue", "Hello", "The capital of France is Paris, and the capital of Italy is"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def reference_logprobs(local_model, tokens: list[int]) -> list[float]:
    """log p(token_i | tokens_<i) from one plain full forward pass."""
    logits = local_model.logits(torch.tensor([tokens]))[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i - 1, tokens[i]]) for i in range(1, len(tokens))]


def assert_close(left: list[float], right: list[float]) -> None:
    assert len(left) == len(right)
    assert max((abs(a - b) for a, b in zip(left, right)), default=0.0) <= TOLERANCE


def count_passes(model, work) -> int:
    passes: list[int] = []
    handle = model.embedding.register_forward_hook(lambda *args: passes.append(1))  # every pass, packed or not
    try:
        work()
    finally:
        handle.remove()
    return len(passes)


def test_echo_returns_the_models_log_probs_for_every_prompt_token(make_engine, local_model, prompts) -> None:
    result = make_engine().run([WorkItem(prompts[0], max_tokens=0, logprobs=3, echo=True)])[0]
    assert result.output_tokens == []
    assert result.prompt_logprobs[0] is None and result.prompt_top_logprobs[0] is None
    assert_close(result.prompt_logprobs[1:], reference_logprobs(local_model, prompts[0]))
    for position, top in enumerate(result.prompt_top_logprobs[1:]):
        assert len(top) == 3
        assert max(top.values()) >= result.prompt_logprobs[position + 1] - TOLERANCE


def test_kv_cached_generation_matches_a_full_forward(make_engine, local_model, prompts) -> None:
    result = make_engine(eos_token_ids=set()).run([WorkItem(prompts[2], max_tokens=6, logprobs=1)])[0]
    assert len(result.output_tokens) == 6 and result.finish_reason == "length"
    full = reference_logprobs(local_model, prompts[2] + result.output_tokens)
    assert_close(result.output_logprobs, full[len(prompts[2]) - 1 :])
    greedy = [max(top, key=top.get) for top in result.output_top_logprobs]
    assert greedy == result.output_tokens


def test_prefill_of_last_positions_only_equals_the_full_prefill_there(local_model, prompts) -> None:
    full = local_model.runner.prefill(prompts)
    last = local_model.runner.prefill(prompts, last_positions_only=True)
    assert last.shape == (len(prompts), 1, full.shape[-1])
    for row, prompt in enumerate(prompts):  # mixed lengths: each row's own last token
        torch.testing.assert_close(last[row, 0], full[row, len(prompt) - 1], atol=1e-5, rtol=0)


def test_a_request_gets_the_same_result_alone_or_in_a_mixed_batch(make_engine, prompts) -> None:
    engine = make_engine(eos_token_ids=set())
    items = [
        WorkItem(prompts[0], max_tokens=1, logprobs=1, echo=True),
        WorkItem(prompts[1], max_tokens=5, sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=11), logprobs=2),
        WorkItem(prompts[2], max_tokens=4, sampling=SamplingParams(temperature=0.7, top_k=20, seed=5), logprobs=0, echo=True),
        WorkItem(prompts[1], max_tokens=3, logprobs=1),
    ]
    batched = engine.run(items)
    for item, together in zip(items, batched):
        alone = engine.run([item])[0]
        assert together.output_tokens == alone.output_tokens
        assert_close(together.output_logprobs, alone.output_logprobs)
        assert_close((together.prompt_logprobs or [None])[1:], (alone.prompt_logprobs or [None])[1:])


def test_rows_of_different_lengths_decode_in_one_forward_pass_per_step(make_engine, local_model, prompts) -> None:
    """One pass per step for the batch, not one per distinct prompt length (on a GPU, a
    5-shot MMLU batch of 32 distinct lengths otherwise costs 32 small passes per token)."""
    assert len({len(p) for p in prompts}) == len(prompts)
    engine, results = make_engine(eos_token_ids=set(), group_by_length=False), []
    passes = count_passes(local_model.runner.model, lambda: results.extend(engine.run([WorkItem(p, max_tokens=4) for p in prompts])))
    assert [len(r.output_tokens) for r in results] == [4, 4, 4]
    assert passes == 1 + 3  # the prefill, then three decode steps


def test_very_different_prompt_lengths_run_as_groups_with_unchanged_results(make_engine, local_model, prompts) -> None:
    long_prompt = (prompts[2] * 40)[:400]
    items = [
        WorkItem(prompts[1], max_tokens=3, logprobs=1),
        WorkItem(long_prompt, max_tokens=2, logprobs=2, echo=True),
        WorkItem(prompts[0], max_tokens=1, logprobs=1, echo=True),
    ]
    grouped, padded = make_engine(eos_token_ids=set()), make_engine(eos_token_ids=set(), group_by_length=False)
    results = {}
    passes = {name: count_passes(local_model.runner.model, lambda: results.setdefault(name, engine.run(items)))
              for name, engine in (("grouped", grouped), ("padded", padded))}  # fmt: skip
    assert passes["grouped"] > passes["padded"]  # the 400-token prompt ran apart from the short ones
    for apart, together in zip(results["grouped"], results["padded"]):
        assert apart.output_tokens == together.output_tokens
        assert_close(apart.output_logprobs, together.output_logprobs)
        assert_close((apart.prompt_logprobs or [None])[1:], (together.prompt_logprobs or [None])[1:])


def test_choices_sharing_a_context_are_scored_in_one_packed_row_as_they_are_alone(make_engine, local_model, prompts) -> None:
    """lm-eval scores a question's context once per answer choice: packed, the context runs
    once, and each choice still gets exactly its own log-probs (this fails if a choice could
    see another's tokens, or ran at its slot in the pack instead of its own positions)."""
    context = prompts[2]
    choices = [context + prompts[1], context + prompts[0][:4], context + prompts[0][5:7], context + prompts[1][:1]]
    items = [WorkItem(choice, max_tokens=1, logprobs=2, echo=True) for choice in choices]
    engine, widths = make_engine(eos_token_ids=set()), []
    handle = local_model.runner.model.embedding.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        packed = engine.run(items)
    finally:
        handle.remove()
    assert widths == [torch.Size([1, sum(len(c) for c in choices) - 3 * len(context)])]  # the context once
    for item, together in zip(items, packed):
        alone = make_engine(eos_token_ids=set()).run([item])[0]
        assert_close(together.prompt_logprobs[1:], reference_logprobs(local_model, item.prompt_tokens))
        assert_close(together.prompt_logprobs[1:], alone.prompt_logprobs[1:])
        assert [list(top) for top in together.prompt_top_logprobs[1:]] == [list(top) for top in alone.prompt_top_logprobs[1:]]
        assert together.output_tokens == alone.output_tokens and len(together.output_tokens) == 1
        assert_close(together.output_logprobs, alone.output_logprobs)


def test_a_one_token_prompt_is_scored_with_nothing_to_score(make_engine, prompts) -> None:
    result = make_engine().run([WorkItem(prompts[1][:1], max_tokens=1, logprobs=1, echo=True)])[0]
    assert result.prompt_logprobs == [None] and result.prompt_top_logprobs == [None]
    assert len(result.output_tokens) == 1 and len(result.output_logprobs) == 1


def test_prefix_sharing_can_be_turned_off_without_changing_results(make_engine, local_model, prompts) -> None:
    items = [WorkItem(prompts[2] + [token], max_tokens=0, logprobs=1, echo=True) for token in prompts[0][:3]]
    shared, widths = make_engine().run(items), []
    handle = local_model.runner.model.embedding.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        apart = make_engine(share_prefixes=False).run(items)
    finally:
        handle.remove()
    assert widths == [torch.Size([3, len(prompts[2]) + 1])]  # one padded batch of three rows
    for left, right in zip(shared, apart):
        assert_close(left.prompt_logprobs[1:], right.prompt_logprobs[1:])


def test_seeded_sampling_is_reproducible_and_seed_dependent(make_engine, prompts) -> None:
    engine = make_engine(eos_token_ids=set())

    def sample(seed: int) -> list[int]:
        item = WorkItem(prompts[1], max_tokens=12, sampling=SamplingParams(temperature=1.0, seed=seed))
        return engine.run([item])[0].output_tokens

    assert sample(3) == sample(3)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_top_k_one_is_greedy(make_engine, prompts) -> None:
    engine = make_engine(eos_token_ids=set())
    greedy = engine.run([WorkItem(prompts[2], max_tokens=5)])[0].output_tokens
    sampled = engine.run([WorkItem(prompts[2], max_tokens=5, sampling=SamplingParams(temperature=1.0, top_k=1, seed=1))])[0]
    assert sampled.output_tokens == greedy


def test_stop_strings_end_generation_and_are_reported(make_engine, prompts, tokenizer) -> None:
    engine = make_engine(eos_token_ids=set())
    free = engine.run([WorkItem(prompts[2], max_tokens=8)])[0].output_tokens
    stop = tokenizer.decode(free[2:4])
    stopped = engine.run([WorkItem(prompts[2], max_tokens=8, stop=[stop])])[0]
    assert stopped.finish_reason == "stop" and stopped.stop_string == stop
    assert stopped.output_tokens == free[: len(stopped.output_tokens)]
    assert len(stopped.output_tokens) <= 4


def test_eos_stops_unless_ignored(make_engine, prompts) -> None:
    first = make_engine(eos_token_ids=set()).run([WorkItem(prompts[0], max_tokens=4)])[0].output_tokens[0]
    engine = make_engine(eos_token_ids={first})
    assert engine.run([WorkItem(prompts[0], max_tokens=4)])[0].output_tokens == [first]
    assert engine.run([WorkItem(prompts[0], max_tokens=4)])[0].finish_reason == "stop"
    assert len(engine.run([WorkItem(prompts[0], max_tokens=4, ignore_eos=True)])[0].output_tokens) == 4


def test_a_failure_on_rank_0_still_releases_the_other_ranks(local_model, prompts) -> None:
    """Rank 0 alone detokenizes (stop strings): if that fails, the other ranks must still
    receive the message that ends the batch, or they would wait forever."""
    from pytest_mtserve.server.engine import InferenceEngine

    class BrokenDetokenizer:
        def decode(self, token_ids: list[int]) -> str:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "broken on purpose")

    sent: list[list[int | None]] = []
    engine = InferenceEngine(
        local_model.runner, is_leader=True, share_tokens=lambda feed: sent.append(feed) or feed,
        eos_token_ids=set(), detokenizer=BrokenDetokenizer(),
    )  # fmt: skip
    with pytest.raises(UnicodeDecodeError):
        engine.run([WorkItem(prompts[0], max_tokens=5, stop=["x"]), WorkItem(prompts[1], max_tokens=5)])
    assert sent[-1] == [None, None]
    assert len(engine.run([WorkItem(prompts[1], max_tokens=3)])[0].output_tokens) == 3


def test_sdpa_attention_matches_unfused(local_model) -> None:
    """The SDPA core attention (for GPUs) computes what the unfused local one does."""
    from pytest_mtserve.server.model import build_model
    from pytest_mtserve.server.model_runner import ModelRunner
    from pytest_mtserve.server.shared_prefix import pack_prompts
    from pytest_mtserve.server.tiny_checkpoint import TINY_ARCHITECTURE, tiny_state_dict

    prompts, outputs = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]], {}
    for backend in ("unfused", "sdpa"):
        model = build_model(TINY_ARCHITECTURE, device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=64, attention_backend=backend)
        model.load_state_dict(tiny_state_dict(), strict=False)
        runner = ModelRunner(model, TINY_ARCHITECTURE, torch.device("cpu"))
        cache = runner.new_cache(2, 7, 9)
        prefill = runner.prefill(prompts, cache)
        (packed,) = pack_prompts([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 8, 9]])  # masks other than causal
        outputs[backend] = (prefill[0], prefill[1, :3], runner.decode(cache, [5], 1), runner.prefill_packed([packed])[0])
    for unfused, sdpa in zip(outputs["unfused"], outputs["sdpa"]):
        torch.testing.assert_close(sdpa, unfused, rtol=1e-4, atol=1e-4)


def test_a_process_adapted_to_the_cpu_refuses_cuda_with_a_clear_error(local_model) -> None:
    """Megatron's CPU adaptation is process-wide: a GPU model after it would get some
    tensors (rotary frequencies) on the CPU and fail deep inside attention."""
    from pytest_mtserve.server.distributed import init_parallel

    with pytest.raises(RuntimeError, match="process of its own"):
        init_parallel(tp=1, pp=1, device=torch.device("cuda"))


@pytest.mark.parametrize(("ranks", "omp", "threads"), [(2, None, 8), (3, None, 5), (32, None, 1), (1, None, None), (2, "4", None)])
def test_cpu_ranks_share_the_host_s_cores(monkeypatch, ranks: int, omp: str | None, threads: int | None) -> None:
    """Each CPU rank takes all cores by default: --tp 3 on 2 cores starved Triton's stubs."""
    from pytest_mtserve.server import distributed

    chosen = []
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(distributed.torch, "set_num_threads", chosen.append)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)  # the user's choice stands
    distributed._share_cpu_cores(ranks)
    assert chosen == ([threads] if threads else [])
