"""The HTTP front end in a process of its own, beside rank 0's engine.

Rank 0's engine launches its GPU work from Python, and every PyTorch call lets go of the
GIL and takes it back. A front end in the same process (parsing, tokenizing, building
responses for every request in flight) holds the GIL in between, so each kernel launch
waits for it and the GPU with it. The front end reaches Triton over HTTP anyway, so here
it runs in an interpreter of its own; it never imports torch.

    python -m pytest_mtserve.server.frontend_process SETTINGS_JSON READY_FD PARENT_PID

is what :class:`FrontEndProcess` starts: the child writes one JSON line to ``READY_FD``,
``{"url": ...}`` once it has answered a real completion, or ``{"error": ...}``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_mtserve.server.openai_api import FrontEndServer

STOP_GRACE_S = 10.0


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


class FrontEndProcess:
    """Starts, watches and stops the front end's process; it dies with this one."""

    def __init__(self, settings: FrontEndSettings) -> None:
        self._settings = settings
        self._process: subprocess.Popen | None = None

    def start(self) -> str:
        """Start the front end and return its base URL once it has served a completion."""
        read_fd, write_fd = os.pipe()
        settings = json.dumps(asdict(self._settings))
        command = [sys.executable, "-m", __name__, settings, str(write_fd), str(os.getpid())]
        try:
            # No preexec_fn: this process runs Triton's threads, and forking with them is only
            # safe straight into exec. The child ties its life to this one itself.
            self._process = subprocess.Popen(command, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd) as ready:
            line = ready.readline()  # EOF if the child dies first
        if not line:
            code = self._process.wait()
            raise FrontEndError(f"the HTTP front end exited with code {code} before it was ready; see the log above")
        reply = json.loads(line)
        if "error" in reply:
            self.stop()
            raise FrontEndError(reply["error"])
        return str(reply["url"])

    def exit_code(self) -> int | None:
        """None while the front end runs."""
        return None if self._process is None else self._process.poll()

    def stop(self) -> None:
        """Stop the front end (uvicorn finishes the requests it holds); safe to call twice."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def main(argv: list[str]) -> int:
    from pytest_mtserve.server.process_life import die_with_parent, stop_requested_on_signals

    settings_json, ready_fd, parent_pid = argv
    die_with_parent()
    if os.getppid() != int(parent_pid):  # the parent died before the line above
        return 1
    settings = FrontEndSettings(**json.loads(settings_json))
    stop_requested = stop_requested_on_signals()
    with os.fdopen(int(ready_fd), "w") as ready:
        try:
            frontend, url = _serve(settings)
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


def _serve(settings: FrontEndSettings) -> tuple[FrontEndServer, str]:
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
    frontend = FrontEndServer(app, settings.host, settings.port)
    return frontend, frontend.start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
