"""Choosing the next token of one row: greedy, or sampled with temperature, top-k and top-p.

Each row samples from its own seeded generator, so a seeded request gets the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import secrets

import torch

from pytest_mtserve.server.work import SamplingParams, TopLogprobs


def row_generator(params: SamplingParams) -> torch.Generator | None:
    """None for greedy rows; a CPU generator seeded by the request (or at random) otherwise."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device="cpu").manual_seed(seed)


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """``logits``: the row's float32 next-token logits over the real vocabulary."""
    if generator is None:
        return int(torch.argmax(logits))
    scaled = logits.float().cpu() / params.temperature
    if params.top_k > 0:
        kth_value = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth_value, float("-inf"))
    if params.top_p < 1.0:
        scaled = _nucleus(scaled, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _nucleus(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (at least one)."""
    sorted_logits, order = torch.sort(scaled, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[TopLogprobs]:
    """The k most likely tokens at each row of ``logprobs`` ([positions, vocab])."""
    if k <= 0:
        return [{} for _ in range(logprobs.shape[0])]
    values, ids = torch.topk(logprobs, k, dim=-1)
    return [dict(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
