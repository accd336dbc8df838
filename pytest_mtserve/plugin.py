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

from pytest_mtserve.options import DEMO_CHECKPOINT, OPTIONS, MtserveOptions, read_options

if TYPE_CHECKING:
    from pytest_mtserve.baselines import BaselineStore
    from pytest_mtserve.benchmarks import BenchmarkRegistry
    from pytest_mtserve.evaluation import BenchmarkResult, Endpoint
    from pytest_mtserve.launcher import RunningServer, ServerSettings, SharedServer
    from pytest_mtserve.report import ReportRow

ROW_PROPERTY = "mtserve_row"  # user_properties key: carries report rows from xdist workers
# A test that needs any of these needs a model; without one it is skipped.
# The parametrized argument of gate tests: test_regression[mmlu].
BENCHMARK_ARGUMENT = "benchmark_name"
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


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mtserve", "benchmark gate of Megatron-Core checkpoints (pytest-mtserve)")
    for option in OPTIONS:
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
    state = _RunState(read_options(config))
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
    # Not `benchmark`: pytest-benchmark owns that name and fails any test whose `benchmark`
    # argument is not its fixture.
    used = set(metafunc.fixturenames)
    if BENCHMARK_ARGUMENT in used and used & MTSERVE_FIXTURES:
        names = _selected_benchmarks(metafunc.config)
        metafunc.parametrize(BENCHMARK_ARGUMENT, names, ids=names)


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
