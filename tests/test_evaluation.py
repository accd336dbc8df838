"""The nemo-evaluator bridge, end to end: real ``evaluate`` runs, offline, on tiny data.

The model is a small local HTTP server with deterministic made-up answers
(``test_evaluation_fake_server``); everything between it and ``BenchmarkResult``
(nemo-evaluator, lm-eval, datasets, the tokenizer) is the real thing.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_mtserve.benchmarks import DEFAULT_REGISTRY
from pytest_mtserve.evaluation import (
    HARNESS_LOG_NAME,
    BenchmarkResult,
    Endpoint,
    EvaluationError,
    HarnessLog,
    run_benchmark,
)
from pytest_mtserve.server.tiny_tokenizer import build_tiny_tokenizer
from pytest_mtserve.testing_data import write_tiny_datasets
from test_evaluation_fake_server import FakeModel, fake_openai_server

LIMIT = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tokenizer dir, datasets dir), built once for the module."""
    root = tmp_path_factory.mktemp("evaluation-assets")
    build_tiny_tokenizer(root / "tokenizer")
    return root / "tokenizer", write_tiny_datasets(root / "datasets")


@pytest.fixture(scope="module")
def server(assets: tuple[Path, Path]) -> Iterator[tuple[Endpoint, FakeModel]]:
    tokenizer_dir, _ = assets
    with fake_openai_server(tokenizer_dir) as (url, model):
        yield Endpoint(url=url, model_name="fake-model", tokenizer_dir=tokenizer_dir), model


def _run(name: str, endpoint: Endpoint, datasets_dir: Path, output_dir: Path, **kwargs) -> BenchmarkResult:
    options = {"limit": LIMIT, "parallelism": 2, "request_timeout": 10, "datasets_dir": datasets_dir}
    return run_benchmark(DEFAULT_REGISTRY.get(name), endpoint, output_dir, **{**options, **kwargs})


def _samples(output_dir: Path) -> list[dict]:
    return [json.loads(line) for path in output_dir.rglob("samples_*.jsonl") for line in path.open()]


@pytest.fixture(scope="module")
def arc_run(server, assets, tmp_path_factory) -> tuple[BenchmarkResult, list[str], float]:
    """One log-likelihood run; SIGTERM has a custom handler while it runs."""
    endpoint, _ = server
    progress: list[str] = []

    def custom_handler(signum, frame) -> None:  # pragma: no cover - never signalled
        pass

    previous = signal.signal(signal.SIGTERM, custom_handler)
    try:
        started = time.monotonic()
        result = _run("arc_easy", endpoint, assets[1], tmp_path_factory.mktemp("arc") / "run", progress=progress.append)
        elapsed = time.monotonic() - started
        assert signal.getsignal(signal.SIGTERM) is custom_handler, "nemo-evaluator's handler leaked"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    return result, progress, elapsed


@pytest.mark.slow
def test_log_likelihood_run_keys_outcomes_by_doc_hash(arc_run) -> None:
    result, _, _ = arc_run
    samples = _samples(result.output_dir)
    assert result.n == LIMIT == len(samples)
    assert set(result.outcomes) == {sample["doc_hash"] for sample in samples}
    assert {sample["doc_hash"]: float(sample["acc"]) for sample in samples} == result.outcomes
    assert set(result.outcomes.values()) <= {0.0, 1.0}


@pytest.mark.slow
def test_score_is_the_mean_of_outcomes_and_settings_are_recorded(arc_run) -> None:
    result, _, _ = arc_run
    assert result.value == pytest.approx(sum(result.outcomes.values()) / result.n)
    assert result.stderr is not None and result.stderr >= 0
    assert result.metric == "acc"
    assert result.settings["limit"] == LIMIT
    assert result.settings["task"] == "lm-evaluation-harness.arc_easy"
    assert len(result.settings["dataset_fingerprint"]) == 64


@pytest.mark.slow
def test_run_reports_progress_and_splits_its_wall_time(arc_run, capsys) -> None:
    result, progress, elapsed = arc_run
    requests = LIMIT * 4  # one per answer choice
    assert progress[-2].startswith(f"requests {requests}/{requests} (100%)")
    assert progress[-1].startswith("arc_easy: acc = ")
    assert result.startup_time_s is not None and result.inference_time_s is not None
    assert result.startup_time_s + result.inference_time_s == pytest.approx(result.wall_time_s)
    assert result.wall_time_s <= elapsed
    # The harness's chatter goes to the log file, not to the terminal.
    assert "Requesting API" in (result.output_dir / HARNESS_LOG_NAME).read_text()
    print(f"arc_easy x{LIMIT}: start-up {result.startup_time_s:.1f} s, inference {result.inference_time_s:.1f} s")


@pytest.mark.slow
def test_group_task_aggregates_all_subtasks_and_repeats_exactly(server, assets, tmp_path, arc_run) -> None:
    endpoint, model = server
    first = _run("mmlu", endpoint, assets[1], tmp_path / "first", limit=1)
    assert first.n == 57  # one question per subject
    assert first.value == pytest.approx(sum(first.outcomes.values()) / 57)
    sent = len(model.requests)
    second = _run("mmlu", endpoint, assets[1], tmp_path / "second", limit=1)
    assert len(model.requests) - sent == 57 + 1  # a fresh output dir: no cache replay (+ probe)
    assert second.outcomes == first.outcomes
    assert second.settings == first.settings


@pytest.mark.slow
def test_chat_benchmark_talks_to_the_chat_endpoint(server, assets, tmp_path) -> None:
    endpoint, model = server
    sent = len(model.requests)
    result = _run("arc_challenge_chat", endpoint, assets[1], tmp_path / "chat", limit=2)
    assert result.n == 2
    assert all("messages" in body for body in model.requests[sent:])


@pytest.mark.slow
def test_a_signal_mid_run_stops_the_session_not_only_this_benchmark(server, assets, tmp_path) -> None:
    """nemo-evaluator's SIGTERM handler exits the process: pytest would fail this one test with
    SystemExit and start the next benchmark. A KeyboardInterrupt makes pytest stop."""
    endpoint, _ = server
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a signal sent too early is harmless
    placeholder = signal.getsignal(signal.SIGTERM)

    def terminate_once_the_harness_listens() -> None:
        deadline = time.monotonic() + 60
        while signal.getsignal(signal.SIGTERM) is placeholder and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate_once_the_harness_listens, daemon=True)
    try:
        sender.start()
        with pytest.raises(KeyboardInterrupt, match="arc_easy: the evaluation was stopped by SIGTERM"):
            _run("arc_easy", endpoint, assets[1], tmp_path / "run", limit=None)
    finally:
        sender.join(timeout=60)
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_missing_offline_dataset_is_a_clear_error(server, tmp_path) -> None:
    endpoint, _ = server
    empty_datasets = tmp_path / "no-datasets"
    empty_datasets.mkdir()
    with pytest.raises(EvaluationError, match="missing offline") as error:
        _run("gsm8k", endpoint, empty_datasets, tmp_path / "run")
    assert str(tmp_path / "run") in str(error.value)
    assert "gsm8k" in str(error.value)


def test_unreachable_endpoint_fails_fast(assets, tmp_path) -> None:
    tokenizer_dir, datasets_dir = assets
    nowhere = Endpoint(url="http://127.0.0.1:9", model_name="m", tokenizer_dir=tokenizer_dir)
    started = time.monotonic()
    with pytest.raises(EvaluationError, match="unreachable.*127.0.0.1:9"):
        _run("arc_easy", nowhere, datasets_dir, tmp_path / "run")
    assert time.monotonic() - started < 5


def test_output_dir_must_be_new(server, assets, tmp_path) -> None:
    endpoint, _ = server
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "results.yml").write_text("{}")
    with pytest.raises(EvaluationError, match="not empty"):
        _run("arc_easy", endpoint, assets[1], tmp_path / "used")


def test_log_likelihood_needs_a_tokenizer(server, assets, tmp_path) -> None:
    endpoint, _ = server
    without_tokenizer = Endpoint(url=endpoint.url, model_name=endpoint.model_name)
    with pytest.raises(EvaluationError, match="tokenizer_dir"):
        _run("arc_challenge", without_tokenizer, assets[1], tmp_path / "run")


def test_endpoint_urls() -> None:
    endpoint = Endpoint(url="http://127.0.0.1:8080/", model_name="m")
    assert endpoint.completions_url == "http://127.0.0.1:8080/v1/completions"
    assert endpoint.chat_url == "http://127.0.0.1:8080/v1/chat/completions"


def test_harness_log_reports_progress_at_most_every_interval(tmp_path, monkeypatch) -> None:
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 15.0, 16.0])  # start, then one tick per write
    monkeypatch.setattr("pytest_mtserve.evaluation.time.monotonic", lambda: next(clock))
    lines: list[str] = []
    log = HarnessLog(tmp_path / "h.log", lines.append)
    log.write("loading tasks\r\n")
    log.write("\rRequesting API:   0%|   | 0/100 [00:00<?, ?it/s]")  # drawn at t=2
    log.write("\rRequesting API:  10%|#  | 10/100 [00:01<00:09, 10it/s]")  # 0/100 finished, dated t=2
    log.write("\rRequesting API:  50%|#  | 5")  # 10/100 dated t=3: too soon to report
    log.write("0/100 [00:13<00:13, 4it/s]\rRequesting API: 100%|###| 100/100 [00:20<00:00, 5it/s]")  # t=15
    log.write("\n")  # tqdm's closing newline at t=16 finishes the last bar, drawn at t=15
    log.close()
    assert log.first_request_at == 2.0
    assert lines == [
        "requests 0/100 (0%), inference started",
        "requests 50/100 (50%), 3.8 req/s, 13 s left",
        "requests 100/100 (100%), 7.7 req/s",
    ]
    assert log.tail().endswith("100/100 [00:20<00:00, 5it/s]")


def test_harness_log_dates_a_bar_by_its_drawing_not_by_the_next_one(tmp_path, monkeypatch) -> None:
    """Fast requests: tqdm draws 0/N at the start and N/N at the end, nothing between; the 0/N
    line is finished only by the N/N one's \r, yet inference started when it was drawn."""
    clock = iter([0.0, 5.0, 9.0, 9.0])
    monkeypatch.setattr("pytest_mtserve.evaluation.time.monotonic", lambda: next(clock))
    lines: list[str] = []
    log = HarnessLog(tmp_path / "h.log", lines.append)
    log.write("\rRequesting API:   0%|   | 0/800 [00:00<?, ?it/s]")
    log.write("\rRequesting API: 100%|###| 800/800 [00:04<00:00, 200it/s]")
    log.write("\n")
    log.close()
    assert lines == ["requests 0/800 (0%), inference started", "requests 800/800 (100%), 200.0 req/s"]
