"""The plugin's command-line options and ini keys: declared once, converted and checked once.

Each option is also an ini key ``mtserve_<name>`` where that makes sense (``--tp`` ->
``mtserve_tp``); a command-line value wins over the ini file.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_mtserve.launcher import ServerSettings

DEMO_CHECKPOINT = "demo"
DEFAULT_BENCHMARKS = "mmlu,arc_challenge"
# A GPU forward pass of a batch of 8 scoring requests is bound by Python's kernel launches,
# not the GPU: batches of 32 served 1.4x the tokens/s on an H200 (docs/performance.md).
GPU_MAX_BATCH_SIZE, CPU_MAX_BATCH_SIZE = 32, 8


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0 (any free port) to 65535")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError("must be between 0 and 1")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be 0 or more")
    return value


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError("must be auto or a whole number of at least 1")
    return int(text)


def _device(text: str) -> str:
    if text not in ("auto", "cuda", "cpu"):
        raise ValueError("must be auto, cuda or cpu")
    return text


def _interpreter(text: str) -> str:
    path = shutil.which(text)
    if path is None:
        raise ValueError("no such executable; pass the path of a Python interpreter")
    return path


# Server options whose values the plugin sets and relies on (the batch size for the requests in
# flight, tp/pp for baselines' provenance, the port to reach it), with the plugin's own flag for each.
_SERVER_FLAGS_OF_THE_PLUGIN = {
    "--checkpoint": "--checkpoint", "--tp": "--tp", "--tensor-model-parallel-size": "--tp",
    "--pp": "--pp", "--pipeline-model-parallel-size": "--pp", "--device": "--device",
    "--max-batch-size": "--max-batch-size", "--inference-max-seq-length": "--inference-max-seq-length",
    "--port": "--server-port", "--server-port": "--server-port", "--host": None,
}  # fmt: skip


def _server_args(text: str) -> tuple[str, ...]:
    args = tuple(shlex.split(text))
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _SERVER_FLAGS_OF_THE_PLUGIN:
            own = _SERVER_FLAGS_OF_THE_PLUGIN[flag]
            raise ValueError(f"{flag} is set by the plugin; " + (f"use its {own} option" if own else "it serves on 127.0.0.1 only"))
    return args


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError("must name at least one benchmark")
    return names


@dataclass(frozen=True)
class SampleLimits:
    """``--limit-samples 100,mmlu=2``: 100 questions per (sub)task, 2 per MMLU subject."""

    default: int | None
    per_benchmark: dict[str, int] = field(default_factory=dict)

    def for_benchmark(self, name: str) -> int | None:
        return self.per_benchmark.get(name, self.default)


def _limits(text: str) -> SampleLimits:
    default, per_benchmark = None, {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.rpartition("=")
        if name:
            per_benchmark[name.strip()] = _positive_int(count)
        else:
            default = _positive_int(count)
    return SampleLimits(default, per_benchmark)


def _url(text: str) -> str:
    if not re.match(r"https?://[^/]+", text):
        raise ValueError("must be an http:// or https:// URL such as http://127.0.0.1:8080")
    # The completions routes are appended later; accept the URL with or without them.
    return re.sub(r"(/v1)?/*$", "", text)


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    convert: Callable[[str], Any] = str
    default: str | None = None  # text, converted like a command-line value
    ini: bool = True
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def ini_name(self) -> str:
        return f"mtserve_{self.dest}"


OPTIONS = (
    Option("--checkpoint", "Megatron checkpoint to serve: a run directory (its latest iteration) "
            "or its iter_NNNNNNN folder; 'demo' serves the built-in SmolLM2-135M demo.",
            ini=False, metavar="DIR"),
    Option("--endpoint", "Test a server that is already running at URL instead of launching one.",
            _url, ini=False, metavar="URL"),
    Option("--tp", "Tensor-parallel size.", _positive_int, "1", metavar="N"),
    Option("--pp", "Pipeline-parallel size.", _positive_int, "1", metavar="N"),
    Option("--num-gpus", "GPUs to use; must equal tp x pp (the default).", _positive_int,
            metavar="N"),
    Option("--device", "Where the server runs the model: auto, cuda or cpu.", _device, "auto"),
    Option("--max-batch-size", f"Largest batch the server's dynamic batcher forms (default "
            f"auto: {GPU_MAX_BATCH_SIZE} on GPUs, {CPU_MAX_BATCH_SIZE} on the CPU).", _batch_size,
            "auto", metavar="N"),
    Option("--inference-max-seq-length", "Longest prompt plus generation the server accepts, "
            "in tokens.", _positive_int, "4096", metavar="N"),
    Option("--server-port", "Port of the launched server's HTTP API (0: any free port).",
            _port, "0", metavar="PORT"),
    Option("--server-python", "Python interpreter that runs the server (default: pytest's "
            "own), e.g. a virtual environment holding the server's packages apart from the "
            "evaluation's; pytest_mtserve must be importable there.", _interpreter,
            metavar="PYTHON"),
    Option("--server-args", "More options of the launched server as one string, after the "
            "plugin's own (`mtserve serve --help` lists them), e.g. "
            "--server-args='--attention-backend unfused --log-batches'.", _server_args,
            metavar="ARGS"),
    Option("--server-timeout", "Seconds to wait for the launched server to be ready.",
            _positive_float, "900", metavar="SECONDS"),
    Option("--benchmarks", "Comma-separated benchmarks to run, e.g. mmlu,arc_challenge, or "
            "lm-evaluation-harness.<task> for any lm-eval task.", _names, DEFAULT_BENCHMARKS,
            metavar="A,B"),
    Option("--limit-samples", "Evaluate only the first N questions of each (sub)task; "
            "per benchmark as NAME=N, e.g. 100,mmlu=2.", _limits, metavar="N[,NAME=N]"),
    Option("--parallelism", "Concurrent requests the evaluation sends (default: twice "
            "--max-batch-size, so that a full batch waits while the server computes another).",
            _positive_int, metavar="N"),
    Option("--request-timeout", "Seconds before a request to the server counts as failed. "
            "lm-eval includes the time a request waits for one of its --parallelism "
            "connections, so this bounds a whole benchmark run: raise it for long CPU runs.",
            _positive_float, "3600", metavar="SECONDS"),
    Option("--baselines-dir", "Where baselines live, relative to the rootdir.", str,
            "baselines", metavar="DIR"),
    Option("--model-id", "Baseline folder of this model (default: the checkpoint's run "
            "directory name; with --endpoint the served model name).", metavar="ID"),
    Option("--datasets-dir", "Offline datasets laid out like the Hugging Face hub.",
            metavar="DIR"),
    Option("--tokenizer", "Hugging Face tokenizer directory for log-likelihood benchmarks with "
            "--endpoint (with --checkpoint the checkpoint's own tokenizer is used).",
            ini=False, metavar="DIR"),
    Option("--mtserve-report", "Also write the gate's results as JSON to PATH.", ini=False,
            metavar="PATH"),
    Option("--gate-alpha", "Significance level of the regression test.", _fraction, "0.05",
            metavar="P"),
    Option("--gate-min-effect", "Smallest drop that fails the gate, in metric units "
            "(0.01 = one point of accuracy).", _non_negative_float, "0.01", metavar="X"),
    Option("--gate-tolerance", "Instead of statistics, fail when the score falls below "
            "baseline x (1 - X).", _fraction, metavar="X"),
)  # fmt: skip


@dataclass(frozen=True)
class MtserveOptions:
    """The plugin's options, converted and checked once at configure time (fields are named
    after the options: ``--limit-samples`` -> ``limit_samples``)."""

    checkpoint: str | None
    endpoint: str | None
    tp: int
    pp: int
    num_gpus: int | None
    device: str
    max_batch_size: int
    inference_max_seq_length: int
    server_port: int
    server_python: str | None
    server_args: tuple[str, ...] | None
    server_timeout: float
    benchmarks: tuple[str, ...]
    limit_samples: SampleLimits | None
    parallelism: int
    request_timeout: float
    baselines_dir: str
    model_id: str | None
    datasets_dir: str | None
    tokenizer: str | None
    mtserve_report: str | None
    gate_alpha: float
    gate_min_effect: float
    gate_tolerance: float | None
    update_baselines: bool
    rootdir: Path

    @property
    def has_target(self) -> bool:
        return bool(self.checkpoint or self.endpoint)

    @property
    def baselines_root(self) -> Path:
        return self.rootdir / self.baselines_dir

    def server_settings(self, checkpoint: Path) -> ServerSettings:
        from pytest_mtserve.launcher import ServerSettings, queue_delay_for

        return ServerSettings(
            checkpoint=checkpoint,
            tp=self.tp,
            pp=self.pp,
            max_batch_size=self.max_batch_size,
            inference_max_seq_length=self.inference_max_seq_length,
            port=self.server_port,
            device=self.device,
            python=self.server_python,
            queue_delay_us=queue_delay_for(self.parallelism, self.max_batch_size),
            extra_args=self.server_args or (),
        )


def read_options(config: pytest.Config) -> MtserveOptions:
    values = {option.dest: _option_value(config, option) for option in OPTIONS}
    if values["checkpoint"] and values["endpoint"]:
        raise pytest.UsageError("--checkpoint and --endpoint exclude each other: pass one")
    if values["server_args"] and values["endpoint"]:
        raise pytest.UsageError("--server-args: with --endpoint no server is launched; pass them to the running server instead")
    if values["num_gpus"] is not None and values["num_gpus"] != values["tp"] * values["pp"]:
        raise pytest.UsageError(
            f"--num-gpus {values['num_gpus']} must equal --tp {values['tp']} x --pp "
            f"{values['pp']} (each GPU holds one model shard); change one of them"
        )
    checkpoint = values["checkpoint"]
    if checkpoint and checkpoint != DEMO_CHECKPOINT and not Path(checkpoint).is_dir():
        raise pytest.UsageError(
            f"--checkpoint {checkpoint}: no such directory; pass a run directory, its "
            f"iter_NNNNNNN folder, or '{DEMO_CHECKPOINT}'"
        )
    if values["max_batch_size"] == "auto":
        values["max_batch_size"] = GPU_MAX_BATCH_SIZE if _serves_on_gpu(values["device"]) else CPU_MAX_BATCH_SIZE
    # A client sends its next request only after the answer to its last: with no more
    # requests in flight than one batch holds, the GPU idles for every round trip.
    values["parallelism"] = values["parallelism"] or 2 * values["max_batch_size"]
    return MtserveOptions(
        **values, update_baselines=bool(config.getoption("update_baselines")), rootdir=_project_dir(config)
    )


def _serves_on_gpu(device: str) -> bool:
    """Whether the server will run on GPUs, guessed for ``auto`` without importing torch
    (the plugin loads in every pytest run): an NVIDIA device node that CUDA_VISIBLE_DEVICES
    does not hide. A wrong guess only changes the default batch size."""
    if device != "auto":
        return device == "cuda"
    if os.environ.get("CUDA_VISIBLE_DEVICES", "all").strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


_PATH_FLAGS = ("--checkpoint", "--datasets-dir", "--tokenizer", "--baselines-dir", "--mtserve-report")
_INI_FILES = {"pytest.ini": "", ".pytest.ini": "", "pyproject.toml": "[tool.pytest", "tox.ini": "[pytest]", "setup.cfg": "[tool:pytest]"}


def _project_dir(config: pytest.Config) -> Path:
    """Where relative --baselines-dir resolves: the rootdir, unless pytest got it wrong.

    pytest picks its rootdir and ini file before it loads this plugin, so in
    ``pytest --checkpoint /ckpts/run`` it takes /ckpts/run for a test path. Without an ini
    file that only moves the rootdir (we use the invocation directory instead); with one,
    pytest has silently ignored it, and the run must not go on as if it had not.
    """
    args = list(config.invocation_params.args)
    invocation = Path(config.invocation_params.dir)
    misread = [value for flag, value in zip(args, args[1:]) if flag in _PATH_FLAGS and _outside(Path(value), invocation)]
    if not misread or config.getoption("rootdir", None) or config.inipath is not None:
        return config.rootpath
    ignored = _ini_file_above(invocation)
    if ignored is not None:
        flag = args[args.index(misread[0]) - 1]
        raise pytest.UsageError(
            f"pytest read {misread[0]!r} as a test path before pytest-mtserve was loaded and so "
            f"ignored {ignored}; write {flag}={misread[0]} (with '=')"
        )
    return invocation


def _outside(path: Path, directory: Path) -> bool:
    path = (directory / path).resolve()
    return path.exists() and not path.is_relative_to(directory.resolve())


def _ini_file_above(directory: Path) -> Path | None:
    for folder in (directory, *directory.parents):
        for name, marker in _INI_FILES.items():
            candidate = folder / name
            if candidate.is_file() and marker in candidate.read_text(errors="replace"):
                return candidate
    return None


def _option_value(config: pytest.Config, option: Option) -> Any:
    text = config.getoption(option.dest)
    if text is None and option.ini:
        text = config.getini(option.ini_name)
    text = option.default if text in (None, "") else text
    if text is None:
        return None
    try:
        return option.convert(str(text))
    except ValueError as error:
        source = option.flag if config.getoption(option.dest) is not None else option.ini_name
        raise pytest.UsageError(f"{source} {text!r}: {error}") from None
