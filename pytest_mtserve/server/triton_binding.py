"""PyTriton in front of the engine, and the async client the HTTP front end uses to reach it.

Every Triton row is one ``WorkItem`` as JSON bytes and comes back as one ``WorkResult`` as
JSON bytes, so rows of different lengths share a dynamic batch without padding each other.

Triton runs several instances of the model, each handing its batches to the one engine in
turn: while the engine runs a batch, the next one already crosses from tritonserver into
this process and is decoded, instead of the engine waiting idle for that trip after each
batch (25-28 ms per batch of 32 at 8B on an H200 host, docs/performance.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .batch_log import BatchLog, EngineTurn
from .ports import ensure_port_free, pick_free_port
from .work import WorkItem, WorkResult

LOGGER = logging.getLogger(__name__)

RunBatch = Callable[[list[WorkItem]], list[WorkResult]]

REQUEST_INPUT = "request"
RESPONSE_OUTPUT = "response"
ERROR_KEY = "error"  # a response row {"error": "..."} reports that the engine failed on its batch
# How long tritonserver may take to stop. It must exceed the Python backend's model unload
# (~2.5 s measured), else tritonserver exits at once and leaves its /dev/shm regions behind.
# Open keep-alive connections make it wait the whole time: close clients before stopping.
EXIT_TIMEOUT_S = 8
WORKSPACE_PREFIX = "mtserve_triton_"
# PyTriton puts its IPC sockets in the workspace. A Unix socket path is at most 107 bytes;
# a longer one (a deep $HOME, as under pytester) fails deep inside the Python backend, as
# an EOFError while Triton loads the model.
MAX_UNIX_SOCKET_PATH = 107
# PyTriton passes tensors between tritonserver's Python backend and this process through a
# shared-memory TensorStore whose block manager takes one RPC per tensor released; our rows
# are a few kB of JSON, which its inline base64 transport carries for ~10 % less server CPU
# per token (measured on an H200 host, docs/performance.md). Read by both ends at start-up.
INLINE_TENSORS_VARIABLE = "PYTRITON_NO_TENSORSTORE"
# Each model instance but the first asks the first one's handshake server for its config
# (PyTriton 0.7.0 proxy/model.py:425). It connects as soon as the socket file exists
# (proxy/communication.py:545-550), but asyncio creates that file on bind() and listens
# only afterwards (asyncio/unix_events.py:317, base_events.py:315): a connection in between
# is refused. It also gives up if the file takes over 1 s to appear. Only a loaded machine
# is that slow at start-up; a start in a fresh workspace passes.
HANDSHAKE_FUNCTION = "get_config_from_handshake_server"
HANDSHAKE_RACE_ERRORS = ("ConnectionRefusedError:", "TimeoutError: Timeout occurred while waiting for config file")


class TritonUnavailableError(RuntimeError):
    """Triton could not be reached (not started yet, or stopped)."""


class TritonInferenceError(RuntimeError):
    """Triton answered a request with an error (the engine failed on its batch)."""


class TritonEngineServer:
    """Serves ``run_batch`` as a PyTriton model with dynamic batching, through ``instances``
    Triton model instances that call it one batch at a time."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        triton_model_name: str = "mtserve_engine",
        max_batch_size: int,
        queue_delay_us: int,
        instances: int = 2,
        host: str = "127.0.0.1",
        http_port: int = 0,
        batch_log: BatchLog | None = None,
    ) -> None:
        self._batch_log = batch_log
        self.triton_model_name = triton_model_name
        self._max_batch_size = max_batch_size
        self._queue_delay_us = queue_delay_us
        self._instances = instances
        self._engine = _SharedEngine(run_batch)
        self._host = host
        self._requested_port = http_port
        self._triton: Any = None  # pytriton.triton.Triton once started
        self._workspace_root: Path | None = None
        self.url = ""

    def start(self) -> None:
        """Start tritonserver and return once the model is ready.

        Call from the main thread: tritonserver gets a parent-death signal tied to the
        thread that starts it, so a short-lived thread would take the server down with it.
        """
        port = self._requested_port or pick_free_port(self._host)
        ensure_port_free(self._host, port, "Triton HTTP", option="--triton-port")
        from pytriton.constants import PYTRITON_HOME  # after the check: importing takes seconds

        _put_own_libpython_first()
        parent = self._workspace_parent(PYTRITON_HOME)
        parent.mkdir(parents=True, exist_ok=True)
        try:
            self._run_triton(port, parent)
        except Exception as error:
            if not _lost_handshake_race(error):
                raise
            LOGGER.warning(
                "Triton could not load model %r: one of its instances reached PyTriton's handshake "
                "socket before it listened (a start-up race under load); starting Triton once more",
                self.triton_model_name,
            )
            self._run_again(port, parent)
        self.url = f"http://{self._host}:{port}"

    def _run_again(self, port: int, parent: Path) -> None:
        try:
            self._run_triton(port, parent)
        except Exception as error:
            raise RuntimeError(
                f"Triton could not load model {self.triton_model_name!r} on a second start either: {error}"
            ) from error

    def _run_triton(self, port: int, parent: Path) -> None:
        """Start tritonserver in a fresh workspace and load the model; stop it all on failure.

        Fresh, because the first instance's handshake socket file outlives a failed load
        (Python 3.11's asyncio never removes it), and a reload could be refused on it again."""
        self._workspace_root = Path(tempfile.mkdtemp(prefix=WORKSPACE_PREFIX, dir=parent))
        try:
            self._triton = self._bound_triton(port, self._workspace_root / "workspace")
            self._triton.run()
        except BaseException:
            self.stop()
            raise

    def _workspace_parent(self, pytriton_home: Path) -> Path:
        """``PYTRITON_HOME``, or the system's temporary directory where the home's path is
        too long for the workspace's sockets."""
        for parent in (pytriton_home, Path(tempfile.gettempdir())):
            # mkdtemp adds 8 characters; the longest socket is the model instance's.
            socket = parent / f"{WORKSPACE_PREFIX}{'x' * 8}/workspace/{self.triton_model_name}_0_0-server.sock"
            if len(os.fsencode(socket)) <= MAX_UNIX_SOCKET_PATH:
                return parent
        raise RuntimeError(
            f"the Triton workspace's socket paths would exceed {MAX_UNIX_SOCKET_PATH} bytes under "
            f"PYTRITON_HOME ({pytriton_home}) and the temporary directory; set PYTRITON_HOME "
            "or TMPDIR to a short path"
        )

    def _bound_triton(self, port: int, workspace: Path) -> Any:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        os.environ[INLINE_TENSORS_VARIABLE] = "1"  # tritonserver and its stub inherit it
        config = TritonConfig(
            http_address=self._host,
            http_port=port,
            allow_grpc=False,
            allow_metrics=False,
            exit_timeout_secs=EXIT_TIMEOUT_S,
        )
        triton = Triton(config=config, workspace=workspace)
        triton.bind(
            model_name=self.triton_model_name,
            infer_func=[self._make_infer_func() for _ in range(self._instances)],
            inputs=[Tensor(name=REQUEST_INPUT, dtype=bytes, shape=(1,))],
            outputs=[Tensor(name=RESPONSE_OUTPUT, dtype=bytes, shape=(1,))],
            config=ModelConfig(
                max_batch_size=self._max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=self._queue_delay_us),
            ),
            strict=True,
        )
        return triton

    def stop(self) -> None:
        """Stop tritonserver and remove its workspace; safe to call twice."""
        if self._triton is not None:
            self._triton.stop()
            self._triton = None
        if self._workspace_root is not None:
            # PyTriton's own cleanup skips hidden files (its IPC sockets) and then leaves the
            # directory (~22 MB of tritonserver copy) until garbage collection.
            shutil.rmtree(self._workspace_root, ignore_errors=True)
            self._workspace_root = None

    def _make_infer_func(self) -> Callable[..., dict[str, Any]]:
        import numpy as np
        from pytriton.decorators import batch

        batch_log, engine = self._batch_log, self._engine

        @batch
        def infer(**inputs: Any) -> dict[str, Any]:
            entered = time.monotonic()
            items = [WorkItem.from_json(row[0]) for row in inputs[REQUEST_INPUT]]
            outcome, turn = engine.run(items)
            rows = [[row.encode()] for row in _response_rows(outcome, len(items))]
            response = {RESPONSE_OUTPUT: np.array(rows, dtype=object)}
            if batch_log is not None:
                batch_log.record(len(items), entered, turn)
            return response

        return infer


class _SharedEngine:
    """The one engine behind every Triton instance: a batch at a time, each turn timed."""

    def __init__(self, run_batch: RunBatch) -> None:
        self._run_batch = run_batch
        self._lock = threading.Lock()
        self._previous_finished: float | None = None

    def run(self, items: list[WorkItem]) -> tuple[list[WorkResult] | Exception, EngineTurn]:
        with self._lock:
            started = time.monotonic()
            outcome = self._outcome(items)
            finished = time.monotonic()
            idle_s = None if self._previous_finished is None else started - self._previous_finished
            self._previous_finished = finished
        return outcome, EngineTurn(started, finished, idle_s)

    def _outcome(self, items: list[WorkItem]) -> list[WorkResult] | Exception:
        # An engine failure becomes an error row for each request of this batch: the clients
        # get a short message (the traceback stays in this process's log) and Triton keeps serving.
        try:
            results = self._run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        except Exception as error:
            LOGGER.exception("the engine failed on a batch of %d items", len(items))
            return error
        return results


def _response_rows(outcome: list[WorkResult] | Exception, count: int) -> list[str]:
    if isinstance(outcome, Exception):
        return [json.dumps({ERROR_KEY: f"the engine failed: {outcome!r}"})] * count
    return [result.to_json() for result in outcome]


def _lost_handshake_race(error: Exception) -> bool:
    """Whether Triton's model load failed only because an instance lost the handshake race."""
    from tritonclient.utils import InferenceServerException

    text = str(error)
    return (
        isinstance(error, InferenceServerException)
        and HANDSHAKE_FUNCTION in text
        and any(race_error in text for race_error in HANDSHAKE_RACE_ERRORS)
    )


def _put_own_libpython_first() -> None:
    # The Python backend stub loads libpython by the search path; without this it can pick
    # the system's libpython of another patch release and fail to load the model.
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


class TritonClient:
    """Async KServe-v2 HTTP/JSON client for the engine model.

    ``infer`` sends one Triton request per item, concurrently, so Triton's dynamic batcher
    can put rows from different HTTP requests into the same batch. It runs on aiohttp:
    httpx's pure-Python HTTP took ~1.6 ms of the front end's CPU per request against
    aiohttp's ~0.3 ms, and a front end answers a whole batch's requests at once; with
    uvicorn on httptools, served scoring on an H200 rose 1.16-1.22x (docs/performance.md).
    """

    def __init__(self, url: str, triton_model_name: str, timeout_s: float) -> None:
        self._url = url
        self._model_url = f"{url}/v2/models/{triton_model_name}"
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def infer(self, items: list[WorkItem]) -> list[WorkResult]:
        return list(await asyncio.gather(*(self._infer_one(item) for item in items)))

    async def ready(self) -> bool:
        try:
            async with self._http().get(f"{self._model_url}/ready") as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def aclose(self) -> None:
        # Open keep-alive connections would make tritonserver wait on stop.
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the event loop it was made in, uvicorn's.
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self._session

    async def _infer_one(self, item: WorkItem) -> WorkResult:
        body = {
            "inputs": [{"name": REQUEST_INPUT, "shape": [1, 1], "datatype": "BYTES", "data": [item.to_json()]}],
            "outputs": [{"name": RESPONSE_OUTPUT}],
        }
        try:
            async with self._http().post(f"{self._model_url}/infer", json=body) as response:
                status, payload = response.status, await response.read()
        except asyncio.TimeoutError:  # first: aiohttp's socket timeouts are ClientErrors too
            raise TritonUnavailableError(
                f"Triton at {self._url} did not answer within {self._timeout_s:g} s (the server's --request-timeout)"
            ) from None
        except aiohttp.ClientError as error:
            raise TritonUnavailableError(f"cannot reach Triton at {self._url}: {error!r}") from None
        if status != 200:
            raise TritonInferenceError(f"Triton answered {status}: {_error_text(payload)}")
        return _work_result(json.loads(payload))


def _work_result(body: dict[str, Any]) -> WorkResult:
    (output,) = (o for o in body["outputs"] if o["name"] == RESPONSE_OUTPUT)
    (row,) = output["data"]
    data = json.loads(row)
    if ERROR_KEY in data:
        raise TritonInferenceError(data[ERROR_KEY])
    return WorkResult.from_dict(data)


def _error_text(payload: bytes) -> str:
    try:
        return str(json.loads(payload).get("error", payload.decode(errors="replace")))
    except (ValueError, AttributeError):
        return payload.decode(errors="replace")
