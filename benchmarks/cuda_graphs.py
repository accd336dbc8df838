"""Packed log-likelihood prefills on one GPU, eager against CUDA graphs, side by side.

    python benchmarks/cuda_graphs.py [--shape llama3-8b] [--dtype bfloat16] [--requests 8,32] [--graph-flops 6e13]

The same model (random weights, ``forward_perf.SHAPES``) runs MMLU-shaped batches (questions
of 4 choices sharing a context of 150-650 tokens, packed as the engine packs them) through
ModelRunners: one eager, one with ``cuda_graphs`` as the server runs it, and one more per
``--graph-flops`` limit, graphing larger passes than the server does (every graph is
captured as its runner is built: the time is printed). Each batch size runs a set of 12
batches, twice per runner, interleaved, each batch waited for before the next (as the
engine reads its log-probs); the better pass counts. Printed per batch size and runner:
scored tokens/s, the ratio to eager, the share of the batches' passes that ran as graphs,
and the largest log-prob difference to eager over the scored tokens of 4 batches (float32
runs tell capture errors from bf16's shape-dependent rounding). It asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from forward_perf import SHAPES, randomize
from pytest_mtserve.server.shared_prefix import pack_prompts

BATCHES_PER_SIZE = 12
CHOICES = 4


def mmlu_shaped_batch(rng: random.Random, requests: int, vocab: int) -> list[list[int]]:
    prompts = []
    for _ in range(requests // CHOICES):
        context = [rng.randrange(vocab) for _ in range(rng.randint(150, 650))]
        prompts.extend(context + [rng.randrange(vocab)] for _ in range(CHOICES))
    return prompts


def scored_logprobs(runner, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's log-prob of its own next tokens, as the engine reads them."""
    packs = pack_prompts(prompts)
    logits = runner.prefill_packed(packs)
    out = []
    for pack, pack_logits in zip(packs, logits):
        logprobs = torch.log_softmax(pack_logits.float(), dim=-1)
        for member, slots in zip(pack.members, pack.member_slots):
            targets = torch.tensor(prompts[member][1:], device=logprobs.device)
            out.append(logprobs[torch.tensor(slots[:-1], device=logprobs.device), targets])
    return out


def pass_shape(prompts: list[list[int]]) -> tuple[int, int]:
    """(rows, width) of the packed prefill of a batch."""
    packs = pack_prompts(prompts)
    return len(packs), max(len(pack) for pack in packs)


def timed_pass(runner, batches: list[list[list[int]]]) -> float:
    """Seconds for the batches, each waited for as the engine waits to read its log-probs:
    without that, Python would enqueue the next batch while the GPU runs this one, and the
    eager runner's launch overhead would hide behind the GPU's work."""
    started = time.perf_counter()
    for prompts in batches:
        runner.prefill_packed(pack_prompts(prompts))
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="model shape (default: llama3-8b)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="(default: bfloat16)")
    parser.add_argument("--requests", default="8,32", help="requests per batch, comma-separated (default: 8,32)")
    parser.add_argument("--attention-backend", default="unfused", help="(default: unfused)")
    parser.add_argument("--graph-flops", default="",
                        help="also graph passes up to these FLOPs of matrix work, comma-separated, one "
                             "runner each beside the server's limit (e.g. 6e13)")  # fmt: skip
    args = parser.parse_args()

    from pytest_mtserve.server import model_runner
    from pytest_mtserve.server.distributed import init_parallel
    from pytest_mtserve.server.model import build_model

    device = torch.device("cuda")
    init_parallel(tp=1, pp=1, device=device)
    arch = SHAPES[args.shape]
    model = build_model(arch, device=device, dtype=getattr(torch, args.dtype), max_sequence_length=4096,
                        attention_backend=args.attention_backend)  # fmt: skip
    randomize(model)
    eager = model_runner.ModelRunner(model, arch, device)
    print(f"{args.shape} {args.dtype} {args.attention_backend}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    graphed = {}
    for flops in [model_runner._LAUNCH_BOUND_FLOPS, *(float(f) for f in args.graph_flops.split(",") if f)]:
        model_runner._LAUNCH_BOUND_FLOPS = flops  # what the server's runner graphs, made larger
        started = time.perf_counter()
        runner = graphed[f"graphs to {flops:.1e} FLOPs"] = model_runner.ModelRunner(model, arch, device, cuda_graphs=True)
        print(f"graphs to {flops:.1e} FLOPs: {len(runner.graphs)} graphs, up to {runner.graphs.max_tokens} tokens, "
              f"captured in {time.perf_counter() - started:.1f} s")  # fmt: skip
    print("| requests per batch | runner | tokens/s | / eager | passes as graphs | largest log-prob difference to eager |")
    print("| --- | --- | --- | --- | --- | --- |")
    rng = random.Random(0)
    for requests in (int(r) for r in args.requests.split(",")):
        batches = [mmlu_shaped_batch(rng, requests, arch.vocab_size) for _ in range(BATCHES_PER_SIZE)]
        tokens = sum(len(p) for prompts in batches for p in prompts)
        runners = {"eager": eager, **graphed}
        seconds = {name: timed_pass(runner, batches) for name, runner in runners.items()}
        seconds = {name: min(seconds[name], timed_pass(runner, batches)) for name, runner in runners.items()}
        eager_logprobs = [scored_logprobs(eager, prompts) for prompts in batches[:4]]
        print(f"| {requests} | eager | {tokens / seconds['eager']:,.0f} | 1.00 | - | - |")
        for name, runner in graphed.items():
            as_graphs = sum(runner.graphs.padded_shape(*shape) in runner.graphs.shapes() for shape in map(pass_shape, batches))
            difference = max(
                (a - b).abs().max().item()
                for prompts, expected in zip(batches, eager_logprobs)
                for a, b in zip(expected, scored_logprobs(runner, prompts))
            )
            print(f"| {requests} | {name} | {tokens / seconds[name]:,.0f} | {seconds['eager'] / seconds[name]:.2f} | "
                  f"{as_graphs} of {len(batches)} | {difference:.2e} |", flush=True)  # fmt: skip
    print(f"GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB at most allocated")


if __name__ == "__main__":
    main()
