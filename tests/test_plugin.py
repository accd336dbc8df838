"""The plugin's options, parametrization, hooks and gate flow, in pytester runs whose evaluation
is a deterministic fake (the layers below have their own tests)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

# 200 questions; FAKE_SCORES (JSON, benchmark -> number answered right) decides the score.
FAKE_EVALUATION = '''
import hashlib, json, os
import pytest
from pytest_mtserve import evaluation

def fake_run_benchmark(benchmark, endpoint, output_dir, *, limit, parallelism,
                       request_timeout, datasets_dir, progress):
    right = json.loads(os.environ.get("FAKE_SCORES", "{}")).get(benchmark.name, 150)
    outcomes = {hashlib.sha256(b"%d" % i).hexdigest(): float(i < right) for i in range(200)}
    progress(f"{benchmark.name}: fake evaluation, {parallelism} requests in flight")
    return evaluation.BenchmarkResult(
        benchmark=benchmark.name, metric=benchmark.metric, value=right / 200, stderr=None,
        n=200, outcomes=outcomes, settings={"limit": limit}, output_dir=output_dir,
        wall_time_s=0.0)

@pytest.fixture(autouse=True)
def _fake_evaluation(monkeypatch):
    monkeypatch.setattr(evaluation, "run_benchmark", fake_run_benchmark)

@pytest.fixture(scope="session")
def mtserve_endpoint():
    return evaluation.Endpoint("http://127.0.0.1:9", "fake-model")
'''

GATE_TEST = """
def test_regression(check_benchmark, benchmark_name):
    check_benchmark(benchmark_name)
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeconftest(FAKE_EVALUATION)
    pytester.makepyfile(test_gate=GATE_TEST)
    (pytester.path / "ckpts" / "llama-run" / "iter_0000100").mkdir(parents=True)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    return pytester


CHECKPOINT = ["--checkpoint", "ckpts/llama-run/iter_0000100", "--benchmarks", "mmlu,arc_challenge"]


def run(project: pytest.Pytester, *args: str, scores: dict[str, int] | None = None) -> pytest.RunResult:
    project._monkeypatch.setenv("FAKE_SCORES", json.dumps(scores or {}))  # type: ignore[attr-defined]
    return project.runpytest_inprocess(*args)


def test_importing_the_plugin_loads_no_heavy_module() -> None:
    heavy = ("torch", "megatron", "pytriton", "nemo_evaluator", "lm_eval", "transformers")
    code = (
        "import sys, pytest_mtserve.plugin; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]"


def test_without_a_model_the_plugins_tests_skip_and_others_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(GATE_TEST + "\ndef test_unrelated():\n    pass\n")
    result = pytester.runpytest_inprocess("-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*needs a model: pass --checkpoint DIR*--endpoint URL*"])


def test_benchmark_ids_and_a_benchmark_added_from_conftest(project: pytest.Pytester) -> None:
    project.makeconftest(FAKE_EVALUATION + textwrap.dedent('''
        from pytest_mtserve.benchmarks import Benchmark

        def pytest_mtserve_register_benchmarks(registry):
            registry.register(Benchmark("tiny_qa", "lm-evaluation-harness.tiny_qa", "completions",
                                        "acc", 0, True, "binary"))
    '''))
    project.makepyfile(test_perf="def test_speed(benchmark):\n    pass\n")  # pytest-benchmark's name
    result = run(project, "--collect-only", "-q", "--benchmarks", "mmlu,tiny_qa")
    result.stdout.fnmatch_lines(["test_gate.py::test_regression[[]mmlu[]]", "test_gate.py::test_regression[[]tiny_qa[]]"])
    assert "test_speed[" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tp", "0"], "--tp '0': must be at least 1"),
        (["--max-batch-size", "many"], "--max-batch-size 'many': must be auto or a whole number of at least 1"),
        (["--gate-alpha", "1.5"], "--gate-alpha '1.5': must be between 0 and 1"),
        (["--device", "tpu"], "--device 'tpu': must be auto, cuda or cpu"),
        (["--endpoint", "localhost:8080"], "--endpoint 'localhost:8080': must be an http://"),
        (["--checkpoint", "nowhere"], "--checkpoint nowhere: no such directory"),
        (["--checkpoint", "demo", "--endpoint", "http://h:1"], "exclude each other"),
        (["--tp", "2", "--num-gpus", "4"], "--num-gpus 4 must equal --tp 2 x --pp 1"),
        (["--server-python", "/no/python3"], "--server-python '/no/python3': no such executable"),
        (["--server-args=--tp=2"], "--server-args '--tp=2': --tp is set by the plugin; use its --tp option"),
        (["--server-args=--port 1"], "--server-args '--port 1': --port is set by the plugin; use its --server-port option"),
        (["--endpoint", "http://h:1", "--server-args=--log-batches"], "--server-args: with --endpoint no server is launched"),
    ],
)
def test_bad_option_values_are_usage_errors(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_server_args_follow_the_plugins_own_on_the_server_command(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmtserve_server_args = --gil-switch-interval-ms 5\n")
    pytester.makepyfile(test_command="""
        from pathlib import Path
        from pytest_mtserve.launcher import server_command

        def test_command(mtserve_options):
            command = server_command(mtserve_options.server_settings(Path("/ckpt")))
            assert command[-3:] == ["--attention-backend", "unfused", "--log-batches"]
            assert "--gil-switch-interval-ms" not in command
        """)
    (pytester.path / "run").mkdir()
    result = pytester.runpytest_inprocess("--checkpoint", "run", "--server-args=--attention-backend unfused --log-batches")
    result.assert_outcomes(passed=1)  # the command line's value, not the ini file's


def test_bad_ini_value_names_the_ini_key(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmtserve_parallelism = many\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*mtserve_parallelism 'many': invalid literal*"])


@pytest.mark.parametrize(
    ("args", "in_flight"),
    [
        (["--device", "cpu"], 16),
        (["--device", "cuda"], 64),
        (["--max-batch-size", "12"], 24),
        (["--max-batch-size", "12", "--parallelism", "3"], 3),
    ],
)
def test_requests_in_flight_default_to_two_batches(project: pytest.Pytester, args: list[str], in_flight: int) -> None:
    result = run(project, *CHECKPOINT, "--update-baselines", *args)
    result.stdout.fnmatch_lines([f"*mmlu: fake evaluation, {in_flight} requests in flight*"])


def test_auto_batch_size_is_the_cpus_where_no_gpu_is_visible(project: pytest.Pytester) -> None:
    project._monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # type: ignore[attr-defined]
    result = run(project, *CHECKPOINT, "--update-baselines")
    result.stdout.fnmatch_lines(["*mmlu: fake evaluation, 16 requests in flight*"])


def test_unknown_benchmark_names_the_known_ones(project: pytest.Pytester) -> None:
    result = run(project, *CHECKPOINT, "--benchmarks", "mmlu,nope")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown benchmark 'nope'; known: mmlu*"])


def test_missing_baseline_fails_with_the_command_that_records_it(project: pytest.Pytester) -> None:
    result = run(project, *CHECKPOINT)
    result.assert_outcomes(failed=2)
    assert "mmlu has no baseline at" in result.stdout.str()
    line = next(line for line in result.stdout.lines if "record it with: pytest" in line and "mmlu" in line)
    command = shlex.split(line.split("record it with: ", 1)[1])
    recorded = run(project, *command[1:])
    recorded.assert_outcomes(passed=1)
    assert (project.path / "baselines" / "llama-run" / "mmlu.json").is_file()
    assert not (project.path / "baselines" / "llama-run" / "arc_challenge.json").exists()


# What pytest-benchmark (in many CUDA images) does to any test with a `benchmark` argument.
PYTEST_BENCHMARK_LIKE = """
class BenchmarkFixture:
    pass

@pytest.fixture
def benchmark():
    return BenchmarkFixture()

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    if not isinstance(getattr(item, "funcargs", {}).get("benchmark", BenchmarkFixture()), BenchmarkFixture):
        raise TypeError("unexpected type for `benchmark` in funcargs")
    yield
"""


def test_gate_tests_and_pytest_benchmark_tests_run_side_by_side(project: pytest.Pytester) -> None:
    project.makeconftest(FAKE_EVALUATION + PYTEST_BENCHMARK_LIKE)
    project.makepyfile(test_perf="def test_speed(benchmark):\n    pass\n")
    run(project, *CHECKPOINT, "--update-baselines").assert_outcomes(passed=3)


def test_update_flow_records_passes_and_reports_old_to_new(project: pytest.Pytester) -> None:
    run(project, *CHECKPOINT, "--update-baselines").assert_outcomes(passed=2)
    gated = run(project, *CHECKPOINT, "--mtserve-report", "report.json")
    gated.assert_outcomes(passed=2)
    gated.stdout.fnmatch_lines(["*mtserve benchmark gate*", "*arc_challenge*pass*", "*mmlu*pass*"])
    rows = json.loads((project.path / "report.json").read_text())["rows"]
    assert [(row["benchmark"], row["verdict"]) for row in rows] == [("arc_challenge", "pass"), ("mmlu", "pass")]
    updated = run(project, *CHECKPOINT, "--update-baselines", scores={"mmlu": 160})
    updated.assert_outcomes(passed=2)
    updated.stdout.fnmatch_lines(["*mmlu (updated): baseline updated 0.7500 -> 0.8000*"])


def test_significant_regression_fails_with_a_table_and_the_output_dir(project: pytest.Pytester) -> None:
    run(project, *CHECKPOINT, "--update-baselines").assert_outcomes(passed=2)
    summary = project.path / "summary.md"
    project._monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))  # type: ignore[attr-defined]
    result = run(project, *CHECKPOINT, scores={"mmlu": 100})
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*mmlu is significantly worse than its baseline*mmlu.json",
        "*benchmark*metric*baseline*current*delta*",
        "*mmlu*0.7500*0.5000*fail*",
        "*mtserve evaluation output*",
    ])
    assert "| mmlu" in summary.read_text()


def test_mismatched_settings_fail_naming_the_field(project: pytest.Pytester) -> None:
    run(project, *CHECKPOINT, "--limit-samples", "10", "--update-baselines").assert_outcomes(passed=2)
    result = run(project, *CHECKPOINT, "--limit-samples", "20")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*settings differ from the baseline's: limit: baseline 10, current 20*"])


def test_corrupt_baseline_fails_naming_the_file(project: pytest.Pytester) -> None:
    run(project, *CHECKPOINT, "--update-baselines").assert_outcomes(passed=2)
    corrupt = project.path / "baselines" / "llama-run" / "mmlu.json"
    corrupt.write_text("{ not json")
    result = run(project, *CHECKPOINT)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"*{corrupt}: not valid JSON*"])


def test_the_built_in_suite_runs_from_pyargs(project: pytest.Pytester) -> None:
    result = run(project, "--pyargs", "pytest_mtserve.suite", *CHECKPOINT, "--update-baselines")
    result.assert_outcomes(passed=2)
    assert (project.path / "baselines" / "llama-run" / "arc_challenge.json").is_file()
