"""How full Triton's batches are, how long the engine idles between them, and the requests
per second, at several queue delays and Triton instance counts side by side.

    python benchmarks/batch_fill.py [--setups 2000:1,100000:1,100000:2] [--batch 32] [--clients 64]

The serving path is the real one (PyTriton and tritonserver, the HTTP front end processes,
lm-eval-like aiohttp clients sending echoed log-likelihood requests), the engine is not: it
sleeps as the 8B GPU engine takes per batch (``--engine-ms`` plus ``--engine-ms-per-request``
each, measured on an H200: 94-107 ms for batches of 23-32). So a CPU machine reproduces the
GPU's batching: the host's cores go to the serving path only, as on a GPU host.

Each setup (queue delay in microseconds : Triton instances) gets a Triton and front ends of
its own; the rounds alternate between them, so load on a shared machine hits all alike. The
last lines are each setup's requests per second as a ratio to the first setup's.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import statistics
import sys
import tempfile
import time
from array import array
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_overhead import post_all, share_counter  # noqa: E402

from pytest_mtserve.server.batch_log import BatchLog, BatchTimes, parse_batch_lines  # noqa: E402
from pytest_mtserve.server.frontend_process import FrontEndProcesses, FrontEndSettings  # noqa: E402
from pytest_mtserve.server.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402
from pytest_mtserve.server.triton_binding import TritonEngineServer  # noqa: E402
from pytest_mtserve.server.work import TopLogprobTable, WorkItem, WorkResult  # noqa: E402

MODEL = "sleeping-engine"
LAUNCH_BYTES = bytes(4096)  # what a kernel launch of --engine-launches hashes
# lm-eval's log-likelihood request; ~270 tokens of the tiny tokenizer, an MMLU prompt's length
BODY = {"model": MODEL, "prompt": "the answer is " * 90, "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True}


def sleeping_engine(base_s: float, per_request_s: float, launches: int):
    """Issues ``launches`` GPU kernel launches' worth of Python, a few microseconds holding the
    GIL each, then a call that lets it go, as a torch op does; then sleeps ``base_s`` plus
    ``per_request_s`` per request, the GPU's time. Another thread busy in Python makes each
    launch take the GIL back later, as rank 0's other threads do to an eager engine."""

    def run_batch(items: list[WorkItem]) -> list[WorkResult]:
        for _ in range(launches):  # ~8 us each alone
            sum(range(40))
            hashlib.md5(LAUNCH_BYTES)  # lets the GIL go (hashlib does above 2 kB), as an op's C++ does
        time.sleep(base_s + per_request_s * len(items))
        return [echoed_result(len(item.prompt_tokens)) for item in items]

    return run_batch


def echoed_result(prompt_length: int) -> WorkResult:
    """What a log-likelihood request (echo, logprobs 1, max_tokens 1) gets back, in the engine's form."""
    scored = prompt_length - 1
    top = TopLogprobTable.of_positions(array("i", [7] * scored).tobytes(), array("d", [-0.5] * scored).tobytes(), scored, first_missing=True)
    return WorkResult(
        output_tokens=[5], finish_reason="length", prompt_logprobs=[None] + [-1.25] * scored, prompt_top_logprobs=top,
        output_logprobs=[-1.0], output_top_logprobs=[{5: -1.0}],
    )  # fmt: skip


class Stack:
    """Triton with the sleeping engine at one queue delay and instance count, and its front ends."""

    def __init__(self, stack: ExitStack, args: argparse.Namespace, setup: str, scratch: Path) -> None:
        self.setup = setup
        delay_us, instances = (int(value) for value in setup.split(":"))
        self.name = f"queue delay {delay_us:>6} us, {instances} instance{'s' if instances > 1 else ''}"
        self.log_path = scratch / f"batches-{delay_us}-{instances}.log"
        log = stack.enter_context(self.log_path.open("w"))
        engine = sleeping_engine(args.engine_ms / 1e3, args.engine_ms_per_request / 1e3, args.engine_launches)
        triton = TritonEngineServer(engine, max_batch_size=args.batch, queue_delay_us=delay_us, instances=instances,
                                    batch_log=BatchLog(log))  # fmt: skip
        triton.start()
        stack.callback(triton.stop)
        settings = FrontEndSettings(MODEL, str(scratch / "tokenizer"), 4096, "127.0.0.1", 0, triton.url,
                                    triton.triton_model_name, 600.0)  # fmt: skip
        frontends = FrontEndProcesses(settings, args.frontend_processes)
        self.url = frontends.start()
        stack.callback(frontends.stop)

    def measure(self, clients: int, requests: int) -> tuple[float, list[BatchTimes]]:
        """Requests per second, and the batches that ran meanwhile."""
        share_counter(multiprocessing.Value("q", 0))
        started = time.monotonic()
        _, failures = post_all(self.url, [BODY] * requests, clients)
        ended = time.monotonic()
        if failures:
            raise RuntimeError(f"{len(failures)} requests failed; the first: {failures[0]}")
        batches = parse_batch_lines(self.log_path.read_text().splitlines())
        return requests / (ended - started), [b for b in batches if started <= b.left <= ended]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default="2000:1,100000:1,100000:2",
                        help="queue delay (us) : Triton instances, comma-separated (default: 2000:1,100000:1,100000:2)")
    parser.add_argument("--batch", type=int, default=32, help="Triton's max batch size (default: 32)")
    parser.add_argument("--clients", type=int, default=64, help="requests in flight (default: 64)")
    parser.add_argument("--requests", type=int, default=640, help="requests per round (default: 640)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--frontend-processes", type=int, default=2)
    parser.add_argument("--engine-ms", type=float, default=60.0, help="the engine's time per batch (default: 60)")
    parser.add_argument("--engine-ms-per-request", type=float, default=1.5, help="and per request in it (default: 1.5)")
    parser.add_argument("--engine-launches", type=int, default=0,
                        help="kernel launches' worth of Python each batch starts with, the GIL let go between "
                             "them (default: 0, the engine only sleeps)")
    args = parser.parse_args()
    setups = args.setups.split(",")
    rates: dict[str, list[float]] = {setup: [] for setup in setups}
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        build_tiny_tokenizer(Path(scratch) / "tokenizer")
        stacks = [Stack(stack, args, setup, Path(scratch)) for setup in setups]
        for server in stacks:
            server.measure(args.clients, 2 * args.clients)  # warm-up
        for round_index in range(args.rounds):
            for server in stacks:
                rate, batches = server.measure(args.clients, args.requests)
                rates[server.setup].append(rate)
                sizes = [batch.requests for batch in batches]
                idle = [batch.idle_ms for batch in batches[1:] if batch.idle_ms is not None]
                engine_ms = statistics.fmean(batch.engine_ms for batch in batches)
                print(f"{server.name}, round {round_index + 1}: {rate:6.1f} requests/s, {len(sizes)} batches of "
                      f"{statistics.fmean(sizes):.1f} on average (at most {args.batch}), the engine {engine_ms:.1f} ms "
                      f"on each and idle {statistics.fmean(idle) if idle else 0.0:.1f} ms before it; "
                      f"sizes {' '.join(map(str, sizes[:24]))}{' ...' if len(sizes) > 24 else ''}")  # fmt: skip
    first = max(rates[setups[0]])
    for server in stacks[1:]:
        print(f"requests/s (best round), {server.name} / {stacks[0].name} = {max(rates[server.setup]) / first:.3f}")


if __name__ == "__main__":
    sys.exit(main())
