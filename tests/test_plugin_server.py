"""The plugin's server lifecycle with a fake server (prints the ready line, serves nothing),
plugged in through the ``pytest_mtserve_server_command`` hook."""

from __future__ import annotations

import textwrap
import time

import pytest

from pytest_mtserve.launcher import _live_members

pytest_plugins = ["pytester"]

FAKE_SERVER = """
import json, os, sys, time
with open(sys.argv[1], "a") as starts:
    starts.write(f"{os.getpid()}\\n")
if sys.argv[2] == "die":
    sys.exit("mtserve: error: the fake checkpoint is broken")
print("MTSERVE_READY " + json.dumps({"url": "http://127.0.0.1:9", "model": "fake",
      "triton_port": 1, "pid": os.getpid()}), flush=True)
time.sleep(120)
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    (pytester.path / "fake_server.py").write_text(FAKE_SERVER)
    (pytester.path / "ckpt").mkdir()
    pytester.makeconftest(textwrap.dedent("""
        import os, sys
        from pathlib import Path

        def pytest_mtserve_server_command(config, settings):
            here = Path(__file__).parent
            return [sys.executable, str(here / "fake_server.py"), str(here / "starts.txt"),
                    os.environ.get("FAKE_MODE", "ok")]
    """))
    pytester.makepyfile(
        test_server="\n".join(
            f"def test_uses_server_{i}(mtserve_server):\n    assert mtserve_server.model == 'fake'\n"
            for i in range(4)
        )
    )
    return pytester


def started_pids(project: pytest.Pytester) -> list[int]:
    return [int(line) for line in (project.path / "starts.txt").read_text().split()]


def assert_all_stopped(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(_live_members(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_live_members(pid) for pid in pids)


@pytest.mark.parametrize(("args", "queue_delay"), [([], "100000"), (["--parallelism", "15"], "None")])
def test_two_batches_in_flight_get_the_queue_delay_that_fills_batches(
    project: pytest.Pytester, args: list[str], queue_delay: str
) -> None:
    project.makeconftest(textwrap.dedent("""
        import sys
        from pathlib import Path

        def pytest_mtserve_server_command(config, settings):
            here = Path(__file__).parent
            (here / "queue_delay.txt").write_text(str(settings.queue_delay_us))
            return [sys.executable, str(here / "fake_server.py"), str(here / "starts.txt"), "ok"]
    """))
    result = project.runpytest_subprocess("--checkpoint", "ckpt", "--device", "cpu", *args)  # batches of 8
    result.assert_outcomes(passed=4)
    assert (project.path / "queue_delay.txt").read_text() == queue_delay


def test_one_server_per_session_stopped_at_the_end(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("--checkpoint", "ckpt")
    result.assert_outcomes(passed=4)
    pids = started_pids(project)
    assert len(pids) == 1
    assert_all_stopped(pids)


def test_server_stops_when_a_test_fails(project: pytest.Pytester) -> None:
    project.makepyfile(test_failing="def test_fails(mtserve_server):\n    assert False\n")
    result = project.runpytest_subprocess("--checkpoint", "ckpt")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*mtserve server log*"])
    assert_all_stopped(started_pids(project))


def test_a_server_that_dies_fails_fast_with_its_log_once(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "die")
    result = project.runpytest_subprocess("--checkpoint", "ckpt", "--server-timeout", "300")
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines(["*exited with code 1 before it was ready*", "*the fake checkpoint is broken*"])
    assert len(started_pids(project)) == 1


def test_endpoint_option_launches_no_server(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("--endpoint", "http://127.0.0.1:9", "-rs")
    result.assert_outcomes(skipped=4)
    assert not (project.path / "starts.txt").exists()


def test_xdist_workers_share_exactly_one_server(project: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    result = project.runpytest_subprocess("--checkpoint", "ckpt", "-n", "2")
    result.assert_outcomes(passed=4)
    pids = started_pids(project)
    assert len(pids) == 1
    assert_all_stopped(pids)
