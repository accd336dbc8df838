"""A checkpoint loaded in this one process (TP1): for converters' checks, benchmarks and tests."""

from __future__ import annotations

from pathlib import Path

import torch

from pytest_mtserve.server.checkpoint import CheckpointInfo, locate_checkpoint
from pytest_mtserve.server.distributed import init_parallel
from pytest_mtserve.server.model import load_checkpoint_model
from pytest_mtserve.server.model_runner import ModelRunner
from pytest_mtserve.server.options import uses_cuda_graphs


class LocalModel:
    def __init__(self, info: CheckpointInfo, runner: ModelRunner):
        self.info = info
        self.runner = runner

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 logits [batch, seq, vocab] of equal-length rows of token ids."""
        return self.runner.prefill(tokens.tolist()).float()


def load_model(
    checkpoint: Path | str,
    *,
    tp: int = 1,
    device: str = "cpu",
    dtype: str = "auto",
    attention_backend: str = "auto",
    cuda_graphs: str = "off",
) -> LocalModel:
    """Initialise a one-process group (if none) and load the checkpoint's weights;
    ``cuda_graphs`` as the server's ``--cuda-graphs``."""
    info = locate_checkpoint(checkpoint)
    info.architecture.check_parallelism(tp, 1)
    groups = init_parallel(tp=tp, pp=1, device=torch.device(device))
    model = load_checkpoint_model(
        info, device=groups.device, dtype=dtype, max_sequence_length=info.architecture.seq_length, attention_backend=attention_backend
    )
    runner = ModelRunner(model, info.architecture, groups.device, cuda_graphs=uses_cuda_graphs(cuda_graphs, groups.device.type, tp))
    return LocalModel(info, runner)
