"""Start the model server as its own process group, wait until it is ready, stop it.

The server runs in a new session (``start_new_session=True``): Ctrl-C in the terminal
reaches pytest only, and pytest then stops the whole group in order (SIGTERM, SIGKILL
after a grace period) instead of the terminal killing torchrun's ranks at random.

Under pytest-xdist, :class:`SharedServer` makes the workers of one run share a single
server: the first worker that needs it starts it, the last worker to finish stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

# Light: the server's heavy imports are lazy. The server stops by itself once the process
# named in WATCH_PID_VARIABLE is gone (pytest killed with SIGKILL, say): it runs in a session
# of its own, so nothing else would stop it.
from pytest_mtserve.server.main import READY_PREFIX, WATCH_PID_VARIABLE
DEFAULT_STOP_GRACE_S = 20.0
TAIL_LINES = 40
_POLL_INTERVAL_S = 0.1
_KILL_WAIT_S = 5.0
# Enough for TAIL_LINES of even a chatty log; reading the whole file could be slow.
_TAIL_BYTES = 64 * 1024


class ServerStartError(RuntimeError):
    """The model server exited, printed nonsense or timed out while starting."""


class ServerStopError(RuntimeError):
    """Processes of the model server survived SIGKILL."""


# Triton forms the next batch while the engine runs the current one, and closes it once its
# first request has waited the queue delay. The answers to a batch come back as new requests
# over tens of milliseconds, so at the server's default of 2 ms the next batch holds only the
# first of them: batches of 32 held 23 on average on an H200 with 64 requests in flight.
# At 100 ms, about an 8B engine's batch there, a whole batch of them gets in, and a full
# batch still leaves at once (docs/performance.md, "Full batches"). A request with no others
# coming waits that long too, so only clients that keep two batches in flight get it.
FULL_BATCH_QUEUE_DELAY_US = 100_000


def queue_delay_for(requests_in_flight: int, max_batch_size: int) -> int | None:
    """Triton's queue delay in microseconds for a client that keeps ``requests_in_flight``
    requests in flight; None for the server's default."""
    return FULL_BATCH_QUEUE_DELAY_US if requests_in_flight >= 2 * max_batch_size else None


@dataclass(frozen=True)
class ServerSettings:
    """What the plugin passes to the server command line."""

    checkpoint: Path
    tp: int = 1
    pp: int = 1
    max_batch_size: int = 8
    inference_max_seq_length: int = 4096
    port: int = 0
    device: str = "auto"
    model_name: str = "megatron_model"
    python: str | None = None  # the server's interpreter; None: this one
    queue_delay_us: int | None = None  # None: the server's default
    extra_args: tuple[str, ...] = ()  # more server options, after these (--server-args)


def server_command(settings: ServerSettings) -> list[str]:
    """The command line that starts the server for ``settings`` (on 127.0.0.1 only)."""
    return [
        settings.python or sys.executable, "-m", "pytest_mtserve.server",
        "--checkpoint", str(settings.checkpoint),
        "--tp", str(settings.tp),
        "--pp", str(settings.pp),
        "--max-batch-size", str(settings.max_batch_size),
        "--inference-max-seq-length", str(settings.inference_max_seq_length),
        "--host", "127.0.0.1",
        "--port", str(settings.port),
        "--triton-port", "0",
        "--model-name", settings.model_name,
        "--device", settings.device,
        *([] if settings.queue_delay_us is None else ["--queue-delay-us", str(settings.queue_delay_us)]),
        *settings.extra_args,
    ]  # fmt: skip


@dataclass
class RunningServer:
    """A started server. ``pid`` is the process we started, the leader of its process group
    (the ready line's own ``pid`` may be a torchrun rank inside that group)."""

    url: str
    model: str
    pid: int
    log_path: Path

    def tail(self, lines: int = TAIL_LINES) -> str:
        return tail(self.log_path, lines)

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        stop_process_group(self.pid, grace_s)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "log_path": str(self.log_path)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RunningServer:
        return cls(
            url=str(data["url"]),
            model=str(data["model"]),
            pid=int(data["pid"]),  # type: ignore[call-overload]
            log_path=Path(str(data["log_path"])),
        )


def start_server(
    command: list[str],
    log_path: Path,
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> RunningServer:
    """Start ``command`` in its own session with stdout and stderr in ``log_path`` and wait
    for its ready line. Raises :class:`ServerStartError` at once if the process exits first,
    after ``timeout_s`` otherwise; either way nothing of it is left running."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**(os.environ if env is None else env), WATCH_PID_VARIABLE: str(_owner_pid())},
        )
    # Reap the leader whenever it ends, whichever process stops it (see SharedServer).
    threading.Thread(target=process.wait, name=f"mtserve-reaper-{process.pid}", daemon=True).start()
    try:
        ready = _wait_for_ready_line(process, log_path, timeout_s)
    except BaseException:
        stop_process_group(process.pid, DEFAULT_STOP_GRACE_S)
        raise
    return RunningServer(url=ready["url"], model=ready["model"], pid=process.pid, log_path=log_path)


def _owner_pid() -> int:
    """The process whose death must stop the server: this pytest, or under xdist the
    controller (workers may exit before the last one is done with the shared server)."""
    return os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()


def _wait_for_ready_line(
    process: subprocess.Popen[bytes], log_path: Path, timeout_s: float
) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    with open(log_path, "rb") as log:
        pending = b""
        while True:
            pending += log.read()
            *complete_lines, pending = pending.split(b"\n")
            for line in complete_lines:
                if line.startswith(READY_PREFIX.encode()):
                    return _parse_ready_line(line.decode(errors="replace"), log_path)
            exit_code = process.poll()
            if exit_code is not None:
                raise ServerStartError(
                    f"the model server exited with code {exit_code} before it was ready.\n"
                    f"{_log_excerpt(log_path)}"
                )
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"the model server was not ready after {timeout_s:.0f} s; if loading the "
                    f"checkpoint takes longer, raise --server-timeout.\n{_log_excerpt(log_path)}"
                )
            time.sleep(_POLL_INTERVAL_S)


def _parse_ready_line(line: str, log_path: Path) -> dict[str, str]:
    try:
        ready = json.loads(line[len(READY_PREFIX) :])
        return {"url": str(ready["url"]), "model": str(ready["model"])}
    except (ValueError, KeyError, TypeError) as error:
        raise ServerStartError(
            f"the model server printed a malformed ready line ({error}): {line!r} (log: {log_path})"
        ) from None


def _log_excerpt(log_path: Path) -> str:
    return f"Last {TAIL_LINES} lines of the server log {log_path}:\n{tail(log_path, TAIL_LINES)}"


def tail(log_path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, log_path.stat().st_size - _TAIL_BYTES))
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_process_group(pgid: int, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
    """SIGTERM every process of group ``pgid``, SIGKILL what is left after ``grace_s``,
    and return once none is left (zombies count as gone: their parent reaps them)."""
    _signal_group(pgid, signal.SIGTERM)
    if _wait_until_gone(pgid, grace_s):
        return
    _signal_group(pgid, signal.SIGKILL)
    if not _wait_until_gone(pgid, _KILL_WAIT_S):
        raise ServerStopError(
            f"processes {_live_members(pgid)} of the model server (process group {pgid}) "
            "survived SIGKILL; they are probably stuck in the kernel (a GPU driver call)"
        )


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _wait_until_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _live_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)
    return True


def _live_members(pgid: int) -> list[int]:
    """Pids of the group's processes that are not zombies."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 cannot tell zombies apart, so trust it
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


class SharedServer:
    """One server for all pytest-xdist workers of a run, through a state file guarded by
    a file lock in the run's shared temporary directory (the pytest-xdist recipe:
    ``tmp_path_factory.getbasetemp().parent`` + ``filelock.FileLock``).

    The state counts the workers that have finished. A worker that stopped the server as
    soon as its own tests were done would leave a worker that has yet to run its first
    server test to start a second one, so the server stops only when every worker of the
    run has finished. A failed start is recorded too: the other workers then fail at once
    with the same message instead of each waiting for a server that cannot start.
    """

    def __init__(self, state_dir: Path, run_id: str, worker_count: int) -> None:
        from filelock import FileLock  # a dependency of the plugin, but only needed here

        self.state_path = state_dir / f"mtserve-server-{run_id}.json"
        self._lock = FileLock(str(self.state_path) + ".lock")
        self._worker_count = worker_count

    def acquire(self, start: Callable[[], RunningServer]) -> RunningServer:
        """The run's server, started with ``start()`` if no worker has started it yet."""
        with self._lock:
            state = self._read()
            if "error" in state:
                raise ServerStartError(f"(start failed in another worker) {state['error']}")
            if "server" in state:
                return RunningServer.from_dict(state["server"])
            try:
                server = start()
            except ServerStartError as error:
                self._write({**state, "error": str(error)})
                raise
            self._write({**state, "server": server.to_dict()})
            return server

    def finish_worker(self) -> None:
        """Count this worker as finished; the last one stops the server."""
        with self._lock:
            state = self._read()
            state["finished"] = int(state.get("finished", 0)) + 1
            if state["finished"] >= self._worker_count:
                self._stop(state)
            self._write(state)

    def stop_leftover(self) -> None:
        """Stop the server even though workers are missing (they crashed)."""
        with self._lock:
            state = self._read()
            self._stop(state)
            self._write(state)

    @staticmethod
    def _stop(state: dict) -> None:
        server = state.pop("server", None)
        if server is not None:
            RunningServer.from_dict(server).stop()

    def _read(self) -> dict:
        if not self.state_path.exists():
            return {}
        return json.loads(self.state_path.read_text())

    def _write(self, state: dict) -> None:
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(self.state_path)
