"""The launcher against small fake servers: ready, dying during start, never ready, stubborn."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_mtserve import launcher
from pytest_mtserve.launcher import (
    FULL_BATCH_QUEUE_DELAY_US,
    RunningServer,
    ServerSettings,
    ServerStartError,
    SharedServer,
    queue_delay_for,
    server_command,
    start_server,
)

READY = 'print("MTSERVE_READY " + json.dumps({"url": "http://127.0.0.1:1", "model": "fake", "triton_port": 2, "pid": os.getpid()}), flush=True)'


def fake_server(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake_server.py"
    script.write_text("import json, os, signal, subprocess, sys, time\n" + textwrap.dedent(body))
    return [sys.executable, str(script)]


def group_alive(pgid: int) -> bool:
    return bool(launcher._live_members(pgid))


def test_ready_server_is_parsed_and_stopped_with_its_children(tmp_path: Path) -> None:
    command = fake_server(
        tmp_path,
        f"""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("loading", flush=True)
        {READY}
        time.sleep(60)
        """,
    )
    server = start_server(command, tmp_path / "server.log", timeout_s=20)
    assert (server.url, server.model) == ("http://127.0.0.1:1", "fake")
    assert "loading" in server.tail()
    assert group_alive(server.pid)
    server.stop(grace_s=5)
    assert not group_alive(server.pid)


def test_process_that_dies_during_start_fails_at_once_with_the_log_tail(tmp_path: Path) -> None:
    command = fake_server(tmp_path, 'print("mtserve: error: no checkpoint at /nowhere", file=sys.stderr)\nsys.exit(3)\n')
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="exited with code 3") as error:
        start_server(command, tmp_path / "server.log", timeout_s=120)
    assert time.monotonic() - started < 10
    assert "no checkpoint at /nowhere" in str(error.value)
    assert str(tmp_path / "server.log") in str(error.value)


def test_server_that_never_gets_ready_times_out_naming_the_log_and_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    command = fake_server(tmp_path, f'open({str(pid_file)!r}, "w").write(str(os.getpid()))\ntime.sleep(60)\n')
    with pytest.raises(ServerStartError, match="not ready after 1 s") as error:
        start_server(command, tmp_path / "server.log", timeout_s=1)
    assert "server.log" in str(error.value) and "--server-timeout" in str(error.value)
    assert not group_alive(int(pid_file.read_text()))


def test_malformed_ready_line_is_an_error(tmp_path: Path) -> None:
    command = fake_server(tmp_path, 'print("MTSERVE_READY {not json", flush=True)\ntime.sleep(60)\n')
    with pytest.raises(ServerStartError, match="malformed ready line"):
        start_server(command, tmp_path / "server.log", timeout_s=20)


def test_server_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    command = fake_server(
        tmp_path, f"signal.signal(signal.SIGTERM, signal.SIG_IGN)\n{READY}\ntime.sleep(60)\n"
    )
    server = start_server(command, tmp_path / "server.log", timeout_s=20)
    started = time.monotonic()
    server.stop(grace_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert not group_alive(server.pid)


def test_server_command_carries_the_settings() -> None:
    command = server_command(ServerSettings(checkpoint=Path("/ckpt/run"), tp=2, pp=1, port=8080, device="cpu"))
    assert command[:3] == [sys.executable, "-m", "pytest_mtserve.server"]
    pairs = dict(zip(command[3::2], command[4::2]))
    assert pairs["--checkpoint"] == "/ckpt/run"
    assert (pairs["--tp"], pairs["--pp"], pairs["--port"], pairs["--device"]) == ("2", "1", "8080", "cpu")
    assert pairs["--host"] == "127.0.0.1"


def test_server_command_sets_the_queue_delay_only_for_two_batches_in_flight() -> None:
    def queue_delay(in_flight: int) -> str | None:
        settings = ServerSettings(checkpoint=Path("/ckpt/run"), max_batch_size=32, queue_delay_us=queue_delay_for(in_flight, 32))
        command = server_command(settings)
        return command[command.index("--queue-delay-us") + 1] if "--queue-delay-us" in command else None

    assert queue_delay(64) == queue_delay(100) == str(FULL_BATCH_QUEUE_DELAY_US)
    assert queue_delay(63) is None and queue_delay(1) is None  # the server's default


def test_server_command_ends_with_the_extra_server_options() -> None:
    command = server_command(ServerSettings(checkpoint=Path("/ckpt/run"), extra_args=("--attention-backend", "unfused")))
    assert command[-2:] == ["--attention-backend", "unfused"]  # after the plugin's: the server's argparse keeps the last


def test_server_command_runs_the_chosen_interpreter() -> None:
    command = server_command(ServerSettings(checkpoint=Path("/ckpt/run"), python="/envs/server/bin/python"))
    assert command[:3] == ["/envs/server/bin/python", "-m", "pytest_mtserve.server"]


def test_shared_server_starts_once_and_the_last_worker_stops_it(tmp_path: Path) -> None:
    command = fake_server(tmp_path, f"{READY}\ntime.sleep(60)\n")
    starts: list[RunningServer] = []

    def start() -> RunningServer:
        starts.append(start_server(command, tmp_path / "server.log", timeout_s=20))
        return starts[-1]

    workers = [SharedServer(tmp_path, "run1", worker_count=2) for _ in range(2)]
    first, second = (worker.acquire(start) for worker in workers)
    assert len(starts) == 1 and first == second
    workers[0].finish_worker()
    assert group_alive(first.pid)
    workers[1].finish_worker()
    assert not group_alive(first.pid)


def test_a_failed_start_is_not_retried_by_other_workers(tmp_path: Path) -> None:
    attempts = []

    def failing_start() -> RunningServer:
        attempts.append(1)
        raise ServerStartError("the model server exited with code 1")

    for _ in range(2):
        with pytest.raises(ServerStartError, match="exited with code 1"):
            SharedServer(tmp_path, "run2", worker_count=2).acquire(failing_start)
    assert len(attempts) == 1
