"""Log-prob scoring throughput through the full HTTP stack vs direct in-process engine calls.

The same seeded, MMLU- or ARC-shaped log-likelihood request stream (echo, max_tokens=1,
logprobs=1, prompts of varied length, in lm-eval's order) goes (a) straight into
``InferenceEngine.run`` in batches of ``--max-batch-size`` (the best batches Triton could
form), with shared prefixes packed as the server does and without, and (b) through a real
server (FastAPI -> PyTriton -> engine) from ``--clients`` concurrent keep-alive HTTP
clients; then (a) again in the batches each served round formed, which split some
questions' choices apart (their context then runs twice): served over that is the serving
stack's own cost; and (a) in its own batches once more beside those, so that a card that
warmed up or clocked down in between shows as drift, not as a cost of the batches. Warm-up requests are excluded from all. Throughput counts every request's
prompt tokens, whether a shared prefix was computed once or not. The last line printed is
served over direct.

    python benchmarks/serving_overhead.py [--checkpoint RUN_DIR] [--requests 384]
    python benchmarks/serving_overhead.py --device cuda --shape llama3-8b --peer-python python3

Without ``--checkpoint`` the tiny test checkpoint is written to a temporary folder; with
``--shape`` a random-weight checkpoint of that shape (``forward_perf.SHAPES``) is built
on the device. ``--peer-python`` also scores the stream in-process with Hugging Face
transformers (``hf_peer.py``, same shape, random weights, same batches: one row per
request, and as lm-eval's ``hf`` backend with its one-token-continuation cache) under that
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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_perf import SHAPES  # noqa: E402
from profile_threads import format_shares, thread_shares  # noqa: E402

from pytest_mtserve.server.batch_log import BatchTimes, parse_batch_lines  # noqa: E402
from pytest_mtserve.server.options import ATTENTION_CHOICES, CUDA_GRAPH_CHOICES  # noqa: E402
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
    # each HTTP front end's share of their CPU, largest first: the kernel hands every client
    # connection to one front end, which answers all its requests for the whole round.
    front_end_shares: tuple[float, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def cpu_ms_per_1k_tokens(self) -> dict[str, float]:
        return {role: 1e6 * seconds / self.tokens for role, seconds in self.cpu_s.items()}


STREAMS = ("mmlu", "arc")


def build_request_stream(tokenizer: ServerTokenizer, count: int, seed: int, stream: str = "mmlu") -> list[ScoringRequest]:
    """Log-likelihood requests as lm-eval sends them: each question's context once per answer
    choice (4 each), all requests in lm-eval's order (longest first, then by token ids).

    ``mmlu``: the choices are listed in the context and the continuation is a letter (" A"),
    so a question's four requests differ in their last token. ``arc``: the continuation is the
    choice's own text (1-6 words), so they differ in length and lm-eval's order scatters them.
    """
    rng = random.Random(seed)
    requests: list[ScoringRequest] = []
    while len(requests) < count:
        context = _question_context(tokenizer, rng)
        choices = [" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for _ in CHOICE_LABELS]
        if stream == "mmlu":
            listed = "".join(f"\n{label}. {choice}" for label, choice in zip(CHOICE_LABELS, choices))
            texts = [f"{context}{listed}\nAnswer: {label}" for label in CHOICE_LABELS]
        else:
            texts = [f"{context}\nAnswer: {choice}" for choice in choices]
        requests += [ScoringRequest(text, tokenizer.encode(text)) for text in texts]
    return sorted(requests[:count], key=lambda r: (-len(r.token_ids), r.token_ids))  # lm-eval's Collator


def _question_context(tokenizer: ServerTokenizer, rng: random.Random) -> str:
    # Log-uniform lengths: many short zero-shot questions, fewer long few-shot contexts.
    target = int(MIN_PROMPT_TOKENS * (MAX_PROMPT_TOKENS / MIN_PROMPT_TOKENS) ** rng.random())
    text = "The following are multiple choice questions (with answers).\nQuestion:"
    while len(tokenizer.encode(text)) < target:
        text += " " + " ".join(rng.choices(WORDS, k=16))
    return text


def warmup_and_timed(tokenizer: ServerTokenizer, requests: int, seed: int, stream: str) -> tuple[list[ScoringRequest], list[ScoringRequest]]:
    """Warm-up requests (of another seed, so they are not the timed stream's longest) and the timed ones."""
    return build_request_stream(tokenizer, WARMUP_REQUESTS, seed + 1, stream), build_request_stream(tokenizer, requests, seed, stream)


def completion_body(request: ScoringRequest, model: str) -> dict[str, Any]:
    """The body lm-eval's local-completions sends for one log-likelihood request."""
    return {"model": model, "prompt": request.text, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "stream": False, "seed": 1234, "echo": True}  # fmt: skip


def in_batches(requests: Sequence[ScoringRequest], batch_size: int) -> list[Sequence[ScoringRequest]]:
    """Consecutive batches in stream order, as direct scoring and the peer run them."""
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]


def in_sized_batches(requests: Sequence[ScoringRequest], sizes: Sequence[int]) -> list[Sequence[ScoringRequest]]:
    """Consecutive batches of ``sizes`` in stream order: the batches a served round formed, as
    near as the clients' order tells (they send in stream order, answers come back per batch)."""
    starts = [0, *accumulate(sizes)]
    return [requests[start:end] for start, end in zip(starts, starts[1:])]


def total_tokens(requests: Sequence[ScoringRequest]) -> int:
    return sum(len(r.token_ids) for r in requests)


# --- (a) direct engine calls ------------------------------------------------------------------


Scorer = Callable[[Sequence[ScoringRequest]], list[list[float | None]]]


def direct_scorers(checkpoint: Path, args: argparse.Namespace, tokenizer: ServerTokenizer) -> dict[str, Scorer]:
    """Loads the model here (TP1); each scorer runs one engine batch and returns prompt
    log-probs: "direct" as the server's engine runs (shared prefixes packed), "direct,
    unshared" with ``share_prefixes=False``, on the same model."""
    from pytest_mtserve.server.engine import InferenceEngine
    from pytest_mtserve.server.local_model import load_model
    from pytest_mtserve.server.work import WorkItem

    local = load_model(checkpoint, device=args.device, attention_backend=args.attention_backend, cuda_graphs=args.cuda_graphs)

    def scorer(share_prefixes: bool) -> Scorer:
        engine = InferenceEngine(
            local.runner, is_leader=True, share_tokens=lambda t: t, eos_token_ids=set(), detokenizer=tokenizer,
            share_prefixes=share_prefixes,
        )  # fmt: skip

        def score(batch: Sequence[ScoringRequest]) -> list[list[float | None]]:
            items = [WorkItem(prompt_tokens=r.token_ids, max_tokens=1, logprobs=1, echo=True) for r in batch]
            return [result.prompt_logprobs for result in engine.run(items)]

        return score

    return {"direct": scorer(True), "direct, unshared": scorer(False)}


def model_tokens_per_scored_token(batches: Sequence[Sequence[ScoringRequest]]) -> float:
    """Tokens the packed prefills run per prompt token scored, in ``batches``: a question's
    context is computed once per batch that holds any of its choices."""
    from pytest_mtserve.server.shared_prefix import pack_prompts

    packed = sum(len(pack) for batch in batches for pack in pack_prompts([r.token_ids for r in batch]))
    return packed / sum(total_tokens(batch) for batch in batches)


def measure_direct(score: Callable, batches: Sequence[Sequence[ScoringRequest]]) -> Throughput:
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in batches:
        score(batch)
    cpu = {"engine": time.process_time() - cpu_started}
    return Throughput(sum(total_tokens(batch) for batch in batches), time.perf_counter() - started, cpu)


# --- (b) through the HTTP stack ---------------------------------------------------------------


class HttpClients:
    """``clients`` concurrent keep-alive HTTP clients, spread over ``processes`` processes,
    each process one asyncio loop on aiohttp that parses every response's JSON: lm-eval's
    API client (``num_concurrent`` tasks on one ``aiohttp`` session). The clients of all
    processes take requests from one shared counter, so requests leave in stream order as
    answers free the clients, as lm-eval's client sends them (its tasks wait on one
    semaphore in order): a question's choices, neighbours in the stream, reach the server
    together. (Before, each client was a thread with an ``httpx.Client``: pure-Python HTTP
    and threads fighting over one GIL took 74-81 ms of CPU per 1k tokens on a 16-core GPU
    host, 25x these clients, for the same served throughput: docs/performance.md.)"""

    def __init__(self, url: str, model: str, clients: int, processes: int) -> None:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        if clients % processes:
            raise SystemExit(f"--clients ({clients}) must be a multiple of --client-processes ({processes})")
        self.url, self.model, self.processes, self.clients_per_process = url, model, processes, clients // processes
        # spawn: the parent holds CUDA and the engine's threads, which fork does not survive.
        context = get_context("spawn")
        self._next_request = context.Value("q", 0)
        self._pool = ProcessPoolExecutor(
            max_workers=processes, mp_context=context, initializer=share_counter, initargs=(self._next_request,)
        )

    def measure(self, server_pid: int, requests: Sequence[ScoringRequest]) -> Throughput:
        bodies = [completion_body(request, self.model) for request in requests]
        self._next_request.value = 0
        server_cpu_started = server_cpu_by_process(server_pid)
        started = time.perf_counter()
        outcomes = list(
            self._pool.map(post_all, [self.url] * self.processes, [bodies] * self.processes, [self.clients_per_process] * self.processes)
        )
        elapsed = time.perf_counter() - started
        failures = [failure for _, process_failures in outcomes for failure in process_failures]
        if failures:
            raise RuntimeError(f"{len(failures)} served requests failed; the first: {failures[0]}")
        used = {pid: (role, seconds - server_cpu_started.get(pid, (role, 0.0))[1])
                for pid, (role, seconds) in server_cpu_by_process(server_pid).items()}  # fmt: skip
        cpu = {role: sum(seconds for used_role, seconds in used.values() if used_role == role) for role in SERVER_ROLES}
        cpu["HTTP clients"] = sum(cpu_s for cpu_s, _ in outcomes)
        front_ends = sorted((seconds for role, seconds in used.values() if role == "front ends"), reverse=True)
        shares = tuple(seconds / sum(front_ends) for seconds in front_ends) if sum(front_ends) > 0 else ()
        return Throughput(total_tokens(requests), elapsed, cpu, shares)

    def close(self) -> None:
        self._pool.shutdown()


_next_request: Any = None  # in a client process: the index of the next request to send, shared by all


def share_counter(counter: Any) -> None:
    global _next_request
    _next_request = counter


def post_all(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[float, list[str]]:
    """In a client process: ``clients`` concurrent requests over one aiohttp session send the
    bodies the shared counter hands them; returns this process's CPU seconds and the failures."""
    import asyncio

    import aiohttp

    failures: list[str] = []

    def next_body() -> dict[str, Any] | None:
        with _next_request.get_lock():
            index = _next_request.value
            _next_request.value = index + 1
        return bodies[index] if index < len(bodies) else None

    async def client_loop(session: aiohttp.ClientSession) -> None:
        while (body := next_body()) is not None and not failures:
            async with session.post(f"{url}/v1/completions", json=body) as response:
                if response.status != 200:
                    failures.append(f"HTTP {response.status}: {(await response.text())[:300]}")
                else:
                    await response.json()

    async def send_all() -> None:
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
            await asyncio.gather(*(client_loop(session) for _ in range(clients)))

    cpu_started = time.process_time()
    asyncio.run(send_all())
    return time.process_time() - cpu_started, failures


SERVER_ROLES = ("front ends", "engine ranks", "tritonserver + stub")


def server_cpu_by_process(server_pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of each of the server's processes, with its role: an HTTP front end,
    an engine rank (Triton callable and engine; the launching process too) or tritonserver
    with its Python backend stub."""
    import psutil

    root = psutil.Process(server_pid)
    used = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            times, name, command = process.cpu_times(), process.name(), " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        role = "tritonserver + stub" if "triton" in name else "front ends" if "frontend_process" in command else "engine ranks"
        used[process.pid] = (role, times.user + times.system)
    return used


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
    from pytest_mtserve.launcher import ServerSettings, queue_delay_for, server_command, start_server

    settings = ServerSettings(checkpoint=checkpoint, device=args.device, max_batch_size=args.max_batch_size, python=args.server_python,
                              queue_delay_us=queue_delay_for(args.clients, args.max_batch_size))  # as the plugin's
    command = [*server_command(settings), f"--attention-backend={args.attention_backend}", f"--cuda-graphs={args.cuda_graphs}",
               "--log-batches", *args.server_arg]  # fmt: skip
    return start_server(command, log_dir / "server.log", timeout_s=600)


def run(args: argparse.Namespace, checkpoint: Path, scratch: Path) -> float:
    from pytest_mtserve.server.checkpoint import locate_checkpoint

    tokenizer = load_tokenizer(locate_checkpoint(checkpoint).tokenizer_dir)
    warmup, timed = warmup_and_timed(tokenizer, args.requests, args.seed, args.stream)
    lengths = [len(r.token_ids) for r in timed]
    print(f"stream ({args.stream}, lm-eval's order): {len(timed)} requests, {total_tokens(timed)} prompt tokens, length "
          f"min {min(lengths)} / median {int(statistics.median(lengths))} / max {max(lengths)}; packed prefills run "
          f"{model_tokens_per_scored_token(in_batches(timed, args.max_batch_size)):.3f} tokens per scored token in batches of {args.max_batch_size}")  # fmt: skip

    server = start_server_for(checkpoint, scratch, args)
    clients = HttpClients(server.url, server.model, args.clients, args.client_processes)
    try:
        scorers = direct_scorers(checkpoint, args, tokenizer)
        for score in scorers.values():
            measure_direct(score, in_batches(warmup, args.max_batch_size))
        clients.measure(server.pid, warmup)
        difference = max(
            largest_difference(served_logprobs(server.url, server.model, r), scorer([r])[0])
            for r in timed[:CORRECTNESS_SAMPLE]
            for scorer in scorers.values()
        )
        packed_difference = max(
            largest_difference(shared, unshared)
            for shared, unshared in zip(scorers["direct"](timed[:CORRECTNESS_SAMPLE]), scorers["direct, unshared"](timed[:CORRECTNESS_SAMPLE]))
        )
        print(f"served vs direct log-probs: largest difference {difference:.2e} over {CORRECTNESS_SAMPLE} requests; "
              f"packed vs unshared batch of {CORRECTNESS_SAMPLE}: {packed_difference:.2e}")  # fmt: skip
        runs: dict[str, list[Throughput]] = {name: [] for name in [*scorers, "served"]}
        served_rounds: list[tuple[float, float]] = []  # time.monotonic(), the clock of the server's batch log
        for round_index in range(args.rounds):  # interleaved, so drift on a shared machine hits all alike
            for name, score in scorers.items():
                runs[name].append(measure_direct(score, in_batches(timed, args.max_batch_size)))
            with profiled_round(args, server.pid, round_index):
                started = time.monotonic()
                runs["served"].append(clients.measure(server.pid, timed))
                served_rounds.append((started, time.monotonic()))
    finally:
        clients.close()
        server.stop()
    batches = parse_batch_lines(server.log_path.read_text(errors="replace").splitlines())
    for round_index, (started, ended) in enumerate(served_rounds):
        print(f"served round {round_index + 1}, the server's batches: {summarize_batches(batches, started, ended, args.max_batch_size)}")
    runs["direct, served batches"] = measure_served_batches(scorers["direct"], timed, batches, served_rounds)
    # direct's own batches once more, now beside those reruns: a card that has warmed up or
    # clocked down since the interleaved rounds shows here, not as a cost of the batches
    runs["direct, after the server"] = [measure_direct(scorers["direct"], in_batches(timed, args.max_batch_size)) for _ in served_rounds]
    peer = run_peer(args, checkpoint, scratch) if args.peer_python else None
    return report(runs, peer, args)


def measure_served_batches(
    score: Scorer, timed: Sequence[ScoringRequest], batches: Sequence[BatchTimes], served_rounds: Sequence[tuple[float, float]]
) -> list[Throughput]:
    """Direct scoring in the batches each served round formed: a batch boundary inside a
    question computes its context twice, which direct's aligned batches of the stream never
    do, so this separates that cost from the serving stack's own."""
    measured = []
    for round_index, (started, ended) in enumerate(served_rounds):
        sizes = [batch.requests for batch in batches if started <= batch.left <= ended]
        if sum(sizes) != len(timed):
            print(f"served round {round_index + 1}: its batches hold {sum(sizes)} of {len(timed)} requests; not rerun direct")
            continue
        served_batches = in_sized_batches(timed, sizes)
        print(f"served round {round_index + 1}: packed prefills run {model_tokens_per_scored_token(served_batches):.3f} tokens per scored token in its batches")
        measured.append(measure_direct(score, served_batches))
    return measured


def summarize_batches(batches: Sequence[BatchTimes], started: float, ended: float, max_batch_size: int) -> str:
    """How full the batches that left the engine between ``started`` and ``ended`` were, and
    where their time went (the server's ``--log-batches`` lines)."""
    inside = [batch for batch in batches if started <= batch.left <= ended]
    if not inside:
        return "none logged"
    count = len(inside)
    engine_ms = sum(batch.engine_ms for batch in inside)
    wait_ms = sum(batch.wait_ms for batch in inside)
    around_ms = sum(batch.callable_ms for batch in inside) - engine_ms - wait_ms
    idle = [batch.idle_ms for batch in inside[1:] if batch.idle_ms is not None]  # the first one's began before the round
    return (f"{count}, {sum(batch.requests for batch in inside) / count:.1f} requests on average (at most {max_batch_size}); "
            f"per batch: engine {engine_ms / count:.1f} ms, waiting for it {wait_ms / count:.1f} ms, the callable around "
            f"them {around_ms / count:.1f} ms, engine idle before it {statistics.fmean(idle) if idle else 0.0:.1f} ms; engine busy {engine_ms / (10 * (ended - started)):.0f} % of the round; "
            f"sizes in order: {' '.join(str(batch.requests) for batch in inside)}")  # fmt: skip


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
        code = recorder.wait(timeout=60)
        if out.exists():
            print(f"py-spy profile of served round {round_index} ({kind} threads): {out}; the server process's threads:")
            with out.open(errors="replace") as profile:
                print(format_shares(thread_shares(profile, server_pid), top=5) or "  no samples")
        else:  # py-spy could not attach (no ptrace there?); the round's numbers still count
            print(f"py-spy wrote no profile of served round {round_index} (exit code {code})")


def run_peer(args: argparse.Namespace, checkpoint: Path, scratch: Path) -> dict[str, float]:
    """Tokens/s of Hugging Face transformers on the same stream, in its own interpreter, by mode."""
    result = scratch / "peer.json"
    peer = Path(__file__).with_name("hf_peer.py")
    subprocess.run([args.peer_python, str(peer), "--checkpoint", str(checkpoint), "--requests", str(args.requests),
                    "--seed", str(args.seed), "--stream", args.stream, "--batch-size", str(args.max_batch_size),
                    "--rounds", str(args.rounds), "--out", str(result)], check=True)  # fmt: skip
    return json.loads(result.read_text())["tokens_per_s"]


def report(runs: dict[str, list[Throughput]], peer: dict[str, float] | None, args: argparse.Namespace) -> float:
    """Scored prompt tokens per second: every request's tokens count, computed once or not."""
    runs = {name: measured for name, measured in runs.items() if measured}  # a rerun may have had no round to rerun
    for name, measured in runs.items():
        label = f"served ({args.clients} clients in {args.client_processes} processes)" if name == "served" else name
        print(f"{label:<20} tokens/s per round: {', '.join(f'{t.tokens_per_s:,.0f}' for t in measured)}")
        print(f"{'':<20} CPU ms per 1k tokens (median round): {_median_cpu(measured)}")
        for round_index, run in enumerate(measured):
            if run.front_end_shares:
                shares = " / ".join(f"{100 * share:.0f}" for share in run.front_end_shares)
                print(f"{'':<20} round {round_index + 1}: each front end's % of the front ends' CPU: {shares}")
    best = {name: max(t.tokens_per_s for t in measured) for name, measured in runs.items()}
    for name, rate in best.items():
        batches = f" (batches of {args.max_batch_size})" if name in ("direct", "direct, unshared", "direct, after the server") else ""
        print(f"{name} (best round): {rate:,.0f} tokens/s{batches}")
    print(f"direct / direct, unshared = {best['direct'] / best['direct, unshared']:.3f}")
    for mode, rate in (peer or {}).items():
        print(f"Hugging Face transformers in-process, {mode} (best round): {rate:,.0f} tokens/s (batches of {args.max_batch_size})")
        print(f"served / transformers, {mode} = {best['served'] / rate:.3f}")
    if "direct, served batches" in best:
        print(f"served / direct, served batches = {best['served'] / best['direct, served batches']:.3f} (the serving stack alone)")
        print(f"direct, served batches / direct, after the server = "
              f"{best['direct, served batches'] / best['direct, after the server']:.3f} (the served batches' own cost)")  # fmt: skip
    ratio = best["served"] / best["direct"]
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
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_CHOICES,
                        help="core attention of both paths, as the server's option (default: auto)")
    parser.add_argument("--cuda-graphs", default="auto", choices=CUDA_GRAPH_CHOICES, help="CUDA graphs of both paths, as the server's option (default: auto)")
    parser.add_argument("--server-python", default=sys.executable, help="interpreter of the server (default: this one)")
    parser.add_argument("--peer-python", help="also measure Hugging Face transformers under this interpreter (cuda)")
    parser.add_argument("--requests", type=int, default=384, help="timed requests per round (default: 384)")
    parser.add_argument("--rounds", type=int, default=2, help="direct/served measurement rounds (default: 2)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (default: 16)")
    parser.add_argument("--client-processes", type=int, default=1, help="processes the clients are spread over, one asyncio loop each (default: 1)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="server and direct batch size (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request stream (default: 0)")
    parser.add_argument("--stream", default="mmlu", choices=STREAMS, help="continuations: letters (mmlu, default) or choice texts (arc)")
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
