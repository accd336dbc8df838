"""The nemo-evaluator bridge: run one benchmark against a served model, keep every answer.

``run_benchmark`` drives ``nemo_evaluator.api.evaluate`` (nemo-evaluator 0.2.8, which runs
nvidia-lm-eval 26.3's ``lm-eval`` in a subprocess) and guards the traps it has:

- its adapter proxy is started with multiprocessing "spawn" and hangs under pytest: it is
  disabled (no interceptors, no post-eval hooks), so lm-eval talks to the server directly;
- it installs SIGINT/SIGTERM handlers and never restores them: they are restored here;
- telemetry posts to a remote endpoint by default: switched off;
- reusing an output directory replays lm-eval's request cache: each run needs a new one;
- its harness defaults are not greedy-exact (temperature 1e-7, 30 s timeout, 5 retries):
  everything the result depends on is set explicitly;
- ``check_endpoint`` polls forever: one probe with a timeout is made here instead.

Offline data (``datasets_dir``): lm-eval's stock tasks load ``datasets.load_dataset(
"<repo_id>")``, which, with ``HF_DATASETS_OFFLINE=1``, resolves a directory of that name
relative to the working directory (layout: ``pytest_mtserve.datasets``). The harness
subprocess inherits this process's working directory, so the evaluation runs with
``datasets_dir`` as the working directory. This is more robust than the alternative (a
custom task YAML through ``--include_path``): the stock task definitions, prompts and
``doc_hash`` values stay exactly those of nvidia-lm-eval.

Progress: the harness's output (lm-eval's log and its ``Requesting API`` tqdm bar, which
counts HTTP requests: one per question for generation tasks, one per answer choice for
log-likelihood tasks) is written to ``<output_dir>/harness.log``, not to the terminal; the
``progress`` callback gets one line at most every ``PROGRESS_INTERVAL_S`` seconds with the
requests done, the total, the rate and the time left. The first progress bar also splits
the wall time into harness start-up (imports, dataset loading, prompt building) and
inference (requests, then scoring).

The process-wide state this needs (working directory, environment, ``sys.stdout``, signal
handlers) is set for the duration of the call and restored afterwards, so ``run_benchmark``
must be called from the main thread and not concurrently with itself in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pytest_mtserve.benchmarks import AD_HOC_PREFIX, Benchmark
from pytest_mtserve.statistics import REPEAT_MARK

PROGRESS_INTERVAL_S = 10.0
LOG_TAIL_LINES = 40
HARNESS_LOG_NAME = "harness.log"
# The harness is greedy with these: temperature 0 is what lm-eval sends for log-likelihood.
GREEDY_TEMPERATURE = 0.0
GREEDY_TOP_P = 1.0
MAX_RETRIES = 1  # a failing request is a server bug to report, not noise to retry through

ProgressCallback = Callable[[str], None]


class EvaluationError(Exception):
    """A benchmark run that produced no valid result; the message says why and where."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A served model: ``url`` is the base (``http://127.0.0.1:8080``), without ``/v1``."""

    url: str
    model_name: str
    tokenizer_dir: Path | None = None  # a local HF tokenizer, for log-likelihood tasks

    @property
    def completions_url(self) -> str:
        return self.url.rstrip("/") + "/v1/completions"

    @property
    def chat_url(self) -> str:
        return self.url.rstrip("/") + "/v1/chat/completions"


@dataclasses.dataclass
class BenchmarkResult:
    """One benchmark's score and the per-question values it is the mean of."""

    benchmark: str
    metric: str
    value: float
    stderr: float | None
    n: int
    outcomes: dict[str, float]  # question id (lm-eval doc_hash) -> value of the metric
    settings: dict[str, Any]  # what the score depends on; compare before pairing outcomes
    output_dir: Path
    wall_time_s: float
    startup_time_s: float | None = None  # until the first request; None if none was seen
    inference_time_s: float | None = None  # from the first request to the end (and scoring)


def run_benchmark(
    benchmark: Benchmark,
    endpoint: Endpoint,
    output_dir: Path,
    *,
    limit: int | None,
    parallelism: int,
    request_timeout: float,
    datasets_dir: Path | None,
    progress: ProgressCallback | None = None,
) -> BenchmarkResult:
    """Evaluate ``benchmark`` on ``endpoint``; write everything under a new ``output_dir``.

    ``limit`` caps the questions per lm-eval task (per subject for mmlu); ``datasets_dir``
    holds the datasets in hub layout and makes the run offline. Raises ``EvaluationError``.
    """
    if threading.current_thread() is not threading.main_thread():
        raise EvaluationError(
            "run_benchmark must run in the main thread (nemo-evaluator sets signal handlers)"
        )
    output_dir = _new_output_dir(output_dir)
    # The harness runs in datasets_dir: relative paths would no longer point where meant.
    datasets_dir = None if datasets_dir is None else Path(datasets_dir).resolve()
    if endpoint.tokenizer_dir is not None:
        tokenizer_dir = Path(endpoint.tokenizer_dir).resolve()
        endpoint = dataclasses.replace(endpoint, tokenizer_dir=tokenizer_dir)
    _check_inputs(benchmark, endpoint, datasets_dir)
    _probe_endpoint(benchmark, endpoint, request_timeout)
    harness_log = HarnessLog(output_dir / HARNESS_LOG_NAME, progress)
    started = time.monotonic()
    try:
        with _harness_process_state(output_dir, datasets_dir, harness_log):
            _evaluate(benchmark, endpoint, output_dir, limit, parallelism, request_timeout)
    except SystemExit:
        # nemo-evaluator's SIGINT/SIGTERM handler stops the harness and exits the process;
        # inside pytest that exit would fail only this test and start the next benchmark.
        raise KeyboardInterrupt(
            f"{benchmark.name}: the evaluation was stopped by {_stopping_signal(output_dir)}"
        ) from None
    except Exception as error:  # the harness fails in many ways; all end up here
        raise EvaluationError(_failure_message(benchmark, output_dir, error, harness_log)) from None
    finally:
        harness_log.close()
    wall_time_s = time.monotonic() - started
    result = _collect_result(benchmark, output_dir, limit, wall_time_s, harness_log)
    if progress:
        progress(
            f"{benchmark.name}: {benchmark.metric} = {result.value:.4f} "
            f"over {result.n} questions in {wall_time_s:.1f} s"
        )
    return result


def _stopping_signal(output_dir: Path) -> str:
    """The signal nemo-evaluator recorded on stopping the harness, as SIGTERM or SIGINT."""
    from nemo_evaluator.core.evaluate import INTERRUPTED_MARKER_FILENAME

    try:
        return json.loads((output_dir / INTERRUPTED_MARKER_FILENAME).read_text())["signal"] or "a signal"
    except (OSError, ValueError, KeyError, TypeError):
        return "a signal"


def _new_output_dir(output_dir: Path) -> Path:
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and any(output_dir.iterdir()):
        # lm-eval would replay its cache from an earlier run and send no requests at all.
        raise EvaluationError(
            f"output directory {output_dir} is not empty; use a new directory per run"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def _check_inputs(benchmark: Benchmark, endpoint: Endpoint, datasets_dir: Path | None) -> None:
    if benchmark.needs_tokenizer:
        if endpoint.tokenizer_dir is None:
            raise EvaluationError(
                f"{benchmark.name} scores log-likelihoods and needs the model's tokenizer: "
                "set Endpoint.tokenizer_dir"
            )
        if not (Path(endpoint.tokenizer_dir) / "tokenizer_config.json").is_file():
            raise EvaluationError(
                f"tokenizer directory {endpoint.tokenizer_dir} has no tokenizer_config.json; "
                "pass a Hugging Face tokenizer directory"
            )
    if datasets_dir is not None and not Path(datasets_dir).is_dir():
        raise EvaluationError(
            f"datasets directory {datasets_dir} does not exist; "
            "write it with pytest_mtserve.datasets.write_hub_dataset"
        )
    if datasets_dir is not None:
        _check_no_task_name_clash(benchmark, Path(datasets_dir))


def _check_no_task_name_clash(benchmark: Benchmark, datasets_dir: Path) -> None:
    """lm-eval reads ``--tasks NAME`` as a folder of task YAMLs when ``NAME`` is a directory
    of its working directory, which is ``datasets_dir`` here: a dataset whose hub id is its
    task's name (gsm8k, hellaswag, winogrande) would make lm-eval run no task at all."""
    task = benchmark.task.removeprefix(AD_HOC_PREFIX)
    if (datasets_dir / task).is_dir():
        raise EvaluationError(
            f"{benchmark.name}: the datasets directory {datasets_dir} has a dataset folder "
            f"'{task}', named like the lm-eval task; lm-eval runs in the datasets directory and "
            f"would take that folder for a folder of task YAMLs (and find no task). Offline "
            f"datasets are not supported for tasks named like their dataset: run {benchmark.name} "
            "with the Hugging Face hub's datasets (no datasets_dir / --datasets-dir)"
        )


def _probe_endpoint(benchmark: Benchmark, endpoint: Endpoint, timeout_s: float) -> None:
    """One request like nemo-evaluator's ``check_endpoint``, but bounded in time."""
    if benchmark.endpoint_type == "chat":
        url, body = endpoint.chat_url, {"messages": [{"role": "user", "content": "hello"}]}
    else:
        url, body = endpoint.completions_url, {"prompt": "hello, my name is"}
    body.update(model=endpoint.model_name, max_tokens=1)
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        raise EvaluationError(
            f"endpoint {url} answered a probe request with HTTP {error.code}: {detail}"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise EvaluationError(
            f"endpoint {url} is unreachable ({reason}); is the server running at {endpoint.url}?"
        ) from None


@contextlib.contextmanager
def _harness_process_state(
    output_dir: Path, datasets_dir: Path | None, harness_log: HarnessLog
) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environment(_harness_environment(output_dir, datasets_dir)))
        stack.enter_context(_restored_signal_handlers())
        if datasets_dir is not None:
            stack.enter_context(_working_directory(datasets_dir))
        # nemo-evaluator prints the harness's output to sys.stdout as it streams in.
        stack.enter_context(contextlib.redirect_stdout(harness_log))
        yield


def _harness_environment(output_dir: Path, datasets_dir: Path | None) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # lm-eval is installed next to this Python
    variables = {
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "NEMO_EVALUATOR_TELEMETRY_LEVEL": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # nemo-evaluator runs the harness on a pty of size 0x0, where tqdm draws empty
        # progress bars (it reads -1 rows); progress reporting parses those bars.
        "TQDM_NROWS": "40",
        "TQDM_NCOLS": "100",
        "TQDM_MININTERVAL": "1",  # redraw at most once a second: keeps harness.log small
    }
    if datasets_dir is None:
        # Online: keep the hub download cache, but a fresh processed-datasets cache, which
        # otherwise can serve stale data.
        variables["HF_DATASETS_CACHE"] = str(output_dir / "hf_datasets_cache")
    else:
        variables |= {
            "HF_HOME": str(output_dir / "hf_home"),
            "HF_DATASETS_CACHE": str(output_dir / "hf_home" / "datasets"),
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    return variables


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _restored_signal_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _evaluate(
    benchmark: Benchmark,
    endpoint: Endpoint,
    output_dir: Path,
    limit: int | None,
    parallelism: int,
    request_timeout: float,
) -> None:
    from nemo_evaluator.api import evaluate
    from nemo_evaluator.api.api_dataclasses import (
        ApiEndpoint,
        ConfigParams,
        EvaluationConfig,
        EvaluationTarget,
    )

    extra: dict[str, Any] = {}
    if benchmark.num_fewshot is not None:
        extra["num_fewshot"] = benchmark.num_fewshot
    if benchmark.needs_tokenizer:
        extra |= {"tokenizer": str(endpoint.tokenizer_dir), "tokenizer_backend": "huggingface"}
    params = ConfigParams(
        task=_ad_hoc_lm_eval_task(benchmark.task),
        limit_samples=limit,
        parallelism=parallelism,
        request_timeout=math.ceil(request_timeout),
        max_retries=MAX_RETRIES,
        temperature=GREEDY_TEMPERATURE,
        top_p=GREEDY_TOP_P,
        extra=extra,
    )
    url = endpoint.chat_url if benchmark.endpoint_type == "chat" else endpoint.completions_url
    api_endpoint = ApiEndpoint(
        url=url,
        model_id=endpoint.model_name,
        type=benchmark.endpoint_type,
        # No interceptor and no hook: nemo-evaluator then starts no adapter proxy.
        adapter_config={
            "interceptors": [{"name": "endpoint", "enabled": False}],
            "post_eval_hooks": [],
        },
    )
    evaluate(
        eval_cfg=EvaluationConfig(type=benchmark.task, output_dir=str(output_dir), params=params),
        target_cfg=EvaluationTarget(api_endpoint=api_endpoint),
    )


def _ad_hoc_lm_eval_task(task: str) -> str | None:
    """lm-eval's task name for ``lm-evaluation-harness.<task>``; None for framework.yml tasks.

    A framework.yml task maps to its own lm-eval task (``mmlu`` -> ``mmlu_str``): setting
    ``params.task`` would override that mapping, so it is set only for ad hoc tasks.
    """
    return task.removeprefix(AD_HOC_PREFIX) if task.startswith(AD_HOC_PREFIX) else None


class HarnessLog:
    """A ``sys.stdout`` stand-in: writes the harness's output to a file, reports progress."""

    # tqdm: "\rRequesting API:  45%|████▌     | 45/100 [00:02<00:03, 17.31it/s]"
    _PROGRESS = re.compile(r"Requesting API:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[")

    def __init__(self, path: Path, progress: ProgressCallback | None) -> None:
        self.path = path
        self._file = path.open("w", encoding="utf-8", errors="replace")
        self._progress = progress
        self._terminal = sys.stdout  # where the callback's own prints belong
        self._started = time.monotonic()
        self._last_report = -math.inf
        self._pending = ""  # the line being drawn: tqdm ends it with the next \r or \n
        self._pending_at = 0.0  # when its last text came: what it shows was true then
        self.first_request_at: float | None = None  # seconds after start

    def write(self, text: str) -> int:
        now = time.monotonic() - self._started
        self._file.write(text)
        # Only finished lines are parsed, so a bar split across writes is read once, whole. A
        # bar is finished by the next one's \r, which may come much later (at the end, when
        # requests are fast): it is dated by its own text, not by the \r.
        first, *rest = re.split(r"[\r\n]", text)
        if not rest:
            if first:
                self._pending, self._pending_at = self._pending + first, now
            return len(text)
        finished = [(self._pending + first, now if first else self._pending_at), *((line, now) for line in rest[:-1])]
        self._pending, self._pending_at = rest[-1], now
        for line, at in finished:
            counts = self._PROGRESS.search(line)
            if counts:
                self._on_progress(int(counts[1]), int(counts[2]), at)
        return len(text)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        # tqdm redraws with carriage returns: keep the last state of each line.
        cleaned = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
        return "\n".join(cleaned[-lines:])

    def _on_progress(self, done: int, total: int, now: float) -> None:
        if self.first_request_at is None:
            self.first_request_at = now
        if self._progress and (now - self._last_report >= PROGRESS_INTERVAL_S or done == total):
            self._last_report = now
            with contextlib.redirect_stdout(self._terminal):
                self._progress(_progress_line(done, total, now - self.first_request_at))


def _progress_line(done: int, total: int, elapsed_s: float) -> str:
    line = f"requests {done}/{total} ({100 * done / max(total, 1):.0f}%)"
    if done == 0 or elapsed_s <= 0:
        return line + ", inference started"
    rate = done / elapsed_s
    left = f", {(total - done) / rate:.0f} s left" if done < total else ""
    return f"{line}, {rate:.1f} req/s{left}"


def _failure_message(
    benchmark: Benchmark, output_dir: Path, error: Exception, harness_log: HarnessLog
) -> str:
    harness_log.flush()
    tail = harness_log.tail()
    # The harness's own error is the last line it printed; nemo-evaluator's exception only
    # says "Evaluation failed! Please consult the logs below".
    reason = _last_line(tail) if isinstance(error, RuntimeError) else ""
    reason = reason or f"{type(error).__name__}: {_last_line(str(error))}"
    return (
        f"{benchmark.name} ({benchmark.task}) failed: {reason}{_hint(tail)}\n"
        f"output directory: {output_dir}\nlast lines of {harness_log.path.name}:\n{tail}"
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _hint(log_tail: str) -> str:
    if "OfflineModeIsEnabled" in log_tail or "Couldn't reach" in log_tail:
        return (
            "\nhint: a dataset is missing offline; write it into datasets_dir with "
            "pytest_mtserve.datasets.write_hub_dataset"
        )
    if "KeyError" in log_tail and "dataset_dict" in log_tail:
        return (
            "\nhint: a split the task reads is missing from the offline dataset "
            "(see pytest_mtserve.datasets)"
        )
    return ""


# -- results ------------------------------------------------------------------------------


def _collect_result(
    benchmark: Benchmark,
    output_dir: Path,
    limit: int | None,
    wall_time_s: float,
    harness_log: HarnessLog,
) -> BenchmarkResult:
    samples = _read_samples(benchmark, output_dir)
    outcomes = _outcomes(samples, benchmark)
    value = _reported_score(benchmark, output_dir)
    mean = statistics.fmean(outcomes.values())
    if not math.isclose(mean, value, rel_tol=1e-9, abs_tol=1e-9):
        raise EvaluationError(
            f"{benchmark.name}: the harness reports {benchmark.metric} = {value} but its "
            f"{len(outcomes)} per-question values average {mean} (only a metric that is a mean "
            f"over questions can be gated); output directory: {output_dir}"
        )
    startup = harness_log.first_request_at
    return BenchmarkResult(
        benchmark=benchmark.name,
        metric=benchmark.metric,
        value=value,
        # lm-eval reports no standard error for groups (mmlu): the same formula, for all.
        stderr=_standard_error(list(outcomes.values())),
        n=len(outcomes),
        outcomes=outcomes,
        settings=_settings(benchmark, limit, samples, outcomes),
        output_dir=output_dir,
        wall_time_s=wall_time_s,
        startup_time_s=startup,
        inference_time_s=None if startup is None else wall_time_s - startup,
    )


def _read_samples(benchmark: Benchmark, output_dir: Path) -> list[dict]:
    """The per-question records of the gating metric's filter, over all (sub)tasks."""
    files = sorted(output_dir.rglob("samples_*.jsonl"))
    if not files:
        raise EvaluationError(
            f"{benchmark.name}: lm-eval wrote no samples_*.jsonl under {output_dir}"
        )
    samples = []
    for path in files:
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]  # drop the timestamp
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                if record.get("filter") == benchmark.metric_filter:
                    record["task"] = task
                    samples.append(record)
    missing = [record["doc_id"] for record in samples if benchmark.metric_name not in record]
    if not samples or missing:
        raise EvaluationError(
            f"{benchmark.name}: no per-question {benchmark.metric_name!r} for filter "
            f"{benchmark.metric_filter!r} in {[path.name for path in files]}; "
            "check Benchmark.metric"
        )
    return samples


def _outcomes(samples: list[dict], benchmark: Benchmark) -> dict[str, float]:
    outcomes: dict[str, float] = {}
    # A question that appears twice (real MMLU has duplicates) keeps both answers: the
    # repeats get "#2", "#3"..., numbered in (task, doc_id) order, which is stable.
    for record in sorted(samples, key=lambda record: (record["task"], record["doc_id"])):
        key, repeat = record["doc_hash"], 1
        while key in outcomes:
            repeat += 1
            key = f"{record['doc_hash']}{REPEAT_MARK}{repeat}"
        outcomes[key] = float(record[benchmark.metric_name])
    return outcomes


def _reported_score(benchmark: Benchmark, output_dir: Path) -> float:
    """The harness's score of the whole task: the group's for mmlu-like tasks."""
    results_files = sorted(output_dir.rglob("results_*.json"))
    if not results_files:
        raise EvaluationError(
            f"{benchmark.name}: lm-eval wrote no results_*.json under {output_dir}"
        )
    results = json.loads(results_files[-1].read_text(encoding="utf-8"))
    subtasks = results.get("group_subtasks", {})
    nested = {name for members in subtasks.values() for name in members}
    top_level = [name for name in subtasks if name not in nested]
    scores = {**results.get("results", {}), **results.get("groups", {})}
    key = f"{benchmark.metric_name},{benchmark.metric_filter}"
    if len(top_level) != 1 or key not in scores.get(top_level[0], {}):
        reported = {name: sorted(scores.get(name, {})) for name in top_level}
        raise EvaluationError(
            f"{benchmark.name}: no {key!r} for one top-level task in {results_files[-1]}; "
            f"reported: {reported}"
        )
    return float(scores[top_level[0]][key])


def _standard_error(values: list[float]) -> float | None:
    """Sample standard deviation / sqrt(n), as lm-eval computes it for a mean."""
    if len(values) < 2:
        return None
    return statistics.stdev(values) / math.sqrt(len(values))


def _settings(
    benchmark: Benchmark, limit: int | None, samples: list[dict], outcomes: dict[str, float]
) -> dict[str, Any]:
    return {
        "task": benchmark.task,
        "endpoint_type": benchmark.endpoint_type,
        "metric": benchmark.metric,
        "num_fewshot": benchmark.num_fewshot,
        "limit": limit,
        "dataset_fingerprint": _fingerprint(outcomes),
        # Changes when the prompt format or the few-shot examples change.
        "prompt_fingerprint": _fingerprint(record["prompt_hash"] for record in samples),
    }


def _fingerprint(hashes: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
