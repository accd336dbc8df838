"""Starts one server process per rank on this host and supervises them (torchrun's job).

Unlike torchrun, a stop request is turned into an orderly shutdown: the supervisor signals
rank 0 only, which stops the HTTP front end and Triton and then tells the other ranks to
leave. Each rank runs in its own session and dies with the supervisor (PR_SET_PDEATHSIG),
so a killed supervisor leaves nothing behind, and a rank that fails stops the others.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from pytest_mtserve.server.options import ServerOptions, to_argv
from pytest_mtserve.server.process_life import die_with_parent, stop_requested_on_signals
from pytest_mtserve.server.ports import pick_free_port

_POLL_S = 0.1
STOP_GRACE_S = 20.0


def launch_ranks(options: ServerOptions) -> int:
    """Run ``options.world_size`` ranks until they end or a signal asks them to; returns an exit code."""
    stop_requested = stop_requested_on_signals()
    master_port = pick_free_port("127.0.0.1")
    ranks = [_start_rank(options, rank, master_port) for rank in range(options.world_size)]
    try:
        return _supervise(ranks, stop_requested)
    finally:
        _kill_all(ranks)


def _start_rank(options: ServerOptions, rank: int, master_port: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(options.world_size),
        LOCAL_WORLD_SIZE=str(options.world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
    )  # fmt: skip
    command = [sys.executable, "-m", "pytest_mtserve.server", *to_argv(options)]
    return subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent)


def _supervise(ranks: list[subprocess.Popen], stop_requested: threading.Event) -> int:
    leader = ranks[0]
    while not stop_requested.wait(_POLL_S):
        for process in ranks:
            code = process.poll()
            if code is not None and (code != 0 or process is leader):
                return _wait_then_return(ranks, code)
    leader.send_signal(signal.SIGTERM)  # rank 0 stops the front end, Triton, then the others
    try:
        return _wait_all(ranks, STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        print(f"mtserve: ranks did not stop within {STOP_GRACE_S:.0f} s; killing them", file=sys.stderr, flush=True)
        return 1


def _wait_then_return(ranks: list[subprocess.Popen], code: int) -> int:
    """One rank ended: the others get a moment to follow (a clean stop), then are killed."""
    try:
        _wait_all(ranks, 5.0)
    except subprocess.TimeoutExpired:
        pass
    return code


def _wait_all(ranks: list[subprocess.Popen], timeout_s: float) -> int:
    codes = [process.wait(timeout=timeout_s) for process in ranks]
    return next((code for code in codes if code != 0), 0)


def _kill_all(ranks: list[subprocess.Popen]) -> None:
    for process in ranks:
        if process.poll() is None:
            process.kill()
            process.wait()
