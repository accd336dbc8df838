"""pytest picks its rootdir before plugins load: a checkpoint path given as `--checkpoint DIR`
must not silently disable the project's ini file."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture()
def outside_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("elsewhere")


def test_an_ignored_ini_file_is_an_error_naming_the_fix(pytester: pytest.Pytester, outside_checkpoint) -> None:
    pytester.makeini("[pytest]\nmtserve_benchmarks = arc_easy\n")
    pytester.makepyfile("def test_x(check_benchmark, benchmark_name):\n    pass\n")
    result = pytester.runpytest_subprocess("--checkpoint", str(outside_checkpoint), "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*ignored*tox.ini; write --checkpoint={outside_checkpoint} (with '=')*"])


def test_the_equals_form_keeps_the_ini_file(pytester: pytest.Pytester, outside_checkpoint) -> None:
    pytester.makeini("[pytest]\nmtserve_benchmarks = arc_easy\n")
    pytester.makepyfile("def test_x(check_benchmark, benchmark_name):\n    pass\n")
    result = pytester.runpytest_subprocess(f"--checkpoint={outside_checkpoint}", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_x[[]arc_easy[]]*"])


def test_without_an_ini_file_the_separate_form_just_works(pytester: pytest.Pytester, outside_checkpoint) -> None:
    pytester.makepyfile("def test_x(check_benchmark, benchmark_name):\n    pass\n")
    result = pytester.runpytest_subprocess("--checkpoint", str(outside_checkpoint), "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*test_x[[]mmlu[]]*"])
