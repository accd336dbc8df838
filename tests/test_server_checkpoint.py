"""Finding and validating checkpoints: every bad input fails early with the path and the fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pytest_mtserve.server.architecture import ArchitectureError
from pytest_mtserve.server.checkpoint import CheckpointError, locate_checkpoint


@pytest.fixture()
def run_dir(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run directory that a test may break."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


def test_run_directory_resolves_to_its_latest_iteration(run_dir: Path) -> None:
    info = locate_checkpoint(run_dir)
    assert info.iteration_dir == run_dir / "iter_0000001"
    assert info.iteration == 1
    assert info.architecture.num_attention_heads == 16
    assert info.architecture.padded_vocab_size == 1024  # read from the shards' metadata
    assert (info.tokenizer_dir / "tokenizer.json").exists()


def test_iteration_folder_is_accepted_directly(run_dir: Path) -> None:
    assert locate_checkpoint(run_dir / "iter_0000001").iteration == 1


def test_megatron_lm_marker_and_highest_number(run_dir: Path) -> None:
    shutil.copytree(run_dir / "iter_0000001", run_dir / "iter_0000020")
    shutil.copytree(run_dir / "iter_0000001", run_dir / "iter_0000300")
    (run_dir / "latest_train_state.pt").unlink()
    (run_dir / "latest_checkpointed_iteration.txt").write_text("20\n")
    assert locate_checkpoint(run_dir).iteration == 20
    (run_dir / "latest_checkpointed_iteration.txt").unlink()
    assert locate_checkpoint(run_dir).iteration == 300


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: [shutil.rmtree(d / "iter_0000001"), (d / "latest_train_state.pt").unlink()], "no iter_NNNNNNN folder"),
        (lambda d: (d / "latest_train_state.pt").unlink() or (d / "latest_checkpointed_iteration.txt").write_text("7"), "iter_0000007 is missing"),
        (lambda d: (d / "iter_0000001" / "run_config.yaml").unlink(), "run_config.yaml is missing"),
        (lambda d: (d / "iter_0000001" / "run_config.yaml").write_text("model: [unclosed"), "cannot parse"),
        (lambda d: (d / "iter_0000001" / "run_config.yaml").write_text("trainer: {}\n"), "no model: mapping"),
        (lambda d: shutil.rmtree(d / "iter_0000001" / "tokenizer"), "no Hugging Face tokenizer"),
        (lambda d: (d / "iter_0000001" / "tokenizer" / "tokenizer.json").unlink(), "has no tokenizer.json.*fast tokenizer"),
        (lambda d: (d / "iter_0000001" / "metadata.json").unlink(), "holds no torch_dist weights"),
    ],
    ids=["missing-path", "no-iteration", "dangling-marker", "no-run-config", "bad-yaml", "no-model-section", "no-tokenizer", "no-tokenizer-json", "no-shards"],
)
def test_bad_checkpoints_name_the_problem(run_dir: Path, breakage, message: str) -> None:
    breakage(run_dir)
    with pytest.raises(CheckpointError, match=message) as error:
        locate_checkpoint(run_dir)
    assert str(run_dir) in str(error.value)


def test_missing_architecture_field_is_named(run_dir: Path) -> None:
    config_file = run_dir / "iter_0000001" / "run_config.yaml"
    config = yaml.safe_load(config_file.read_text())
    del config["model"]["num_layers"]
    config_file.write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="model.num_layers is missing"):
        locate_checkpoint(run_dir)


@pytest.mark.parametrize(("tp", "pp", "message"), [(3, 1, r"--tp 3 does not divide .*num_attention_heads \(16\).*\[1, 2, 4, 8\]"), (1, 2, "--pp 2: pipeline parallelism is not supported")])
def test_parallelism_the_model_cannot_take_is_refused(tiny_checkpoint: Path, tp: int, pp: int, message: str) -> None:
    with pytest.raises(ArchitectureError, match=message):
        locate_checkpoint(tiny_checkpoint).architecture.check_parallelism(tp, pp)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "/nonexistent/ckpt"], "checkpoint path /nonexistent/ckpt does not exist"),
        (["--tp", "3"], "--tp 3 does not divide"),
        (["--frontend-processes", "-1"], "--frontend-processes must be 0 (one per 4 CPU cores) or more"),
        (["--triton-instances", "0"], "--triton-instances must be at least 1"),
        (["--gil-switch-interval-ms", "0"], "--gil-switch-interval-ms must be more than 0"),
        pytest.param(["--device", "cuda"], "no CUDA GPU is visible; use --device cpu", id="no-gpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")),
        (["--device", "cpu", "--cuda-graphs", "on"], "--cuda-graphs on needs a CUDA device"),
        pytest.param(["--cuda-graphs", "on"], "--cuda-graphs on needs a CUDA device", id="graphs-without-gpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")),
    ],
    ids=["missing-checkpoint", "bad-tp", "negative-frontend-processes", "no-triton-instance", "no-switch-interval", "no-gpu", "graphs-on-cpu", "graphs-without-gpu"],
)
def test_server_command_refuses_bad_input_quickly(tiny_checkpoint: Path, args: list[str], message: str) -> None:
    command = [sys.executable, "-m", "pytest_mtserve.server", "--checkpoint", str(tiny_checkpoint), *args]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60  # no process group was started


def test_a_random_weight_checkpoint_loads_with_the_requested_spread(tiny_checkpoint: Path, tmp_path: Path) -> None:
    code = (
        "import sys, torch; from pathlib import Path\n"
        "from pytest_mtserve.server.architecture import run_config_model_section\n"
        "from pytest_mtserve.server.checkpoint_writer import write_random_checkpoint\n"
        "from pytest_mtserve.server.local_model import load_model\n"
        "from pytest_mtserve.server.tiny_checkpoint import TINY_ARCHITECTURE\n"
        "config = run_config_model_section(TINY_ARCHITECTURE, 'megatron.bridge.models.llama.LlamaModelProvider')\n"
        "tokenizer = next(Path(sys.argv[1]).glob('iter_*')) / 'tokenizer'\n"
        "write_random_checkpoint(Path(sys.argv[2]), model_config=config, tokenizer_dir=tokenizer, device=torch.device('cpu'), dtype=torch.float32)\n"
        "weights = torch.cat([p.flatten() for p in load_model(sys.argv[2]).runner.model.parameters()])\n"
        "print('STD', weights.std().item())\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint), str(tmp_path / "random")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    std = float(done.stdout.split("STD")[-1])
    assert 0.019 < std < 0.021


def test_the_ranks_command_line_carries_every_option() -> None:
    """Ranks started for --tp > 1 parse to_argv(options): an option it drops is lost there."""
    from pytest_mtserve.server.options import ServerOptions, parse_server_options, to_argv

    argv = ["--checkpoint", "/ckpt", "--tp", "2", "--max-batch-size", "16", "--inference-max-seq-length", "512",
            "--host", "0.0.0.0", "--port", "9000", "--triton-port", "9001", "--model-name", "m", "--device", "cpu",
            "--dtype", "bfloat16", "--attention-backend", "sdpa", "--queue-delay-us", "10", "--triton-instances", "1", "--request-timeout", "5",
            "--frontend-processes", "3", "--cuda-graphs", "off", "--gil-switch-interval-ms", "5", "--log-batches"]  # fmt: skip
    options = parse_server_options(argv)
    defaults = parse_server_options(["--checkpoint", "/ckpt"])
    assert all(getattr(options, name) != getattr(defaults, name) for name in ServerOptions.__dataclass_fields__
               if name not in ("checkpoint", "pp")), "give every option a non-default value here"  # fmt: skip
    assert parse_server_options(to_argv(options)) == options


def test_front_end_processes_default_to_one_per_four_cores_up_to_four() -> None:
    from pytest_mtserve.server.options import default_frontend_processes

    assert [default_frontend_processes(cores) for cores in (None, 1, 2, 7, 8, 16, 128)] == [1, 1, 1, 1, 2, 4, 4]


def test_attention_defaults_to_sdpa_on_gpus_and_unfused_on_the_cpu() -> None:
    from pytest_mtserve.server.model import resolve_attention_backend

    assert [resolve_attention_backend("auto", torch.device(kind)) for kind in ("cuda", "cpu")] == ["sdpa", "unfused"]
    assert resolve_attention_backend("unfused", torch.device("cuda")) == "unfused"
    with pytest.raises(ValueError, match="unknown attention backend 'flash': use auto, unfused or sdpa"):
        resolve_attention_backend("flash", torch.device("cpu"))


def test_cuda_graphs_default_on_for_one_gpu_and_refuse_the_cpu() -> None:
    from pytest_mtserve.server.options import uses_cuda_graphs

    assert [uses_cuda_graphs("auto", device, tp) for device, tp in (("cuda", 1), ("cuda", 2), ("cpu", 1))] == [True, False, False]
    assert uses_cuda_graphs("on", "cuda", 4) and not uses_cuda_graphs("off", "cuda", 1)
    with pytest.raises(ValueError, match="--cuda-graphs on needs a CUDA device"):
        uses_cuda_graphs("on", "cpu", 1)


def test_cuda_graph_shapes_pad_small_passes_and_leave_large_ones_eager() -> None:
    from pytest_mtserve.server.cuda_graphs import DecoderGraphs

    graphs = DecoderGraphs(torch.nn.Identity(), max_tokens=1714)  # the limit of an 8B model's decoder
    shapes = graphs.shapes()
    assert all(rows * width <= 1714 for rows, width in shapes) and shapes[0] == (1, 1536)
    assert [graphs.padded_shape(*shape) for shape in ((2, 600), (3, 100), (1, 1536), (4, 600), (1, 2000))] == [
        (2, 768), (4, 128), (1, 1536), (4, 600), (1, 2000)
    ]  # fmt: skip
    graphs.enabled = False  # as after a capture ran out of memory
    assert graphs.padded_shape(2, 600) == (2, 600)
