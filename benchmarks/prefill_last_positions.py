"""What computing the output layer only at each prompt's last token saves in a generation prefill.

    python benchmarks/prefill_last_positions.py [--checkpoint RUN_DIR] [--device cpu] [--batch 8] [--length 700]

Times ``ModelRunner.prefill`` on the same random prompts (right-padded, lengths spread over
``length/2 .. length``, the shape of MMLU's five-shot prompts) with every position's logits
and with ``last_positions_only``, in alternating rounds so that load on a shared machine hits
both alike, and prints the ratio of the medians. Default checkpoint: the demo model
(``mtserve demo`` prepares it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pytest_mtserve.demo.assets import default_cache_dir
from pytest_mtserve.server.local_model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(default_cache_dir() / "checkpoint"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runner = load_model(args.checkpoint, device=args.device).runner
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.length // 2, args.length + 1, (args.batch,), generator=generator).tolist()
    prompts = [torch.randint(0, runner.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds + 1):  # the first round warms up
        for last_only in (False, True):
            started = time.perf_counter()
            runner.prefill(prompts, last_positions_only=last_only)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[last_only].append(time.perf_counter() - started)
    every, last = (statistics.median(times[flag][1:]) for flag in (False, True))
    print(f"{args.batch} prompts of {min(lengths)}-{max(lengths)} tokens, {args.rounds} rounds, median seconds per prefill:")
    print(f"  logits at every position: {every:.3f}")
    print(f"  logits at the last token: {last:.3f}")
    print(f"every / last-only = {every / last:.2f}")


if __name__ == "__main__":
    main()
