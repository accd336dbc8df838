"""Prefill time of the unfused (default) and the SDPA core attention on the same prompts.

    python benchmarks/attention_backends.py [--checkpoint RUN_DIR] [--device cpu] [--shapes 1x2724,4x1300]

Loads the checkpoint once per backend (``--attention-backend`` of the server) and times one
prefill (last-token logits, as a generation does) per ``ROWSxLENGTH`` shape of random
prompts, after a warm-up prefill; also prints the largest logit difference between the two.
The last line is unfused / sdpa for the first shape. Default checkpoint: the demo model
(``mtserve demo`` prepares it).
"""

from __future__ import annotations

import argparse
import time

import torch

from pytest_mtserve.demo.assets import default_cache_dir
from pytest_mtserve.server.local_model import load_model
from pytest_mtserve.server.options import ATTENTION_BACKENDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(default_cache_dir() / "checkpoint"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="1x2724,4x1300", help="comma-separated ROWSxLENGTH (default: 1x2724,4x1300)")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    seconds: dict[str, list[float]] = {}
    logits: dict[str, list[torch.Tensor]] = {}
    for backend in ATTENTION_BACKENDS:
        runner = load_model(args.checkpoint, device=args.device, attention_backend=backend).runner
        generator = torch.Generator().manual_seed(0)  # the same prompts for each backend
        batches = [[torch.randint(0, runner.vocab_size, (n,), generator=generator).tolist() for _ in range(rows)] for rows, n in shapes]
        runner.prefill([[1, 2, 3]], last_positions_only=True)
        seconds[backend], logits[backend] = [], []
        for prompts in batches:
            started = time.perf_counter()
            logits[backend].append(runner.prefill(prompts, last_positions_only=True).float().cpu())
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[backend].append(time.perf_counter() - started)
    for index, (rows, length) in enumerate(shapes):
        difference = (logits["unfused"][index] - logits["sdpa"][index]).abs().max().item()
        times = ", ".join(f"{backend} {seconds[backend][index]:.1f} s" for backend in ATTENTION_BACKENDS)
        print(f"{rows} x {length} tokens: {times}; largest logit difference {difference:.1e}")
    print(f"unfused / sdpa = {seconds['unfused'][0] / seconds['sdpa'][0]:.2f}")


if __name__ == "__main__":
    main()
