"""What a decode step costs when a batch's prompts all differ in length, against equal lengths.

    python benchmarks/decode_steps.py [--checkpoint RUN_DIR] [--device cpu] [--batch 16] [--length 150]

Generation batches formed by Triton hold prompts of many lengths (five-shot MMLU: nearly
every prompt its own). The engine runs ``--batch`` greedy generations of ``--new-tokens``
tokens on random prompts of distinct lengths (``length/2 .. length``) and on the same number
of prompts of one length (their mean), and once more with one new token each; the
difference, over the extra tokens, is the seconds per decode step. Rounds alternate so load
on a shared machine hits both alike. The last line is mixed / equal: 1.0 means a batch of
mixed lengths decodes as cheaply as the best case. Default checkpoint: the demo model
(``mtserve demo`` prepares it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pytest_mtserve.demo.assets import default_cache_dir
from pytest_mtserve.server.engine import InferenceEngine
from pytest_mtserve.server.local_model import load_model
from pytest_mtserve.server.work import WorkItem


def seconds(engine: InferenceEngine, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    started = time.perf_counter()
    engine.run([WorkItem(prompt, max_tokens=new_tokens) for prompt in prompts])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(default_cache_dir() / "checkpoint"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=150)
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runner = load_model(args.checkpoint, device=args.device).runner
    # One batch as given: grouping by length would split the mixed batch into passes of its own.
    engine = InferenceEngine(runner, is_leader=True, share_tokens=lambda t: t, eos_token_ids=set(), detokenizer=None, group_by_length=False)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randperm(args.length - args.length // 2, generator=generator)[: args.batch] + args.length // 2
    mixed = [torch.randint(0, runner.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]
    mean = round(float(lengths.float().mean()))
    batches = {"mixed": mixed, "equal": [prompt[:mean] + prompt[: max(0, mean - len(prompt))] for prompt in mixed]}
    per_step: dict[str, list[float]] = {name: [] for name in batches}
    for round_index in range(args.rounds + 1):  # the first round warms up
        for name, prompts in batches.items():
            full, prefill_only = seconds(engine, prompts, args.new_tokens, args.device), seconds(engine, prompts, 1, args.device)
            if round_index:
                per_step[name].append((full - prefill_only) / (args.new_tokens - 1))
    print(f"{args.batch} prompts, distinct lengths {int(lengths.min())}-{int(lengths.max())} vs all {mean}; "
          f"{args.new_tokens} new tokens; median seconds per decode step over {args.rounds} rounds:")  # fmt: skip
    medians = {name: statistics.median(times) for name, times in per_step.items()}
    for name, value in medians.items():
        print(f"  {name:<5} lengths: {value:.4f}")
    print(f"mixed / equal = {medians['mixed'] / medians['equal']:.2f}")


if __name__ == "__main__":
    main()
