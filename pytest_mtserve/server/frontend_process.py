"""The HTTP front end in a process of its own, beside rank 0's engine.

Rank 0's engine launches its GPU work from Python, and every PyTorch call lets go of the
GIL and takes it back. A front end in the same process (parsing, tokenizing, building
responses for every request in flight) holds the GIL in between, so each kernel launch
waits for it and the GPU with it. The front end reaches Triton over HTTP anyway, so here
it runs in interpreters of its own; they never import torch.

Parsing, tokenizing and building the responses of echoed log-probs cost milliseconds of
Python per request, so one process caps a fast engine at a few hundred requests per
second. Several processes listen on one port, each on a socket of its own that rank 0
binds before they start (``SO_REUSEPORT``); the kernel spreads new connections over them.

    python -m pytest_mtserve.server.frontend_process SETTINGS_JSON LISTEN_FD READY_FD PARENT_PID

is what :class:`FrontEndProcesses` starts: each child writes one JSON line to ``READY_FD``,
``{"url": ...}`` once it has answered a real completion, or ``{"error": ...}``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from pytest_mtserve.server.openai_api import FrontEndServer

STOP_GRACE_S = 10.0
LISTEN_BACKLOG = 2048  # uvicorn's default


class FrontEndError(RuntimeError):
    """The front end process could not start; the message says why."""


@dataclass(frozen=True)
class FrontEndSettings:
    model_name: str
    tokenizer_dir: str
    max_seq_length: int
    host: str
    port: int
    triton_url: str
    triton_model_name: str
    request_timeout_s: float


class FrontEndProcesses:
    """Starts, watches and stops the front end's processes; they die with this one."""

    def __init__(self, settings: FrontEndSettings, count: int) -> None:
        self._settings = settings
        self._count = count
        self._processes: list[subprocess.Popen] = []

    def start(self) -> str:
        """Start the front ends and return the base URL once each has served a completion."""
        from pytest_mtserve.server.ports import PortInUseError, bind_listening_sockets

        try:
            listeners = bind_listening_sockets(
                self._settings.host, self._settings.port, self._count, "HTTP front end", option="--port"
            )
        except PortInUseError as error:
            raise FrontEndError(str(error)) from None
        try:
            for listener in listeners:
                listener.listen(LISTEN_BACKLOG)  # before the first child: no connection is refused meanwhile
            readies = [self._spawn(listener.fileno()) for listener in listeners]
            urls = [self._wait_ready(process, ready) for process, ready in zip(self._processes, readies)]
        finally:
            for listener in listeners:
                listener.close()
        return urls[0]

    def _spawn(self, listen_fd: int) -> TextIO:
        read_fd, write_fd = os.pipe()
        settings = json.dumps(asdict(self._settings))
        command = [sys.executable, "-m", __name__, settings, str(listen_fd), str(write_fd), str(os.getpid())]
        try:
            # No preexec_fn: this process runs Triton's threads, and forking with them is only
            # safe straight into exec. The child ties its life to this one itself.
            self._processes.append(subprocess.Popen(command, pass_fds=(listen_fd, write_fd)))
        finally:
            os.close(write_fd)
        return os.fdopen(read_fd)

    def _wait_ready(self, process: subprocess.Popen, ready: TextIO) -> str:
        with ready:
            line = ready.readline()  # EOF if the child dies first
        if not line:
            code = process.wait()
            self.stop()
            raise FrontEndError(f"the HTTP front end exited with code {code} before it was ready; see the log above")
        reply = json.loads(line)
        if "error" in reply:
            self.stop()
            raise FrontEndError(reply["error"])
        return str(reply["url"])

    def exit_code(self) -> int | None:
        """The exit code of a front end process that has ended; None while all run."""
        return next((code for code in (p.poll() for p in self._processes) if code is not None), None)

    def stop(self) -> None:
        """Stop the front ends (uvicorn finishes the requests it holds); safe to call twice."""
        running = [p for p in self._processes if p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str]) -> int:
    from pytest_mtserve.server.process_life import die_with_parent, stop_requested_on_signals

    settings_json, listen_fd, ready_fd, parent_pid = argv
    die_with_parent()
    if os.getppid() != int(parent_pid):  # the parent died before the line above
        return 1
    settings = FrontEndSettings(**json.loads(settings_json))
    stop_requested = stop_requested_on_signals()
    with os.fdopen(int(ready_fd), "w") as ready:
        try:
            frontend, url = _serve(settings, socket.socket(fileno=int(listen_fd)))
        except Exception as error:  # noqa: BLE001 - every start-up failure goes back as a message
            ready.write(json.dumps({"error": str(error)}) + "\n")
            return 1
        ready.write(json.dumps({"url": url}) + "\n")
    try:
        while not stop_requested.wait(timeout=1.0):
            pass
    finally:
        frontend.stop()
    return 0


def _serve(settings: FrontEndSettings, listener: socket.socket) -> tuple[FrontEndServer, str]:
    from pytest_mtserve.server.openai_api import FrontEndServer, create_app
    from pytest_mtserve.server.tokenizer import load_tokenizer
    from pytest_mtserve.server.triton_binding import TritonClient

    client = TritonClient(settings.triton_url, settings.triton_model_name, timeout_s=settings.request_timeout_s)
    app = create_app(
        model_name=settings.model_name,
        tokenizer=load_tokenizer(Path(settings.tokenizer_dir)),
        max_seq_length=settings.max_seq_length,
        client=client,
    )
    frontend = FrontEndServer(app, settings.host, settings.port, listener=listener)
    return frontend, frontend.start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
