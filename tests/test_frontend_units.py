"""Front-end pieces that need no Triton: tiny tokenizer, port checks, health, chat template."""

from __future__ import annotations

import asyncio
import socket
import time
from array import array
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from pytest_mtserve.server.openai_api import FrontEndServer, create_app
from pytest_mtserve.server.ports import PortInUseError, bind_listening_sockets, ensure_port_free, pick_free_port
from pytest_mtserve.server.tiny_tokenizer import build_tiny_tokenizer
from pytest_mtserve.server.tokenizer import load_tokenizer
from pytest_mtserve.server.triton_binding import (
    RESPONSE_OUTPUT,
    TritonClient,
    TritonEngineServer,
    TritonInferenceError,
    TritonUnavailableError,
    _work_result,
)
from pytest_mtserve.server.work import TopLogprobTable, WorkItem, WorkResult



@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_tiny_tokenizer_builds_are_byte_identical(tokenizer_dir: Path, tmp_path: Path) -> None:
    build_tiny_tokenizer(tmp_path)
    names = sorted(p.name for p in tokenizer_dir.iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_tiny_tokenizer_loads_offline_with_expected_specials(tokenizer_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tokenizer) == 1000
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token is None
    text = "Question: What is 12 plus 30?\nAnswer: 42"
    ids = tokenizer(text)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # no BOS added
    assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_busy_port_is_named_with_the_fix(listener: int) -> None:
    with pytest.raises(PortInUseError) as raised:
        ensure_port_free("127.0.0.1", listener, "Triton HTTP", option="--triton-port")
    assert str(raised.value) == (
        f"port {listener} on 127.0.0.1 (Triton HTTP) is already in use; "
        "pass --triton-port 0 to pick a free one or stop the other process"
    )


def test_picked_port_is_free() -> None:
    ensure_port_free("127.0.0.1", pick_free_port("127.0.0.1"), "test")


def test_a_group_of_listening_sockets_shares_one_port_and_the_connections() -> None:
    group = bind_listening_sockets("127.0.0.1", 0, 3, "HTTP front end", option="--port")
    clients = []
    try:
        assert len({sock.getsockname() for sock in group}) == 1
        for sock in group:
            sock.listen()
        port = group[0].getsockname()[1]
        for _ in range(30):  # held open at once, as a client's pool of keep-alive connections
            clients.append(socket.create_connection(("127.0.0.1", port)))
        accepted = {index: 0 for index in range(len(group))}
        for index, sock in enumerate(group):
            sock.setblocking(False)
            while True:
                try:
                    sock.accept()[0].close()
                except BlockingIOError:
                    break
                accepted[index] += 1
        # one shared socket would let its first reader take all 30; the kernel spreads them
        assert sum(accepted.values()) == 30 and max(accepted.values()) < 30, accepted
    finally:
        for sock in [*group, *clients]:
            sock.close()


def test_a_port_another_group_listens_on_is_refused() -> None:
    # Another server of the same user on the same --port: joining its group would silently
    # split the connections between the two servers.
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    try:
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 \\(HTTP front end\\) is already in use; pass --port 0"):
            bind_listening_sockets("127.0.0.1", port, 2, "HTTP front end", option="--port")
    finally:
        other.close()


def test_triton_on_busy_port_fails_fast_naming_it(listener: int) -> None:
    server = TritonEngineServer(lambda items: [], max_batch_size=2, queue_delay_us=100, http_port=listener)
    started = time.monotonic()
    with pytest.raises(PortInUseError, match=f"port {listener} on 127.0.0.1 \\(Triton HTTP\\)"):
        server.start()
    assert time.monotonic() - started < 5


# What PyTriton's model load answers when the second instance lost the handshake race
# (the real text, trimmed; reproduced with a bound, not yet listening handshake socket).
LOST_HANDSHAKE = (
    "load failed for model 'mtserve_engine': version 1 is at UNAVAILABLE state: Internal: "
    "TritonModelException: Model initialize error: Traceback (most recent call last):\n"
    '  File "/tmp/folderDrhfO9/1/model.py", line 425, in initialize\n'
    "    inference_handler_config = get_config_from_handshake_server(handshake_socket)\n"
    '  File "/tmp/folderDrhfO9/1/communication.py", line 550, in get_config_from_handshake_server\n'
    "    sock.connect(socket_path.as_posix())\n"
    "ConnectionRefusedError: [Errno 111] Connection refused\n"
)
MISSING_MODULE = (
    "load failed for model 'mtserve_engine': version 1 is at UNAVAILABLE state: Internal: "
    "ModuleNotFoundError: No module named 'zmq'"
)


class FakeTriton:
    """pytriton.triton.Triton whose model load fails with the next of ``failures``."""

    def __init__(self, failures: list[str]) -> None:
        self._failures = failures
        self.stopped = False

    def run(self) -> None:
        from tritonclient.utils import InferenceServerException

        if self._failures:
            raise InferenceServerException(self._failures.pop(0), status="400")

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def fake_tritons(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Make TritonEngineServer start FakeTritons that fail with the given load errors, in
    order; returns the list of those started."""
    started: list[FakeTriton] = []

    def install(failures: list[str]) -> list[FakeTriton]:
        def bound_triton(self, port: int, workspace: Path) -> FakeTriton:
            started.append(FakeTriton(failures))
            return started[-1]

        monkeypatch.setattr(TritonEngineServer, "_bound_triton", bound_triton)
        monkeypatch.setattr(TritonEngineServer, "_workspace_parent", lambda self, home: tmp_path)
        monkeypatch.setenv("LD_LIBRARY_PATH", "")  # start() rewrites it
        return started

    return install


def test_a_load_that_lost_the_handshake_race_is_retried_once(fake_tritons, caplog) -> None:
    started = fake_tritons([LOST_HANDSHAKE])
    server = TritonEngineServer(lambda items: [], max_batch_size=2, queue_delay_us=100)
    server.start()
    try:
        assert len(started) == 2 and started[0].stopped and not started[1].stopped
        assert server.url.startswith("http://127.0.0.1:")
        assert "starting Triton once more" in caplog.text
    finally:
        server.stop()


def test_a_handshake_race_lost_twice_is_a_clear_error(fake_tritons, tmp_path: Path) -> None:
    started = fake_tritons([LOST_HANDSHAKE, LOST_HANDSHAKE, LOST_HANDSHAKE])
    server = TritonEngineServer(lambda items: [], max_batch_size=2, queue_delay_us=100)
    second_failure = "(?s)could not load model 'mtserve_engine' on a second start either: .*ConnectionRefusedError"
    with pytest.raises(RuntimeError, match=second_failure):
        server.start()
    assert len(started) == 2 and all(triton.stopped for triton in started)
    assert list(tmp_path.iterdir()) == []  # both workspaces removed


def test_any_other_load_error_is_not_retried(fake_tritons) -> None:
    from tritonclient.utils import InferenceServerException

    started = fake_tritons([MISSING_MODULE])
    server = TritonEngineServer(lambda items: [], max_batch_size=2, queue_delay_us=100)
    with pytest.raises(InferenceServerException, match="No module named 'zmq'"):
        server.start()
    assert len(started) == 1 and started[0].stopped


class FakeClient:
    def __init__(self, ready: bool) -> None:
        self.is_ready = ready

    async def infer(self, items: list[WorkItem]) -> list[WorkResult]:
        return [WorkResult(output_tokens=[], finish_reason="length") for _ in items]

    async def ready(self) -> bool:
        return self.is_ready


def test_front_end_on_busy_port_fails_naming_it(server_tokenizer, listener: int) -> None:
    app = create_app(model_name="tiny", tokenizer=server_tokenizer, max_seq_length=64, client=FakeClient(True))
    with pytest.raises(PortInUseError, match=f"port {listener} on 127.0.0.1 \\(HTTP front end\\).*--port 0"):
        FrontEndServer(app, "127.0.0.1", listener).start()


def _call(app, path: str, body: dict | None = None) -> httpx.Response:
    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            if body is None:
                return await client.get(path)
            return await client.post(path, json=body)

    return asyncio.run(call())


@pytest.mark.parametrize(("warmed_up", "triton_ready"), [(False, True), (True, False)])
def test_health_is_503_until_warm_and_triton_ready(server_tokenizer, warmed_up: bool, triton_ready: bool) -> None:
    app = create_app(model_name="tiny", tokenizer=server_tokenizer, max_seq_length=64, client=FakeClient(triton_ready))
    app.state.warmed_up = warmed_up
    response = _call(app, "/v1/health")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "ServiceUnavailableError"


def test_health_is_200_when_warm_and_triton_ready(server_tokenizer) -> None:
    app = create_app(model_name="tiny", tokenizer=server_tokenizer, max_seq_length=64, client=FakeClient(True))
    app.state.warmed_up = True
    assert _call(app, "/v1/health").json() == {"status": "ok"}


def test_chat_without_template_is_a_clear_400(tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.chat_template = None
    app = create_app(model_name="tiny", tokenizer=tokenizer, max_seq_length=64, client=FakeClient(True))
    response = _call(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert "no chat template" in response.json()["error"]["message"]


def test_work_results_cross_the_wire_exactly() -> None:
    """Every log-prob comes back bit for bit, and None, {} and several alternatives stay apart."""
    result = WorkResult(
        output_tokens=[7, 8],
        finish_reason="stop",
        prompt_logprobs=[None, -0.1, -1e-300, -float("inf")],
        prompt_top_logprobs=[None, {3: -0.1}, {4: -1e-300, 131_071: -2.5}, {}],
        output_logprobs=[-0.30000000000000004, -7.0],
        output_top_logprobs=[{7: -0.30000000000000004}, {8: -7.0}],
        stop_string="\n",
    )
    assert WorkResult.from_json(result.to_json()) == result
    assert WorkResult.from_json(WorkResult(output_tokens=[], finish_reason="length").to_json()).prompt_logprobs is None


def test_a_table_filled_from_arrays_reads_and_crosses_the_wire_as_its_dicts() -> None:
    """Rank 0's form of a prompt's alternatives (flat arrays, as the engine reads them off the
    GPU) is the same sequence of dicts, indexed, sliced and sent."""
    ids, values = array("i", [5, 9, 2, 131_071]), array("d", [-0.25, -1e-300, -0.5, -7.0])
    table = TopLogprobTable.of_positions(ids.tobytes(), values.tobytes(), 2, first_missing=True)
    entries = [None, {5: -0.25, 9: -1e-300}, {2: -0.5, 131_071: -7.0}]
    assert list(table) == entries and len(table) == 3
    assert [table[i] for i in range(-3, 3)] == entries * 2 and table[1:] == entries[1:]
    assert list(TopLogprobTable.of_positions(b"", b"", 3, first_missing=False)) == [{}, {}, {}]
    result = WorkResult(output_tokens=[1], finish_reason="length", prompt_logprobs=[None, -1.0, -2.0], prompt_top_logprobs=table)
    assert WorkResult.from_json(result.to_json()).prompt_top_logprobs == entries
    assert result.to_json() == WorkResult(**{**vars(result), "prompt_top_logprobs": entries}).to_json()


def test_a_failed_batch_reaches_the_front_end_as_its_error() -> None:
    def body(row: str) -> dict:
        return {"outputs": [{"name": RESPONSE_OUTPUT, "data": [row]}]}

    with pytest.raises(TritonInferenceError, match="the engine failed: CUDA out of memory"):
        _work_result(body('{"error": "the engine failed: CUDA out of memory"}'))
    result = WorkResult(output_tokens=[1], finish_reason="length", output_logprobs=[-0.5])
    assert _work_result(body(result.to_json())) == result


def _infer_error(client: TritonClient) -> tuple[bool, str]:
    async def call() -> tuple[bool, str]:
        try:
            ready = await client.ready()
            with pytest.raises(TritonUnavailableError) as error:
                await client.infer([WorkItem(prompt_tokens=[1, 2], max_tokens=1)])
            return ready, str(error.value)
        finally:
            await client.aclose()

    return asyncio.run(call())


def test_triton_out_of_reach_is_an_unavailable_error_naming_its_url() -> None:
    url = f"http://127.0.0.1:{pick_free_port('127.0.0.1')}"
    ready, message = _infer_error(TritonClient(url, "mtserve_engine", timeout_s=5))
    assert not ready
    assert f"cannot reach Triton at {url}" in message


def test_triton_that_never_answers_times_out_naming_the_option(listener: int) -> None:
    url = f"http://127.0.0.1:{listener}"  # accepts connections, never answers
    ready, message = _infer_error(TritonClient(url, "mtserve_engine", timeout_s=0.5))
    assert not ready
    assert message == f"Triton at {url} did not answer within 0.5 s (the server's --request-timeout)"
