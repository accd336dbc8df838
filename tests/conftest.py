"""Fixtures shared by the test modules: the tiny checkpoint and real running servers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Megatron-Core and PyTriton warn about missing GPU extras on every import; tests need not.
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's tokenizer (byte-level BPE, ChatML template), built offline."""
    from pytest_mtserve.server.tiny_tokenizer import build_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    """transformers' AutoTokenizer on it: the reference the server's own tokenizer must match."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def server_tokenizer(tokenizer_dir: Path):
    """The server's tokenizer on it (no transformers)."""
    from pytest_mtserve.server.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the deterministic tiny Llama-style checkpoint (written once)."""
    run_dir = tmp_path_factory.mktemp("tiny-checkpoint")
    write_in_subprocess(
        "from pytest_mtserve.server.tiny_checkpoint import write_tiny_checkpoint as w; import sys; w(sys.argv[1])",
        run_dir,
    )
    return run_dir


@pytest.fixture(scope="session")
def local_model(tiny_checkpoint: Path):
    """The tiny checkpoint loaded in this process (one process group for the whole session)."""
    from pytest_mtserve.server.local_model import load_model

    return load_model(tiny_checkpoint)


def write_in_subprocess(code: str, *args: object) -> None:
    """Checkpoint writers start a process group; keep it out of the pytest process."""
    import subprocess

    subprocess.run([sys.executable, "-c", f"if __name__ == '__main__':\n    {code}", *map(str, args)], check=True)


@pytest.fixture(scope="session")
def start_tiny_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """Start real servers (torchrun ranks, Triton, FastAPI) on the tiny checkpoint; all stop at the end."""
    from pytest_mtserve.launcher import start_server

    started = []

    def start(*extra: str, checkpoint: Path | None = None):
        log = tmp_path_factory.mktemp("server") / "server.log"
        command = [sys.executable, "-m", "pytest_mtserve.server", "--checkpoint", str(checkpoint or tiny_checkpoint),
                   "--port", "0", "--device", "cpu", *extra]
        server = start_server(command, log, timeout_s=300)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_server_tp1(start_tiny_server):
    return start_tiny_server("--tp", "1")


@pytest.fixture(scope="session")
def tiny_server_tp2(start_tiny_server):
    return start_tiny_server("--tp", "2")
