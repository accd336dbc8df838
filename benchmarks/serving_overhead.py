"""Log-prob scoring throughput through the full HTTP stack vs direct in-process engine calls.

The same seeded, MMLU/ARC-shaped log-likelihood request stream (echo, max_tokens=1,
logprobs=1, prompts of varied length) goes (a) straight into ``InferenceEngine.run`` in
batches of ``--max-batch-size`` (the best batches Triton could form) and (b) through a
real server (FastAPI -> PyTriton -> engine) from ``--clients`` concurrent keep-alive HTTP
clients. Warm-up requests are excluded from both. The last line printed is the ratio.

    python benchmarks/serving_overhead.py [--checkpoint RUN_DIR] [--requests 384]
    python benchmarks/serving_overhead.py --device cuda --shape llama3-8b --peer-python python3

Without ``--checkpoint`` the tiny test checkpoint is written to a temporary folder; with
``--shape`` a random-weight checkpoint of that shape (``forward_perf.SHAPES``) is built
on the device. ``--peer-python`` also scores the stream in-process with Hugging Face
transformers (``hf_peer.py``, same shape, random weights, same batches) under that
interpreter. This measures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_perf import SHAPES  # noqa: E402

from pytest_mtserve.server.options import ATTENTION_BACKENDS  # noqa: E402
from pytest_mtserve.server.tokenizer import ServerTokenizer, load_tokenizer  # noqa: E402

WORDS = (
    "the of and to in is that for it as with was on be by at this which from or are an "
    "cell energy plants water light gas carbon dioxide oxygen animals species force mass "
    "motion heat temperature earth sun moon planet rock soil river ocean weather climate "
    "law court king war trade economy market price money bank state government people "
    "number sum product equation function value angle triangle circle area volume ratio"
).split()
CHOICE_LABELS = "ABCD"
MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 50, 600
WARMUP_REQUESTS = 32
CORRECTNESS_SAMPLE = 8  # served results compared with direct ones, to know both paths agree


@dataclass(frozen=True)
class ScoringRequest:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Throughput:
    tokens: int
    seconds: float
    # CPU seconds by process role. On a shared machine wall time swings with the neighbours'
    # load; CPU time per token shows where the work goes far more steadily.
    cpu_s: dict[str, float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def cpu_ms_per_1k_tokens(self) -> dict[str, float]:
        return {role: 1e6 * seconds / self.tokens for role, seconds in self.cpu_s.items()}


def build_request_stream(tokenizer: ServerTokenizer, count: int, seed: int) -> list[ScoringRequest]:
    """MMLU-shaped requests: each question's context scored once per answer choice (4 each)."""
    rng = random.Random(seed)
    requests: list[ScoringRequest] = []
    while len(requests) < count:
        context = _question_context(tokenizer, rng)
        for label in CHOICE_LABELS:
            text = f"{context}\nAnswer: {label}. {' '.join(rng.choices(WORDS, k=rng.randint(1, 6)))}"
            requests.append(ScoringRequest(text, tokenizer.encode(text)))
    return requests[:count]


def _question_context(tokenizer: ServerTokenizer, rng: random.Random) -> str:
    # Log-uniform lengths: many short zero-shot questions, fewer long few-shot contexts.
    target = int(MIN_PROMPT_TOKENS * (MAX_PROMPT_TOKENS / MIN_PROMPT_TOKENS) ** rng.random())
    text = "The following are multiple choice questions (with answers).\nQuestion:"
    while len(tokenizer.encode(text)) < target:
        text += " " + " ".join(rng.choices(WORDS, k=16))
    return text


def completion_body(request: ScoringRequest, model: str) -> dict[str, Any]:
    """The body lm-eval's local-completions sends for one log-likelihood request."""
    return {"model": model, "prompt": request.text, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "stream": False, "seed": 1234, "echo": True}  # fmt: skip


def total_tokens(requests: Sequence[ScoringRequest]) -> int:
    return sum(len(r.token_ids) for r in requests)


# --- (a) direct engine calls ------------------------------------------------------------------


def direct_scorer(
    checkpoint: Path, device: str, attention_backend: str, tokenizer: ServerTokenizer
) -> Callable[[Sequence[ScoringRequest]], list[list[float | None]]]:
    """Loads the model here (TP1); the scorer runs one engine batch and returns prompt log-probs."""
    from pytest_mtserve.server.engine import InferenceEngine
    from pytest_mtserve.server.local_model import load_model
    from pytest_mtserve.server.work import WorkItem

    local = load_model(checkpoint, device=device, attention_backend=attention_backend)
    engine = InferenceEngine(
        local.runner, is_leader=True, share_tokens=lambda t: t, eos_token_ids=set(), detokenizer=tokenizer
    )

    def score(batch: Sequence[ScoringRequest]) -> list[list[float | None]]:
        items = [WorkItem(prompt_tokens=r.token_ids, max_tokens=1, logprobs=1, echo=True) for r in batch]
        return [result.prompt_logprobs for result in engine.run(items)]

    return score


def measure_direct(score: Callable, requests: Sequence[ScoringRequest], batch_size: int) -> Throughput:
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in batches:
        score(batch)
    cpu = {"engine": time.process_time() - cpu_started}
    return Throughput(total_tokens(requests), time.perf_counter() - started, cpu)


# --- (b) through the HTTP stack ---------------------------------------------------------------


def measure_served(server_pid: int, url: str, model: str, requests: Sequence[ScoringRequest], clients: int) -> Throughput:
    """``clients`` threads, each with its own keep-alive connection, drain one shared queue."""
    import httpx

    queue: Iterator[ScoringRequest] = iter(requests)
    queue_lock = threading.Lock()
    failures: list[str] = []

    def next_request() -> ScoringRequest | None:
        with queue_lock:
            return next(queue, None)

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while (request := next_request()) is not None and not failures:
                response = http.post("/v1/completions", json=completion_body(request, model))
                if response.status_code != 200:
                    failures.append(f"HTTP {response.status_code}: {response.text[:300]}")

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    server_cpu_started = server_cpu_by_role(server_pid)
    started, cpu_started = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} served requests failed; the first: {failures[0]}")
    server_cpu = server_cpu_by_role(server_pid)
    cpu = {role: server_cpu[role] - server_cpu_started.get(role, 0.0) for role in server_cpu}
    cpu["HTTP clients"] = time.process_time() - cpu_started
    return Throughput(total_tokens(requests), elapsed, cpu)


def server_cpu_by_role(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's process (front end, Triton callable, engine) and of
    tritonserver with its Python backend stub."""
    import psutil

    root = psutil.Process(server_pid)
    totals = {"server process": 0.0, "tritonserver + stub": 0.0}
    for process in [root, *root.children(recursive=True)]:
        try:
            times, name = process.cpu_times(), process.name()
        except psutil.NoSuchProcess:
            continue
        role = "tritonserver + stub" if "triton" in name else "server process"
        totals[role] += times.user + times.system
    return totals


def served_logprobs(url: str, model: str, request: ScoringRequest) -> list[float | None]:
    import httpx

    response = httpx.post(f"{url}/v1/completions", json=completion_body(request, model), timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["token_logprobs"][:-1]  # the last one is generated


def largest_difference(left: list[float | None], right: list[float | None]) -> float:
    if len(left) != len(right):
        raise RuntimeError(f"served and direct results differ in length: {len(left)} vs {len(right)} log-probs")
    return max((abs(a - b) for a, b in zip(left, right) if a is not None and b is not None), default=0.0)


# --- orchestration ----------------------------------------------------------------------------


def start_server_for(checkpoint: Path, log_dir: Path, args: argparse.Namespace):
    from pytest_mtserve.launcher import ServerSettings, server_command, start_server

    settings = ServerSettings(checkpoint=checkpoint, device=args.device, max_batch_size=args.max_batch_size, python=args.server_python)
    command = [*server_command(settings), f"--attention-backend={args.attention_backend}", *args.server_arg]
    return start_server(command, log_dir / "server.log", timeout_s=600)


def run(args: argparse.Namespace, checkpoint: Path, scratch: Path) -> float:
    from pytest_mtserve.server.checkpoint import locate_checkpoint

    tokenizer = load_tokenizer(locate_checkpoint(checkpoint).tokenizer_dir)
    stream = build_request_stream(tokenizer, WARMUP_REQUESTS + args.requests, args.seed)
    warmup, timed = stream[:WARMUP_REQUESTS], stream[WARMUP_REQUESTS:]
    lengths = [len(r.token_ids) for r in timed]
    print(f"stream: {len(timed)} requests, {total_tokens(timed)} prompt tokens, length "
          f"min {min(lengths)} / median {int(statistics.median(lengths))} / max {max(lengths)}")  # fmt: skip

    server = start_server_for(checkpoint, scratch, args)
    try:
        score = direct_scorer(checkpoint, args.device, args.attention_backend, tokenizer)
        measure_direct(score, warmup, args.max_batch_size)
        measure_served(server.pid, server.url, server.model, warmup, args.clients)
        difference = max(
            largest_difference(served_logprobs(server.url, server.model, r), score([r])[0])
            for r in timed[:CORRECTNESS_SAMPLE]
        )
        print(f"served vs direct log-probs: largest difference {difference:.2e} over {CORRECTNESS_SAMPLE} requests")
        direct, served = [], []
        for round_index in range(args.rounds):  # interleaved, so drift on a shared machine hits both alike
            direct.append(measure_direct(score, timed, args.max_batch_size))
            with profiled_round(args, server.pid, round_index):
                served.append(measure_served(server.pid, server.url, server.model, timed, args.clients))
    finally:
        server.stop()
    peer = run_peer(args, checkpoint, scratch) if args.peer_python else None
    return report(direct, served, peer, args)


@contextlib.contextmanager
def profiled_round(args: argparse.Namespace, server_pid: int, round_index: int) -> Iterator[None]:
    """Samples the server's processes with py-spy during a served round (``--profile-with``):
    every running thread in even rounds, only the thread holding the GIL in odd ones."""
    if args.profile_with is None:
        yield
        return
    kind = "gil" if round_index % 2 else "running"
    out = args.profile_out / f"served-round{round_index}-{kind}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [args.profile_with, "record", "--pid", str(server_pid), "--subprocesses", "--threads", "--nonblocking",
               "--rate", "200", "--format", "raw", "--output", str(out), *(["--gil"] if kind == "gil" else [])]  # fmt: skip
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches before the round starts
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
        print(f"py-spy profile of served round {round_index} ({kind} threads): {out}")


def run_peer(args: argparse.Namespace, checkpoint: Path, scratch: Path) -> float:
    """Tokens/s of Hugging Face transformers on the same stream, in its own interpreter."""
    result = scratch / "peer.json"
    peer = Path(__file__).with_name("hf_peer.py")
    subprocess.run([args.peer_python, str(peer), "--checkpoint", str(checkpoint), "--requests", str(args.requests),
                    "--seed", str(args.seed), "--batch-size", str(args.max_batch_size), "--rounds", str(args.rounds),
                    "--out", str(result)], check=True)  # fmt: skip
    return json.loads(result.read_text())["tokens_per_s"]


def report(direct: list[Throughput], served: list[Throughput], peer: float | None, args: argparse.Namespace) -> float:
    for name, runs in (("direct", direct), (f"served ({args.clients} clients)", served)):
        rates = ", ".join(f"{t.tokens_per_s:,.0f}" for t in runs)
        print(f"{name:<20} tokens/s per round: {rates}")
        print(f"{'':<20} CPU ms per 1k tokens (median round): {_median_cpu(runs)}")
    best_direct = max(t.tokens_per_s for t in direct)
    best_served = max(t.tokens_per_s for t in served)
    print(f"direct (best round): {best_direct:,.0f} tokens/s (batches of {args.max_batch_size})")
    print(f"served (best round): {best_served:,.0f} tokens/s")
    if peer is not None:
        print(f"Hugging Face transformers in-process (best round): {peer:,.0f} tokens/s (batches of {args.max_batch_size})")
        print(f"served / transformers = {best_served / peer:.3f}")
    ratio = best_served / best_direct
    print(f"served / direct = {ratio:.3f}")
    return ratio


def _median_cpu(runs: list[Throughput]) -> str:
    per_round = [run.cpu_ms_per_1k_tokens() for run in runs]
    medians = {role: statistics.median(r[role] for r in per_round) for role in per_round[0]}
    parts = [f"{role} {value:,.0f}" for role, value in medians.items()]
    return ", ".join(parts) + f"; total {sum(medians.values()):,.0f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="run directory to serve (default: a fresh tiny checkpoint)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="serve a random-weight checkpoint of this shape, built on --device")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both paths run the model (default: cpu)")
    parser.add_argument("--attention-backend", default="unfused", choices=ATTENTION_BACKENDS, help="core attention of both paths (default: unfused)")
    parser.add_argument("--server-python", default=sys.executable, help="interpreter of the server (default: this one)")
    parser.add_argument("--peer-python", help="also measure Hugging Face transformers under this interpreter (cuda)")
    parser.add_argument("--requests", type=int, default=384, help="timed requests per round (default: 384)")
    parser.add_argument("--rounds", type=int, default=2, help="direct/served measurement rounds (default: 2)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (default: 16)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="server and direct batch size (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request stream (default: 0)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra server option, repeatable, e.g. --server-arg=--queue-delay-us=500")  # fmt: skip
    parser.add_argument("--profile-with", metavar="PY_SPY", help="py-spy executable: sample the server during each served round")
    parser.add_argument("--profile-out", type=Path, default=Path("profiles"), help="folder for the py-spy profiles (default: profiles)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mtserve-overhead-") as scratch:
        checkpoint = args.checkpoint or make_checkpoint(Path(scratch), args.shape, args.device)
        run(args, checkpoint, Path(scratch))


def make_checkpoint(scratch: Path, shape: str | None, device: str) -> Path:
    """The tiny test checkpoint, or random weights of ``shape`` (with the tiny tokenizer:
    its ids fit every shape's vocabulary, and only prompt lengths matter here)."""
    if shape is None:
        from pytest_mtserve.server.tiny_checkpoint import write_tiny_checkpoint

        tiny = scratch / "tiny"
        write_tiny_checkpoint(tiny)
        return tiny
    import torch

    from pytest_mtserve.server.architecture import run_config_model_section
    from pytest_mtserve.server.checkpoint_writer import write_random_checkpoint
    from pytest_mtserve.server.tiny_tokenizer import build_tiny_tokenizer

    # Only the tokenizer: writing the tiny checkpoint would adapt this process to the CPU.
    tokenizer = scratch / "tiny-tokenizer"
    build_tiny_tokenizer(tokenizer)
    model_config = run_config_model_section(SHAPES[shape], "megatron.bridge.models.llama.LlamaModelProvider")
    run_dir = scratch / shape
    write_random_checkpoint(run_dir, model_config=model_config, tokenizer_dir=tokenizer, device=torch.device(device))
    return run_dir


if __name__ == "__main__":  # the checkpoint writer starts worker processes
    main()
