"""The one place where Megatron-Core is adapted to run on CPU (gloo, no CUDA).

Megatron-Core 0.16 allocates several tensors on ``torch.cuda.current_device()`` and calls
``torch.cuda.synchronize()`` unconditionally: the global memory buffer used by local
attention, rotary embedding's ``inv_freq``, the tensor-parallel all-gather of vocabulary
logits, the embedding group all-reduce, and the dist-checkpoint writer's status tensors.
Applied only when the server (or a checkpoint writer) runs on CPU; never on GPU.
"""

from __future__ import annotations

import torch

_applied = False


def cpu_compat_applied() -> bool:
    return _applied


def apply_cpu_compat() -> None:
    """Make Megatron-Core's hard-wired CUDA calls land on the CPU. Idempotent."""
    global _applied
    if _applied:
        return
    # Every ``device=torch.cuda.current_device()`` in Megatron-Core then means the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # There is nothing to wait for on the CPU; Megatron calls this around collectives.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    # ``weight.data.cuda()`` (tied-embedding all-reduce) and the checkpoint saver's
    # ``device="cuda"`` status tensors: keep them where they are.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]
    _patch_cuda_literal_tensors()
    _applied = True


def _patch_cuda_literal_tensors() -> None:
    """``torch.tensor(..., device='cuda')`` in dist_checkpointing's metadata-reuse check."""
    original_tensor = torch.tensor

    def tensor_on_cpu(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return original_tensor(*args, **kwargs)

    from megatron.core.dist_checkpointing.strategies import state_dict_saver

    state_dict_saver.torch = _TorchWithCpuTensor(tensor_on_cpu)


class _TorchWithCpuTensor:
    """``torch`` as one module sees it, except that ``torch.tensor`` stays on the CPU."""

    def __init__(self, tensor_fn):
        self.tensor = tensor_fn

    def __getattr__(self, name: str):
        return getattr(torch, name)
