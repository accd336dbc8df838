"""What running a batch as groups of similar prompt lengths saves, against one padded pass.

    python benchmarks/length_groups.py [--checkpoint RUN_DIR] [--device cpu] [--scale 0.5]

The batch is one that Triton formed in a CPU demo run: eight five-shot MMLU prompts of
826-2,724 tokens (times ``--scale``), random token ids, two new tokens each, as lm-eval's
``mmlu_str`` asks. The engine runs it with ``group_by_length`` on and off, in alternating
rounds so that load on a shared machine hits both alike, and checks that both give the
same tokens. The last line is padded / grouped seconds. Default checkpoint: the demo model
(``mtserve demo`` prepares it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pytest_mtserve.demo.assets import default_cache_dir
from pytest_mtserve.server.batch_split import split_by_length
from pytest_mtserve.server.engine import InferenceEngine
from pytest_mtserve.server.local_model import load_model
from pytest_mtserve.server.work import WorkItem

DEMO_MMLU_BATCH = (826, 848, 1077, 1180, 1293, 1732, 2207, 2724)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(default_cache_dir() / "checkpoint"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=0.5, help="prompt lengths times this (default: 0.5)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runner = load_model(args.checkpoint, device=args.device).runner
    generator = torch.Generator().manual_seed(0)
    lengths = [max(1, round(n * args.scale)) for n in DEMO_MMLU_BATCH]
    items = [WorkItem(torch.randint(0, runner.vocab_size, (n,), generator=generator).tolist(), max_tokens=2) for n in lengths]
    engines = {
        name: InferenceEngine(runner, is_leader=True, share_tokens=lambda t: t, eos_token_ids=set(), detokenizer=None, group_by_length=grouped)
        for name, grouped in (("padded", False), ("grouped", True))
    }  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            started = time.perf_counter()
            tokens[name] = [result.output_tokens for result in engine.run(items)]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - started)
    groups = split_by_length(lengths, [2] * len(lengths), runner.forward_cost)
    print(f"{len(items)} prompts of {min(lengths)}-{max(lengths)} tokens, 2 new tokens each; cost model {runner.forward_cost}")
    print(f"  groups: {[[lengths[i] for i in group] for group in groups]}")
    print(f"  same tokens either way: {tokens['padded'] == tokens['grouped']}")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in medians.items():
        print(f"  {name:<7} median seconds over {args.rounds} rounds: {value:.1f}")
    print(f"padded / grouped = {medians['padded'] / medians['grouped']:.2f}")


if __name__ == "__main__":
    main()
