"""Rank 0's Python per batch for prompt log-probs: top alternatives as a dict per position vs a
``TopLogprobTable`` read off the tensors, each then written as the batch's Triton rows.

A batch of ``--requests`` log-likelihood results (echo, ``--alternatives`` per position) of
``--prompt-tokens`` each: the engine's step from the top-k tensors to results, and
``WorkResult.to_json`` of every result, as rank 0 runs them beside the engine. Both forms
give the same rows (checked). The top-k itself, common to both, is done once beforehand.

    python benchmarks/result_encoding.py [--requests 32] [--prompt-tokens 280] [--repeats 20]

This measures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pytest_mtserve.server.work import TopLogprobTable, WorkResult


def results_with_dicts(ids: torch.Tensor, values: torch.Tensor, requests: int) -> list[WorkResult]:
    """A dict per position (``sampling.top_logprobs``'s form, as decode steps still use)."""
    entries = [dict(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    per_request = len(entries) // requests
    return [_result([None] + entries[r * per_request : (r + 1) * per_request]) for r in range(requests)]


def results_with_tables(ids: torch.Tensor, values: torch.Tensor, requests: int) -> list[WorkResult]:
    """Two arrays per request, as the engine's ``_score_prompts`` fills them."""
    ids, values = ids.to(torch.int32).numpy(), values.double().numpy()
    per_request = len(ids) // requests
    return [
        _result(TopLogprobTable.of_positions(ids[r * per_request : (r + 1) * per_request].tobytes(),
                                             values[r * per_request : (r + 1) * per_request].tobytes(), per_request, first_missing=True))
        for r in range(requests)
    ]  # fmt: skip


def _result(top) -> WorkResult:
    return WorkResult(output_tokens=[5], finish_reason="length", prompt_logprobs=[None] + [-1.25] * (len(top) - 1), prompt_top_logprobs=top)


def batch_rows(make: Callable, ids: torch.Tensor, values: torch.Tensor, requests: int) -> list[str]:
    return [result.to_json() for result in make(ids, values, requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="results per batch (default: 32)")
    parser.add_argument("--prompt-tokens", type=int, default=280, help="tokens per prompt, an MMLU prompt's (default: 280)")
    parser.add_argument("--alternatives", type=int, default=1, help="top alternatives per position, lm-eval's logprobs (default: 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed batches per form (default: 20)")
    args = parser.parse_args()

    scored = args.requests * (args.prompt_tokens - 1)
    logprobs = torch.randn(scored, 4096).log_softmax(dim=-1)
    values, ids = torch.topk(logprobs, args.alternatives, dim=-1)
    forms = {"a dict per position": results_with_dicts, "TopLogprobTable": results_with_tables}
    rows = {name: batch_rows(make, ids, values, args.requests) for name, make in forms.items()}
    if rows["a dict per position"] != rows["TopLogprobTable"]:
        raise SystemExit("the two forms wrote different rows")
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for name, make in forms.items():
            started = time.perf_counter()
            batch_rows(make, ids, values, args.requests)
            times[name].append(time.perf_counter() - started)
    print(f"a batch of {args.requests} results, {args.prompt_tokens} prompt tokens each, {args.alternatives} alternative(s) per position:")
    for name, measured in times.items():
        print(f"  {name:<20} {1e3 * statistics.median(measured):7.2f} ms per batch (median of {args.repeats})")
    ratio = statistics.median(times["a dict per position"]) / statistics.median(times["TopLogprobTable"])
    print(f"dicts / table = {ratio:.2f}")


if __name__ == "__main__":
    main()
