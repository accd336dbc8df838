"""Server entry point: checks the input, starts one process per rank, gives each rank its role.

Under torchrun or srun (RANK set) this process is one rank; otherwise, with more than one
rank, :mod:`rank_launcher` starts and supervises them.

Rank 0 serves: PyTriton binds the engine, the FastAPI front end (a process of its own,
see :mod:`frontend_process`) talks to Triton, and one ``MTSERVE_READY {...}`` line on
stdout says where. The other ranks follow rank 0's broadcasts. SIGTERM or SIGINT stops
the front end, Triton and every rank.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from pytest_mtserve.server.options import ServerOptions, default_frontend_processes, parse_server_options, uses_cuda_graphs

READY_PREFIX = "MTSERVE_READY "
WATCH_PID_VARIABLE = "MTSERVE_WATCH_PID"  # stop when this process is gone


class ServerInputError(Exception):
    """Bad input (found before any rank starts, or a port already taken): printed as one
    line, exit code 2."""


def main(argv: list[str] | None = None, prog: str = "mtserve serve") -> int:
    options = parse_server_options(argv, prog=prog)
    try:
        if "RANK" not in os.environ:
            _check_input(options)
            if options.world_size > 1:
                from pytest_mtserve.server.rank_launcher import launch_ranks

                return launch_ranks(options)
        return _serve_rank(options)
    except ServerInputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 2


def _check_input(options: ServerOptions) -> None:
    """Everything that can be checked from files, before any rank starts."""
    from pytest_mtserve.server.architecture import ArchitectureError
    from pytest_mtserve.server.checkpoint import CheckpointError, locate_checkpoint

    try:
        info = locate_checkpoint(options.checkpoint)
        info.architecture.check_parallelism(options.tp, options.pp)
    except (CheckpointError, ArchitectureError) as error:
        raise ServerInputError(str(error)) from None
    if options.inference_max_seq_length < 2:
        raise ServerInputError("--inference-max-seq-length must be at least 2 tokens")
    from pytest_mtserve.server.distributed import resolve_device

    try:
        device = resolve_device(options.device)
        uses_cuda_graphs(options.cuda_graphs, device.type, options.tp)  # --cuda-graphs on needs CUDA
    except (RuntimeError, ValueError) as error:
        raise ServerInputError(str(error)) from None
    if device.type == "cuda":
        import torch

        visible = torch.cuda.device_count()
        if options.world_size > visible:
            raise ServerInputError(
                f"--tp {options.tp} x --pp {options.pp} needs {options.world_size} GPUs but {visible} are visible; "
                "lower --tp or use --device cpu"
            )


def _serve_rank(options: ServerOptions) -> int:
    from pytest_mtserve.server.bootstrap import build_rank

    rank = build_rank(options)
    if rank.is_leader:
        _lead(rank, options)
    else:
        _quit_quietly_on_signals()
        rank.follow()
    rank.close()
    # Everything is released explicitly above; the interpreter's native teardown (process
    # groups, Triton's stub threads) would add seconds to every stop for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _lead(rank, options: ServerOptions) -> None:
    from pytest_mtserve.server.batch_log import BatchLog
    from pytest_mtserve.server.frontend_process import FrontEndError, FrontEndProcesses, FrontEndSettings
    from pytest_mtserve.server.process_life import stop_requested_on_signals
    from pytest_mtserve.server.triton_binding import TritonEngineServer

    stop_requested = stop_requested_on_signals()
    sys.setswitchinterval(options.gil_switch_interval_ms / 1000)
    triton = TritonEngineServer(
        rank.leader.run_batch,
        max_batch_size=options.max_batch_size,
        queue_delay_us=options.queue_delay_us,
        instances=options.triton_instances,
        http_port=options.triton_port,
        batch_log=BatchLog() if options.log_batches else None,
    )
    frontend = None
    try:
        triton.start()
        frontend = FrontEndProcesses(
            FrontEndSettings(
                model_name=options.model_name,
                tokenizer_dir=str(rank.tokenizer_dir),
                max_seq_length=options.inference_max_seq_length,
                host=options.host,
                port=options.port,
                triton_url=triton.url,
                triton_model_name=triton.triton_model_name,
                request_timeout_s=options.request_timeout,
            ),
            options.frontend_processes or default_frontend_processes(os.cpu_count()),
        )
        try:
            url = frontend.start()
        except FrontEndError as error:
            raise ServerInputError(str(error)) from None
        ready = {"url": url, "model": options.model_name, "triton_port": _port_of(triton.url), "pid": os.getpid()}
        print(READY_PREFIX + json.dumps(ready), flush=True)
        owner = _watched_pid()
        while not stop_requested.wait(timeout=1.0):
            if owner is not None and not _alive(owner):
                print(f"mtserve: process {owner} that started the server is gone; stopping", file=sys.stderr, flush=True)
                break
            if (code := frontend.exit_code()) is not None:
                print(f"mtserve: the HTTP front end exited with code {code}; stopping", file=sys.stderr, flush=True)
                break
    finally:
        if frontend is not None:
            frontend.stop()
        triton.stop()
        try:
            rank.leader.stop_followers()
        except RuntimeError as error:  # a follower already gone: nothing left to tell
            print(f"mtserve: could not reach the other ranks while stopping: {error}", file=sys.stderr, flush=True)


def _watched_pid() -> int | None:
    """Set by pytest-mtserve's launcher: stop when that process dies."""
    text = os.environ.get(WATCH_PID_VARIABLE, "")
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _quit_quietly_on_signals() -> None:
    """A follower holds no state worth saving: on a signal it just leaves."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: os._exit(0))
