"""The real server (ranks, Triton, FastAPI) on the tiny checkpoint, over real HTTP."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
PROMPTS = [
    "Question: Which gas do plants take in?\nAnswer: carbon dioxide",
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Answer: 42",
]


def complete(server, **body) -> dict:
    response = requests.post(f"{server.url}/v1/completions", json={"model": server.model, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def echo_logprobs(server, prompt: str) -> list[float | None]:
    body = complete(server, prompt=prompt, max_tokens=1, logprobs=1, echo=True, temperature=0)
    return body["choices"][0]["logprobs"]["token_logprobs"]


def assert_close(left, right) -> None:
    assert len(left) == len(right)
    assert left[0] is None and right[0] is None
    assert max(abs(a - b) for a, b in zip(left[1:], right[1:])) <= TOLERANCE


def test_harness_log_likelihood_equals_the_models_own(tiny_server_tp1, local_model, tokenizer) -> None:
    """lm-eval sums token_logprobs[ctxlen:-1] of an echo response; check that against a plain forward."""
    context, continuation = "Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctxlen = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    served = sum(echo_logprobs(tiny_server_tp1, context + continuation)[ctxlen:-1])

    logits = local_model.logits(torch.tensor([whole]))[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    expected = sum(float(logprobs[i - 1, whole[i]]) for i in range(ctxlen, len(whole)))
    assert served == pytest.approx(expected, abs=TOLERANCE)


def test_tp2_matches_tp1(tiny_server_tp1, tiny_server_tp2) -> None:
    for prompt in PROMPTS:
        assert_close(echo_logprobs(tiny_server_tp2, prompt), echo_logprobs(tiny_server_tp1, prompt))


def test_sdpa_attention_serves_what_unfused_does(tiny_server_tp1, start_tiny_server) -> None:
    sdpa = start_tiny_server("--tp", "1", "--attention-backend", "sdpa")  # the GPU default, on the CPU here
    for prompt in PROMPTS:
        assert_close(echo_logprobs(sdpa, prompt), echo_logprobs(tiny_server_tp1, prompt))
    texts = [complete(s, prompt=PROMPTS[2], max_tokens=10, temperature=0)["choices"][0]["text"] for s in (sdpa, tiny_server_tp1)]
    assert texts[0] == texts[1]


def test_tp2_greedy_generation_matches_tp1(tiny_server_tp1, tiny_server_tp2) -> None:
    texts = [complete(s, prompt=PROMPTS[2], max_tokens=10, temperature=0, logprobs=1)["choices"][0] for s in (tiny_server_tp1, tiny_server_tp2)]
    assert texts[0]["text"] == texts[1]["text"]
    assert max(abs(a - b) for a, b in zip(texts[0]["logprobs"]["token_logprobs"], texts[1]["logprobs"]["token_logprobs"])) <= TOLERANCE


def test_results_do_not_depend_on_the_batch_under_concurrent_load(tiny_server_tp1) -> None:
    """16 concurrent clients with mixed lengths and sampling parameters get what they get alone."""
    requests_ = [
        dict(prompt=PROMPTS[i % len(PROMPTS)] + " x" * i, max_tokens=1 + i % 4, logprobs=2, echo=i % 2 == 0,
             temperature=0.0 if i % 3 else 0.8, seed=i, top_p=0.9 if i % 3 == 0 else 1.0)
        for i in range(16)
    ]  # fmt: skip
    alone = [complete(tiny_server_tp1, **body)["choices"][0] for body in requests_]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda body: complete(tiny_server_tp1, **body)["choices"][0], requests_ * 2))
    for index, choice in enumerate(together):
        reference = alone[index % 16]
        assert choice["text"] == reference["text"]
        got, want = choice["logprobs"]["token_logprobs"], reference["logprobs"]["token_logprobs"]
        assert max(abs((a or 0.0) - (b or 0.0)) for a, b in zip(got, want)) <= TOLERANCE


def test_seeded_sampling_is_reproducible_over_http(tiny_server_tp1) -> None:
    body = dict(prompt="Once upon a time", max_tokens=12, temperature=1.0, top_k=50, seed=2024)
    first = complete(tiny_server_tp1, **body)["choices"][0]["text"]
    assert complete(tiny_server_tp1, **body)["choices"][0]["text"] == first
    others = {complete(tiny_server_tp1, **{**body, "seed": seed})["choices"][0]["text"] for seed in range(3)}
    assert len(others | {first}) > 1


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "max_tokens": -1},
        {"prompt": "hi", "logprobs": 21},
        {"prompt": "word " * 5000, "max_tokens": 1},
        {"prompt": [[999999]], "max_tokens": 1},
        {"prompt": "hi", "model": "not-this-model"},
    ],
    ids=["negative-max-tokens", "too-many-logprobs", "prompt-too-long", "token-out-of-vocab", "unknown-model"],
)
def test_bad_input_gets_a_400_and_the_server_keeps_serving(tiny_server_tp2, body) -> None:
    response = requests.post(f"{tiny_server_tp2.url}/v1/completions", json={"model": tiny_server_tp2.model, **body}, timeout=60)
    assert response.status_code == 400
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    assert complete(tiny_server_tp2, prompt="still alive?", max_tokens=2)["choices"][0]["finish_reason"] in ("stop", "length")


def test_stopping_leaves_no_process_port_or_shared_memory(start_tiny_server) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    server = start_tiny_server("--tp", "2")
    port = int(server.url.rsplit(":", 1)[1])
    complete(server, prompt="hello", max_tokens=2)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 15
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    leftovers = {name for name in set(os.listdir("/dev/shm")) - shm_before if "pytrtion" in name or "triton" in name}
    assert not leftovers


def test_tp8_on_cpu_matches_tp1(tiny_server_tp1, start_tiny_server) -> None:
    """Eight gloo ranks (the headline --tp 8, without GPUs): the same log-probs as one rank."""
    tp8 = start_tiny_server("--tp", "8")
    try:
        for prompt in PROMPTS[:2]:
            assert_close(echo_logprobs(tp8, prompt), echo_logprobs(tiny_server_tp1, prompt))
    finally:
        tp8.stop()


def front_end_processes(server) -> list[psutil.Process]:
    return [
        child for child in psutil.Process(server.pid).children(recursive=True)
        if "pytest_mtserve.server.frontend_process" in " ".join(child.cmdline())
    ]


def front_end_process(server) -> psutil.Process:
    (frontend,) = front_end_processes(server)
    return frontend


def test_the_front_end_runs_in_its_own_process_without_torch(tiny_server_tp1) -> None:
    # Beside the engine it would hold the GIL that every kernel launch needs.
    frontend = front_end_process(tiny_server_tp1)
    assert frontend.pid != tiny_server_tp1.pid
    assert "libtorch" not in Path(f"/proc/{frontend.pid}/maps").read_text()
    assert complete(tiny_server_tp1, prompt="hello", max_tokens=1)["choices"][0]["text"] is not None


def test_front_end_processes_share_the_port_and_one_dying_stops_the_server(start_tiny_server) -> None:
    server = start_tiny_server("--tp", "1", "--frontend-processes", "2")
    frontends = front_end_processes(server)
    assert len(frontends) == 2
    # A new connection per request: the kernel spreads them over both processes.
    assert len({tuple(echo_logprobs(server, PROMPTS[0])) for _ in range(6)}) == 1
    connections = {f.pid: [c for c in f.net_connections() if c.status == psutil.CONN_LISTEN] for f in frontends}
    assert all(len(listening) == 1 for listening in connections.values())
    # each on a socket of its own, so the kernel spreads the connections (one shared socket
    # lets the first process to wake accept a whole burst of them)
    sockets = {os.readlink(f"/proc/{pid}/fd/{listening.fd}") for pid, (listening,) in connections.items()}
    assert len(sockets) == 2
    frontends[0].kill()
    psutil.Process(server.pid).wait(timeout=60)
    assert "the HTTP front end exited with code -9; stopping" in server.tail()
    frontends[1].wait(timeout=30)


def test_a_killed_server_takes_its_front_end_along(start_tiny_server) -> None:
    server = start_tiny_server("--tp", "1")
    frontend = front_end_process(server)
    os.kill(server.pid, 9)
    frontend.wait(timeout=30)  # psutil.TimeoutExpired if it outlived the server


def test_a_taken_front_end_port_is_one_line_naming_it(start_tiny_server) -> None:
    from pytest_mtserve.launcher import ServerStartError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerStartError) as raised:
            start_tiny_server("--tp", "1", "--port", str(port))
    assert f"error: port {port} on 127.0.0.1 (HTTP front end) is already in use; pass --port 0" in str(raised.value)
    assert "Traceback" not in str(raised.value)
