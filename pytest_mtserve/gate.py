"""What ``check_benchmark`` decides for one fresh result: record it, or gate it against its
baseline. The plugin turns the returned row into a pass or a failure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_mtserve.baselines import Baseline, BaselineStore, BenchmarkResultLike, settings_mismatch
from pytest_mtserve.report import Report, ReportRow
from pytest_mtserve.statistics import compare

FAILING_VERDICTS = frozenset({"fail", "missing", "mismatch"})


@dataclass(frozen=True)
class GateSettings:
    alpha: float = 0.05
    min_effect: float = 0.01
    tolerance: float | None = None


def record(result: BenchmarkResultLike, store: BaselineStore, provenance: Mapping[str, Any]) -> ReportRow:
    """Save ``result`` as the baseline; the row says old -> new."""
    previous = store.save(Baseline.from_result(result, provenance))
    return ReportRow.saved(
        result.benchmark, result.metric, None if previous is None else previous.value, result.value
    )


def judge(
    result: BenchmarkResultLike, store: BaselineStore, settings: GateSettings, record_command: str
) -> ReportRow:
    """Gate ``result`` against its stored baseline. Raises ``BaselineError`` for a corrupt file."""
    baseline = store.load(result.benchmark)
    if baseline is None:
        return ReportRow.missing(result.benchmark, result.metric, result.value, record_command)
    differences = settings_mismatch(
        {"metric": baseline.metric, **baseline.settings}, {"metric": result.metric, **result.settings}
    )
    if differences:
        return ReportRow.mismatch(
            result.benchmark, result.metric, baseline.value, result.value, differences
        )
    verdict = compare(
        baseline,
        result,
        alpha=settings.alpha,
        min_effect=settings.min_effect,
        tolerance=settings.tolerance,
    )
    return ReportRow.from_gate(result.benchmark, result.metric, baseline.value, result.value, verdict)


def failure_message(row: ReportRow, baseline_path: Path) -> str:
    """Why the test of ``row`` fails, with the row as a table."""
    headline = {
        "fail": f"{row.benchmark} is significantly worse than its baseline {baseline_path}",
        "missing": f"{row.benchmark} has no baseline at {baseline_path}",
        "mismatch": f"{row.benchmark} ran with other settings than its baseline {baseline_path}; "
        "run with the baseline's settings, or record a new baseline with --update-baselines",
    }[row.verdict]
    return f"{headline}\n\n{Report([row]).to_table()}"
