"""Find and validate a checkpoint in the Megatron Bridge layout.

    RUN_DIR/
      latest_train_state.pt            (Megatron Bridge) or latest_checkpointed_iteration.txt (Megatron-LM)
      iter_0001000/
        run_config.yaml                model: section = the architecture
        tokenizer/                     Hugging Face tokenizer files
        .metadata  __0_0.distcp ...    torch_dist shards
        common.pt  metadata.json

Everything here is plain file reading: it runs before any process group starts, so bad
input fails with a message instead of a hung torchrun.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from pytest_mtserve.server.architecture import ArchitectureError, ModelArchitecture, architecture_from_run_config

_ITERATION_DIR = re.compile(r"^iter_(\d+)$")


class CheckpointError(ValueError):
    """The checkpoint cannot be served; the message names the path and the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    iteration_dir: Path
    iteration: int
    architecture: ModelArchitecture
    tokenizer_dir: Path


def locate_checkpoint(path: Path | str) -> CheckpointInfo:
    """Resolve a run directory or an ``iter_NNNNNNN`` folder and read what the server needs."""
    iteration_dir = find_iteration_dir(Path(path))
    return CheckpointInfo(
        iteration_dir=iteration_dir,
        iteration=int(_ITERATION_DIR.match(iteration_dir.name).group(1)) if _ITERATION_DIR.match(iteration_dir.name) else 0,
        architecture=_read_architecture(iteration_dir),
        tokenizer_dir=_tokenizer_dir(iteration_dir),
    )


def find_iteration_dir(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; pass --checkpoint RUN_DIR or RUN_DIR/iter_NNNNNNN")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a file; pass the run directory or its iter_NNNNNNN folder")
    if (path / "metadata.json").exists() or _ITERATION_DIR.match(path.name):
        return path
    iterations = {int(m.group(1)): child for child in path.iterdir() if child.is_dir() and (m := _ITERATION_DIR.match(child.name))}
    if not iterations:
        raise CheckpointError(
            f"no iter_NNNNNNN folder in {path}; pass a Megatron checkpoint run directory "
            "(create a test one with `mtserve make-tiny-checkpoint DIR`)"
        )
    latest = _latest_marker(path)
    if latest is not None:
        if latest not in iterations:
            raise CheckpointError(f"{path} says the latest iteration is {latest}, but iter_{latest:07d} is missing; pass the iteration folder explicitly")
        return iterations[latest]
    return iterations[max(iterations)]


def _latest_marker(run_dir: Path) -> int | None:
    """Megatron Bridge's ``latest_train_state.pt`` first, then Megatron-LM's text file."""
    state_file = run_dir / "latest_train_state.pt"
    if state_file.exists():
        import torch

        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
            return int(state["iteration"])
        except Exception as error:  # a corrupt marker must not hide the iterations beside it
            raise CheckpointError(f"cannot read {state_file} ({error}); remove it or pass the iteration folder") from None
    text_file = run_dir / "latest_checkpointed_iteration.txt"
    if text_file.exists():
        text = text_file.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{text_file} holds {text!r}, not an iteration number; fix it or pass the iteration folder")
        return int(text)
    return None


def _read_architecture(iteration_dir: Path) -> ModelArchitecture:
    config_file = iteration_dir / "run_config.yaml"
    if not config_file.exists():
        raise CheckpointError(f"{config_file} is missing: the architecture is read from the iteration's run_config.yaml (its model: section)")
    try:
        run_config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as error:
        raise CheckpointError(f"cannot parse {config_file}: {error}") from None
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise CheckpointError(f"{config_file} has no model: mapping; it must describe the architecture")
    try:
        arch = architecture_from_run_config(run_config["model"], str(config_file))
    except ArchitectureError as error:
        raise CheckpointError(str(error)) from None
    _check_shards(iteration_dir)
    padded_vocab = _embedding_rows(iteration_dir)
    return replace(arch, padded_vocab_size=padded_vocab) if padded_vocab else arch


def _check_shards(iteration_dir: Path) -> None:
    metadata = iteration_dir / "metadata.json"
    if not metadata.exists() or not (iteration_dir / ".metadata").exists():
        raise CheckpointError(f"{iteration_dir} holds no torch_dist weights (metadata.json and .metadata); is it a Megatron dist checkpoint?")
    try:
        backend = json.loads(metadata.read_text()).get("sharded_backend")
    except json.JSONDecodeError as error:
        raise CheckpointError(f"cannot parse {metadata}: {error}") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{metadata}: sharded_backend is {backend!r}; only torch_dist checkpoints are supported")


def _embedding_rows(iteration_dir: Path) -> int | None:
    """The trained padded vocabulary, from the shard metadata (it depends on the training TP)."""
    import pickle

    try:
        with open(iteration_dir / ".metadata", "rb") as handle:
            metadata = pickle.load(handle)
        return int(metadata.state_dict_metadata["embedding.word_embeddings.weight"].size[0])
    except Exception:
        return None


def _tokenizer_dir(iteration_dir: Path) -> Path:
    candidates = (iteration_dir / "tokenizer", iteration_dir.parent / "tokenizer")
    for candidate in candidates:
        if (candidate / "tokenizer.json").exists():
            return candidate
    for candidate in candidates:
        if candidate.is_dir():  # e.g. only a SentencePiece tokenizer.model: the server reads fast tokenizers only
            from pytest_mtserve.server.tokenizer import missing_fast_tokenizer

            raise CheckpointError(missing_fast_tokenizer(candidate))
    raise CheckpointError(
        f"no Hugging Face tokenizer in {iteration_dir / 'tokenizer'}; copy the model's tokenizer files "
        "(tokenizer.json, tokenizer_config.json) there"
    )
