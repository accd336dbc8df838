"""torch.distributed and Megatron-Core parallel state for the server's process group."""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Idle ranks wait on the control channel between requests, possibly for days.
_CONTROL_TIMEOUT = datetime.timedelta(days=30)


@dataclass(frozen=True)
class ParallelGroups:
    rank: int
    world_size: int
    device: torch.device
    control_group: dist.ProcessGroup  # gloo: broadcasts of work descriptions and tokens


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
    if requested not in ("cuda", "cpu"):
        raise ValueError(f"unknown device {requested!r}: use auto, cuda or cpu")
    return torch.device(requested)


def init_parallel(tp: int, pp: int, device: torch.device, *, cpu_collectives: bool = False) -> ParallelGroups:
    """Join the torchrun process group and set up Megatron's tensor/pipeline groups.

    ``cpu_collectives``: on CUDA, let the default group also carry CPU tensors (gloo beside
    NCCL), which dist_checkpointing's save needs.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != tp * pp:
        raise RuntimeError(f"WORLD_SIZE={world_size} but --tp {tp} x --pp {pp} = {tp * pp} ranks")
    if device.type == "cuda":
        from pytest_mtserve.server.cpu_compat import cpu_compat_applied

        if cpu_compat_applied():  # Megatron would put some tensors on the CPU, beside the model on the GPU
            raise RuntimeError(
                "this process already ran Megatron-Core on the CPU (a CPU model or checkpoint writer), "
                "which cannot be undone; use the GPU from a process of its own"
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl" if cpu_collectives else "nccl"
    else:
        from pytest_mtserve.server.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
        _share_cpu_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        backend = "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=_CONTROL_TIMEOUT)
        else:  # a single process outside torchrun (tests, checkpoint writers)
            store = tempfile.NamedTemporaryFile(prefix="mtserve-pg-", delete=False).name
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    elif parallel_state.get_tensor_model_parallel_world_size() != tp:
        raise RuntimeError(
            f"this process already serves a model at TP {parallel_state.get_tensor_model_parallel_world_size()}; "
            f"a second one at TP {tp} needs a process of its own"
        )
    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return ParallelGroups(rank=rank, world_size=world_size, device=device, control_group=control)


def _share_cpu_cores(local_ranks: int) -> None:
    """Give each of this host's CPU ranks its share of the cores, as torchrun's OMP_NUM_THREADS=1 would.

    Left to torch's default every rank takes all cores: at TP 3 on 2 cores, 6 busy threads
    starved Triton's Python stubs until they failed their health check mid-run.
    """
    if local_ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def shutdown_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
