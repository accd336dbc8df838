"""The pytest plugin: options, fixtures, benchmark parametrization and the gate's report.

pytest imports this module in every run, so it imports only the standard library and pytest;
the launcher, the evaluation harness and the baseline store are imported when first used.

    pytest --checkpoint /ckpts/run/iter_0001000 --tp 8          # launch a server, gate scores
    pytest --endpoint http://127.0.0.1:8080 --tokenizer DIR     # gate a running server
    pytest --pyargs pytest_mtserve.suite --checkpoint demo      # the built-in suite, no code
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import urllib.request
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from pytest_mtserve.baselines import BaselineStore
    from pytest_mtserve.benchmarks import BenchmarkRegistry
    from pytest_mtserve.evaluation import BenchmarkResult, Endpoint
    from pytest_mtserve.launcher import RunningServer, ServerSettings, SharedServer
    from pytest_mtserve.report import ReportRow

DEMO_CHECKPOINT = "demo"
DEFAULT_BENCHMARKS = "mmlu,arc_challenge"
ROW_PROPERTY = "mtserve_row"  # user_properties key: carries report rows from xdist workers
# A test that needs any of these needs a model; without one it is skipped.
MTSERVE_FIXTURES = frozenset(
    {"mtserve_server", "mtserve_endpoint", "mtserve_baselines", "run_benchmark", "check_benchmark"}
)
_ITERATION_DIR = re.compile(r"iter_\d+")


class MtserveHookSpecs:
    """Hooks a conftest.py can implement."""

    @pytest.hookspec
    def pytest_mtserve_register_benchmarks(self, registry: BenchmarkRegistry) -> None:
        """Add benchmarks: ``registry.register(Benchmark(...))``. Called once per session,
        from conftest.py files at or above the test files."""

    @pytest.hookspec(firstresult=True)
    def pytest_mtserve_server_command(
        self, config: pytest.Config, settings: ServerSettings
    ) -> list[str] | None:
        """The command that starts the server, e.g. to wrap it in ``srun``; the default is
        ``python -m pytest_mtserve.server`` with ``settings``. It must print the ready line."""


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(MtserveHookSpecs)


# ---------------------------------------------------------------------------------- options


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


def _device(text: str) -> str:
    if text not in ("auto", "cuda", "cpu"):
        raise ValueError("must be auto, cuda or cpu")
    return text


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
class _Option:
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


_OPTIONS = (
    _Option("--checkpoint", "Megatron checkpoint to serve: a run directory (its latest iteration) "
            "or its iter_NNNNNNN folder; 'demo' serves the built-in SmolLM2-135M demo.",
            ini=False, metavar="DIR"),
    _Option("--endpoint", "Test a server that is already running at URL instead of launching one.",
            _url, ini=False, metavar="URL"),
    _Option("--tp", "Tensor-parallel size.", _positive_int, "1", metavar="N"),
    _Option("--pp", "Pipeline-parallel size.", _positive_int, "1", metavar="N"),
    _Option("--num-gpus", "GPUs to use; must equal tp x pp (the default).", _positive_int,
            metavar="N"),
    _Option("--device", "Where the server runs the model: auto, cuda or cpu.", _device, "auto"),
    _Option("--max-batch-size", "Largest batch the server's dynamic batcher forms.",
            _positive_int, "8", metavar="N"),
    _Option("--inference-max-seq-length", "Longest prompt plus generation the server accepts, "
            "in tokens.", _positive_int, "4096", metavar="N"),
    _Option("--server-port", "Port of the launched server's HTTP API (0: any free port).",
            _port, "0", metavar="PORT"),
    _Option("--server-timeout", "Seconds to wait for the launched server to be ready.",
            _positive_float, "900", metavar="SECONDS"),
    _Option("--benchmarks", "Comma-separated benchmarks to run, e.g. mmlu,arc_challenge, or "
            "lm-evaluation-harness.<task> for any lm-eval task.", _names, DEFAULT_BENCHMARKS,
            metavar="A,B"),
    _Option("--limit-samples", "Evaluate only the first N questions of each (sub)task; "
            "per benchmark as NAME=N, e.g. 100,mmlu=2.", _limits, metavar="N[,NAME=N]"),
    _Option("--parallelism", "Concurrent requests the evaluation sends.", _positive_int, "8",
            metavar="N"),
    _Option("--request-timeout", "Seconds before a request to the server counts as failed. "
            "lm-eval includes the time a request waits for one of its --parallelism "
            "connections, so this bounds a whole benchmark run: raise it for long CPU runs.",
            _positive_float, "3600", metavar="SECONDS"),
    _Option("--baselines-dir", "Where baselines live, relative to the rootdir.", str,
            "baselines", metavar="DIR"),
    _Option("--model-id", "Baseline folder of this model (default: the checkpoint's run "
            "directory name; with --endpoint the served model name).", metavar="ID"),
    _Option("--datasets-dir", "Offline datasets laid out like the Hugging Face hub.",
            metavar="DIR"),
    _Option("--tokenizer", "Hugging Face tokenizer directory for log-likelihood benchmarks with "
            "--endpoint (with --checkpoint the checkpoint's own tokenizer is used).",
            ini=False, metavar="DIR"),
    _Option("--mtserve-report", "Also write the gate's results as JSON to PATH.", ini=False,
            metavar="PATH"),
    _Option("--gate-alpha", "Significance level of the regression test.", _fraction, "0.05",
            metavar="P"),
    _Option("--gate-min-effect", "Smallest drop that fails the gate, in metric units "
            "(0.01 = one point of accuracy).", _non_negative_float, "0.01", metavar="X"),
    _Option("--gate-tolerance", "Instead of statistics, fail when the score falls below "
            "baseline x (1 - X).", _fraction, metavar="X"),
)  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mtserve", "benchmark gate of Megatron-Core checkpoints (pytest-mtserve)")
    for option in _OPTIONS:
        default_note = f" Default: {option.default}." if option.default else ""
        group.addoption(option.flag, dest=option.dest, metavar=option.metavar,
                        help=option.help + default_note)  # fmt: skip
        if option.ini:
            parser.addini(option.ini_name, option.help, default=option.default)
    group.addoption(
        "--update-baselines",
        action="store_true",
        help="Record each benchmark's result as its new baseline instead of gating it.",
    )


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
        from pytest_mtserve.launcher import ServerSettings

        return ServerSettings(
            checkpoint=checkpoint,
            tp=self.tp,
            pp=self.pp,
            max_batch_size=self.max_batch_size,
            inference_max_seq_length=self.inference_max_seq_length,
            port=self.server_port,
            device=self.device,
        )


def _read_options(config: pytest.Config) -> MtserveOptions:
    values = {option.dest: _option_value(config, option) for option in _OPTIONS}
    if values["checkpoint"] and values["endpoint"]:
        raise pytest.UsageError("--checkpoint and --endpoint exclude each other: pass one")
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
    return MtserveOptions(
        **values, update_baselines=bool(config.getoption("update_baselines")), rootdir=_project_dir(config)
    )


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


def _option_value(config: pytest.Config, option: _Option) -> Any:
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


# ------------------------------------------------------------------------------- run state


@dataclass
class _RunState:
    options: MtserveOptions
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> ReportRow dict
    server: RunningServer | None = None
    registry: BenchmarkRegistry | None = None


_STATE = pytest.StashKey[_RunState]()
_EVALUATION_DIRS = pytest.StashKey[list[Path]]()


def _state(config: pytest.Config) -> _RunState:
    return config.stash[_STATE]


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    state = _RunState(_read_options(config))
    config.stash[_STATE] = state
    config.pluginmanager.register(_RowCollector(state.rows), "mtserve-row-collector")


def mtserve_registry(config: pytest.Config) -> BenchmarkRegistry:
    """The run's benchmarks: the built-in ones plus those conftest.py files register."""
    state = _state(config)
    if state.registry is None:
        from pytest_mtserve.benchmarks import default_registry

        state.registry = default_registry()
        config.hook.pytest_mtserve_register_benchmarks(registry=state.registry)
    return state.registry


def _selected_benchmarks(config: pytest.Config) -> tuple[str, ...]:
    from pytest_mtserve.benchmarks import UnknownBenchmarkError

    names = _state(config).options.benchmarks
    registry = mtserve_registry(config)
    try:
        for name in names:
            registry.get(name)
    except UnknownBenchmarkError as error:
        raise pytest.UsageError(f"--benchmarks: {error}") from None
    return names


# ---------------------------------------------------------------------------- collection


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Only tests that also use the plugin: `benchmark` alone is pytest-benchmark's fixture.
    used = set(metafunc.fixturenames)
    if "benchmark" in used and used & MTSERVE_FIXTURES:
        names = _selected_benchmarks(metafunc.config)
        metafunc.parametrize("benchmark", names, ids=names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _state(config).options.has_target:
        return
    skip = pytest.mark.skip(
        reason="needs a model: pass --checkpoint DIR (or --checkpoint demo) or --endpoint URL"
    )
    for item in items:
        if MTSERVE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def mtserve_options(pytestconfig: pytest.Config) -> MtserveOptions:
    """The plugin's options for this run."""
    return _state(pytestconfig).options


@pytest.fixture(scope="session")
def mtserve_benchmarks(pytestconfig: pytest.Config) -> BenchmarkRegistry:
    """The benchmark registry, including those registered from conftest.py."""
    return mtserve_registry(pytestconfig)


@pytest.fixture(scope="session")
def mtserve_server(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The launched model server, stopped at the end of the session whatever happens.
    Under pytest-xdist all workers share one server; the last worker to finish stops it."""
    state = _state(pytestconfig)
    if state.options.endpoint:
        pytest.skip("--endpoint given: that server is tested, none is launched")
    start = functools.partial(_launch, pytestconfig, tmp_path_factory)
    shared = _shared_server(pytestconfig)
    if shared is not None:
        state.server = _started(lambda: shared.acquire(start))
        yield state.server
        return
    state.server = _started(start)
    try:
        yield state.server
    finally:
        state.server.stop()


def _fail(message: str) -> NoReturn:
    """Fail the test with ``message`` alone. Called while handling the error the message
    describes: ``from None`` keeps pytest from printing that error a second time (after
    "During handling of the above exception")."""
    raise pytest.fail.Exception(f"mtserve: {message}", pytrace=False) from None


def _started(start: Callable[[], RunningServer]) -> RunningServer:
    from pytest_mtserve.launcher import ServerStartError

    try:
        return start()
    except ServerStartError as error:
        _fail(str(error))


def _launch(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    from pytest_mtserve.launcher import start_server

    options = _state(config).options
    settings = options.server_settings(_checkpoint_dir(options))
    command = config.hook.pytest_mtserve_server_command(config=config, settings=settings)
    log_path = tmp_path_factory.mktemp("mtserve-server", numbered=True) / "server.log"
    return start_server(command, log_path, timeout_s=options.server_timeout)


@pytest.hookimpl(trylast=True)
def pytest_mtserve_server_command(config: pytest.Config, settings: ServerSettings) -> list[str]:
    from pytest_mtserve.launcher import server_command

    return server_command(settings)


def _shared_server(config: pytest.Config) -> SharedServer | None:
    """The run's shared server under pytest-xdist (None outside it). xdist gives each worker
    ``--basetemp <run's basetemp>/popen-gwN``: the parent is the directory the workers share
    (the xdist recipe's ``tmp_path_factory.getbasetemp().parent``)."""
    if not _is_xdist_worker(config) or not config.option.basetemp:
        return None
    from pytest_mtserve.launcher import SharedServer

    return SharedServer(
        Path(config.option.basetemp).resolve().parent,
        os.environ["PYTEST_XDIST_TESTRUNUID"],
        int(os.environ["PYTEST_XDIST_WORKER_COUNT"]),
    )


@functools.cache
def _demo_assets() -> Any:
    from pytest_mtserve.demo.assets import ensure_demo_assets

    return ensure_demo_assets()


def _checkpoint_dir(options: MtserveOptions) -> Path:
    if options.checkpoint == DEMO_CHECKPOINT:
        return Path(_demo_assets().checkpoint_dir)
    return Path(options.checkpoint)


def default_model_id(checkpoint: str) -> str:
    """Baseline folder name of a checkpoint: its run directory's name."""
    if checkpoint == DEMO_CHECKPOINT:
        return DEMO_CHECKPOINT
    path = Path(checkpoint).resolve()
    return path.parent.name if _ITERATION_DIR.fullmatch(path.name) else path.name


@pytest.fixture(scope="session")
def mtserve_endpoint(request: pytest.FixtureRequest, mtserve_options: MtserveOptions) -> Endpoint:
    """Where the benchmarks send their requests: the launched server or --endpoint."""
    from pytest_mtserve.evaluation import Endpoint

    tokenizer = mtserve_options.tokenizer
    if mtserve_options.endpoint:
        url = mtserve_options.endpoint
        return Endpoint(url, _served_model_name(url), tokenizer and Path(tokenizer))
    server: RunningServer = request.getfixturevalue("mtserve_server")
    tokenizer_dir = Path(tokenizer) if tokenizer else _checkpoint_tokenizer(mtserve_options)
    return Endpoint(server.url, server.model, tokenizer_dir)


def _checkpoint_tokenizer(options: MtserveOptions) -> Path:
    from pytest_mtserve.server.checkpoint import CheckpointError, locate_checkpoint

    try:
        return locate_checkpoint(_checkpoint_dir(options)).tokenizer_dir
    except CheckpointError as error:
        _fail(str(error))


def _served_model_name(url: str) -> str:
    """The first model ``GET /v1/models`` lists (OpenAI protocol)."""
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
            return str(json.load(response)["data"][0]["id"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        _fail(
            f"cannot read the served model's name from {url}/v1/models ({error}); "
            "check that --endpoint points at a running OpenAI-compatible server"
        )


@pytest.fixture(scope="session")
def mtserve_baselines(mtserve_options: MtserveOptions, mtserve_endpoint: Endpoint) -> BaselineStore:
    """The baseline store of the model under test."""
    from pytest_mtserve.baselines import BaselineError, BaselineStore

    model_id = mtserve_options.model_id or (
        mtserve_endpoint.model_name
        if mtserve_options.endpoint
        else default_model_id(mtserve_options.checkpoint)
    )
    try:
        return BaselineStore(mtserve_options.baselines_root, model_id)
    except BaselineError as error:
        _fail(f"--model-id: {error}")


@pytest.fixture
def run_benchmark(
    request: pytest.FixtureRequest,
    mtserve_endpoint: Endpoint,
    mtserve_options: MtserveOptions,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], BenchmarkResult]:
    """``run_benchmark(name)`` evaluates one benchmark against the endpoint, in a fresh output
    directory (a re-used one would replay lm-eval's cache and send no requests)."""
    from pytest_mtserve import evaluation

    registry = mtserve_registry(request.config)
    datasets_dir = mtserve_options.datasets_dir or (
        _demo_assets().datasets_dir if mtserve_options.checkpoint == DEMO_CHECKPOINT else None
    )

    def run(name: str) -> BenchmarkResult:
        output_dir = tmp_path_factory.mktemp(f"eval-{_safe(name)}", numbered=True)
        request.node.stash.setdefault(_EVALUATION_DIRS, []).append(output_dir)
        try:
            return evaluation.run_benchmark(
                registry.get(name),
                mtserve_endpoint,
                output_dir,
                limit=mtserve_options.limit_samples and mtserve_options.limit_samples.for_benchmark(name),
                parallelism=mtserve_options.parallelism,
                request_timeout=mtserve_options.request_timeout,
                datasets_dir=datasets_dir and Path(datasets_dir),
                progress=_progress_printer(request.config),
            )
        except evaluation.EvaluationError as error:
            _fail(f"{name}: {error}")

    return run


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _progress_printer(config: pytest.Config) -> Callable[[str], None]:
    """Progress lines on the terminal even while pytest captures the test's output."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return lambda message: None

    def show(message: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[mtserve] {message}")

    return show


@pytest.fixture
def check_benchmark(
    request: pytest.FixtureRequest,
    run_benchmark: Callable[[str], BenchmarkResult],
    mtserve_baselines: BaselineStore,
    mtserve_options: MtserveOptions,
) -> Callable[[str], ReportRow]:
    """``check_benchmark(name)`` runs a benchmark and gates it against its baseline (with
    --update-baselines: records it). Fails the test on a regression, a missing, corrupt or
    incomparable baseline."""
    from pytest_mtserve import gate
    from pytest_mtserve.baselines import BaselineError

    settings = gate.GateSettings(
        mtserve_options.gate_alpha, mtserve_options.gate_min_effect, mtserve_options.gate_tolerance
    )

    def check(name: str) -> ReportRow:
        result = run_benchmark(name)
        try:
            if mtserve_options.update_baselines:
                row = gate.record(result, mtserve_baselines, _provenance(mtserve_options))
            else:
                row = gate.judge(result, mtserve_baselines, settings, _record_command(request.config, name))
        except BaselineError as error:
            _fail(str(error))
        request.node.user_properties.append((ROW_PROPERTY, row.to_dict()))
        if row.verdict in gate.FAILING_VERDICTS:
            pytest.fail(gate.failure_message(row, mtserve_baselines.path_for(name)), pytrace=False)
        return row

    return check


def _provenance(options: MtserveOptions) -> dict[str, Any]:
    target = {"endpoint": options.endpoint} if options.endpoint else {"checkpoint": options.checkpoint}
    return {**target, "tp": options.tp, "pp": options.pp}


def _record_command(config: pytest.Config, benchmark: str) -> str:
    """This run's own command line, narrowed to one benchmark, recording its baseline
    (a repeated option's last value wins)."""
    invocation = config.invocation_params
    command = shlex.join(["pytest", *invocation.args, "--benchmarks", benchmark, "--update-baselines"])
    if Path(invocation.dir) != Path.cwd():
        command = f"cd {shlex.quote(str(invocation.dir))} && {command}"
    return command


# --------------------------------------------------------------------------------- report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and MTSERVE_FIXTURES & set(getattr(item, "fixturenames", ())):
        for output_dir in item.stash.get(_EVALUATION_DIRS, []):
            report.sections.append(("mtserve evaluation output", str(output_dir)))
        server = _state(item.config).server
        if server is not None:
            report.sections.append((f"mtserve server log ({server.log_path})", server.tail()))
    return report


class _RowCollector:
    """Collects report rows from test reports; under xdist the controller gets the workers'
    reports, rows included (they travel in ``user_properties``)."""

    def __init__(self, rows: dict[str, dict[str, Any]]) -> None:
        self.rows = rows

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for key, value in report.user_properties:
            if key == ROW_PROPERTY:
                self.rows[report.nodeid] = value


def _report(config: pytest.Config) -> Any:
    from pytest_mtserve.report import Report, ReportRow

    return Report(ReportRow.from_dict(row) for row in _state(config).rows.values())


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if _is_xdist_worker(config) or not _state(config).rows:
        return
    terminalreporter.section("mtserve benchmark gate")
    terminalreporter.write_line(_report(config).to_table())


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if _is_xdist_worker(config):
        shared = _shared_server(config)
        if shared is not None:
            shared.finish_worker()
        return
    state = _state(config)
    report = _report(config)
    if state.options.mtserve_report:
        report.to_json(state.options.mtserve_report)
    if state.rows:
        report.append_to_step_summary()
