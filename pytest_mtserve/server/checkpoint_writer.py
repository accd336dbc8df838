"""Write a checkpoint in the Megatron Bridge layout that :mod:`checkpoint` reads.

Used by the tiny test checkpoint and by the Hugging Face / GGUF converters, so tests and
the demo need no download and exercise exactly the loading path users' checkpoints take.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from pytest_mtserve.server.architecture import architecture_from_run_config


def write_checkpoint(
    run_dir: Path,
    *,
    model_config: dict,
    state_dict: dict[str, torch.Tensor],
    tokenizer_dir: Path,
    iteration: int = 1,
) -> Path:
    """Save full (TP1) Megatron-Core local-spec weights as ``run_dir/iter_NNNNNNN``.

    The iteration folder is built under a temporary name and renamed into place, so a
    killed writer never leaves a checkpoint that looks complete. Returns the folder.
    """

    def load(model: torch.nn.Module) -> None:
        result = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"state_dict does not match the architecture: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")

    return _write(run_dir, model_config, tokenizer_dir, iteration, load, torch.device("cpu"), torch.float32)


def write_random_checkpoint(
    run_dir: Path,
    *,
    model_config: dict,
    tokenizer_dir: Path,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """A checkpoint of normal(0, 0.02) weights, built on ``device`` in ``dtype``: for
    throughput measurements, where only shapes matter (a GPU fills an 8B model in seconds,
    and timing kernels on zeros would flatter them)."""

    def fill(model: torch.nn.Module) -> None:
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.02, generator=generator)

    return _write(run_dir, model_config, tokenizer_dir, 1, fill, device, dtype)


def _write(
    run_dir: Path,
    model_config: dict,
    tokenizer_dir: Path,
    iteration: int,
    fill: Callable[[torch.nn.Module], None],
    device: torch.device,
    dtype: torch.dtype,
) -> Path:
    arch = architecture_from_run_config(model_config, "model_config")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final_dir = run_dir / f"iter_{iteration:07d}"
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists; remove it or write another iteration")
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=run_dir))
    try:
        _save_weights(arch, staging, fill, device, dtype)
        (staging / "run_config.yaml").write_text(yaml.safe_dump({"model": model_config}, sort_keys=False))
        shutil.copytree(tokenizer_dir, staging / "tokenizer")
        torch.save({"iteration": iteration, "consumed_train_samples": 0}, staging / "train_state.pt")
        staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        os.replace(staging, final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    torch.save({"iteration": iteration}, run_dir / "latest_train_state.pt")
    (run_dir / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return final_dir


def _save_weights(arch, directory: Path, fill: Callable[[torch.nn.Module], None], device: torch.device, dtype: torch.dtype) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from pytest_mtserve.server.distributed import init_parallel, shutdown_parallel
    from pytest_mtserve.server.model import build_model

    started_here = not torch.distributed.is_initialized()
    if started_here:
        init_parallel(tp=1, pp=1, device=device, cpu_collectives=True)
    try:
        model = build_model(arch, device=device, dtype=dtype, max_sequence_length=arch.seq_length)
        fill(model)
        strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
        dist_checkpointing.save(model.sharded_state_dict(), str(directory), sharded_strategy=strategy)
    finally:
        if started_here:
            shutdown_parallel()
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata.get("sharded_backend") == "torch_dist", metadata


def write_perturbed_copy(source: Path, destination: Path, *, relative_noise: float, seed: int = 0) -> Path:
    """Copy a checkpoint with Gaussian noise added to every weight matrix (for gate tests).

    Each matrix gets noise of ``relative_noise`` times its own standard deviation, so the
    copy is the same architecture, tokenizer and layout, only worse. Norm weights are kept.
    """
    from pytest_mtserve.server.local_model import load_model

    loaded = load_model(source)
    info = loaded.info
    state = {name: t.detach().float() for name, t in loaded.runner.model.state_dict().items() if not name.endswith("_extra_state")}
    model_config = yaml.safe_load((info.iteration_dir / "run_config.yaml").read_text())["model"]
    return write_checkpoint(
        destination, model_config=model_config, state_dict=perturbed(state, relative_noise, seed=seed), tokenizer_dir=info.tokenizer_dir
    )


def perturbed(state: dict[str, torch.Tensor], relative_std: float, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """``state`` with Gaussian noise of ``relative_std`` times each matrix's own spread added
    to every weight matrix (norm vectors kept); deterministic for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: tensor + relative_std * tensor.std() * torch.randn(tensor.shape, generator=generator) if tensor.dim() == 2 else tensor
        for name, tensor in state.items()
    }
