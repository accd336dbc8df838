"""One gate per selected benchmark (``--benchmarks``), against ``<baselines-dir>/<model-id>/``."""

from collections.abc import Callable


def test_regression(check_benchmark: Callable[[str], object], benchmark_name: str) -> None:
    check_benchmark(benchmark_name)
