"""The gate's summary: a terminal table, a JSON file and Markdown for GitHub's step summary.

Rows are plain data (``to_dict`` / ``from_dict``) so pytest-xdist workers can send them to the
controller through a test report's ``user_properties``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tabulate

from pytest_mtserve.statistics import GateResult

# The gate's verdicts, plus what can happen to a benchmark instead of being gated.
RowVerdict = Literal["pass", "fail", "improved", "recorded", "updated", "missing", "mismatch"]

_HEADERS = (
    "benchmark",
    "metric",
    "baseline",
    "current",
    "delta",
    "95% CI of delta",
    "p",
    "verdict",
)
_TITLE = "pytest-mtserve benchmark gate"


@dataclass
class ReportRow:
    benchmark: str
    metric: str
    verdict: RowVerdict
    baseline: float | None = None  # for "updated": the value it replaced
    current: float | None = None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    method: str = ""
    detail: str = ""  # why: the gate's reason, the differing settings, the command to record

    @classmethod
    def from_gate(
        cls, benchmark: str, metric: str, baseline: float, current: float, gate: GateResult
    ) -> ReportRow:
        return cls(
            benchmark=benchmark,
            metric=metric,
            verdict=gate.verdict,
            baseline=baseline,
            current=current,
            delta=gate.delta,
            ci_low=gate.ci_low,
            ci_high=gate.ci_high,
            p_value=gate.p_value,
            method=gate.method,
            detail=gate.reason,
        )

    @classmethod
    def saved(
        cls, benchmark: str, metric: str, previous: float | None, current: float
    ) -> ReportRow:
        """A baseline written by --update-baselines: "recorded" if new, else "updated"."""
        if previous is None:
            return cls(
                benchmark=benchmark,
                metric=metric,
                verdict="recorded",
                current=current,
                detail="new baseline",
            )
        return cls(
            benchmark=benchmark,
            metric=metric,
            verdict="updated",
            baseline=previous,
            current=current,
            delta=current - previous,
            detail=f"baseline updated {previous:.4f} -> {current:.4f}",
        )

    @classmethod
    def missing(cls, benchmark: str, metric: str, current: float, command: str) -> ReportRow:
        return cls(
            benchmark=benchmark,
            metric=metric,
            verdict="missing",
            current=current,
            detail=f"no baseline; record it with: {command}",
        )

    @classmethod
    def mismatch(
        cls,
        benchmark: str,
        metric: str,
        baseline: float,
        current: float,
        differences: Sequence[str],
    ) -> ReportRow:
        return cls(
            benchmark=benchmark,
            metric=metric,
            verdict="mismatch",
            baseline=baseline,
            current=current,
            detail="settings differ from the baseline's: " + "; ".join(differences),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReportRow:
        return cls(**data)


class Report:
    def __init__(self, rows: Iterable[ReportRow] = ()) -> None:
        self._rows = list(rows)

    def add(self, row: ReportRow) -> None:
        self._rows.append(row)

    @property
    def rows(self) -> list[ReportRow]:
        """The rows sorted by benchmark (xdist workers finish in any order)."""
        return sorted(self._rows, key=lambda row: (row.benchmark, row.metric))

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(row.verdict for row in self.rows))

    def to_table(self) -> str:
        notes = [f"  {row.benchmark} ({row.verdict}): {row.detail}" for row in self._noted_rows()]
        return "\n".join([self._table("simple"), *notes, self._counts_line()])

    def to_markdown(self) -> str:
        notes = [
            f"- **{row.benchmark}** ({row.verdict}): {row.detail}" for row in self._noted_rows()
        ]
        table = self._table("github", escape=lambda cell: cell.replace("|", "\\|"))
        return "\n".join([f"### {_TITLE}", "", table, "", *notes, "", self._counts_line(), ""])

    def to_json(self, path: str | os.PathLike[str]) -> None:
        document = {"rows": [row.to_dict() for row in self.rows], "counts": self.counts()}
        text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
        Path(path).write_text(text + "\n", encoding="utf-8")

    def append_markdown(self, path: str | os.PathLike[str]) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(self.to_markdown() + "\n")

    def append_to_step_summary(self, environ: Mapping[str, str] = os.environ) -> Path | None:
        """Append the Markdown to ``$GITHUB_STEP_SUMMARY`` if set; returns the file written."""
        summary = environ.get("GITHUB_STEP_SUMMARY")
        if not summary:
            return None
        self.append_markdown(summary)
        return Path(summary)

    def _table(self, tablefmt: str, escape: Callable[[str], str] = str) -> str:
        cells = [[escape(cell) for cell in _cells(row)] for row in self.rows]
        table = tabulate.tabulate(cells, headers=_HEADERS, tablefmt=tablefmt, disable_numparse=True)
        return str(table)

    def _noted_rows(self) -> list[ReportRow]:
        # A pass needs no explanation; everything else says why, or what to do.
        return [row for row in self.rows if row.verdict != "pass" and row.detail]

    def _counts_line(self) -> str:
        counts = self.counts()
        parts = [f"{counts[verdict]} {verdict}" for verdict in sorted(counts)]
        return f"{_TITLE}: " + (", ".join(parts) if parts else "no benchmarks")


def _cells(row: ReportRow) -> list[str]:
    return [
        row.benchmark,
        row.metric,
        _number(row.baseline),
        _number(row.current),
        _number(row.delta, sign=True),
        _interval(row.ci_low, row.ci_high),
        "" if row.p_value is None else f"{row.p_value:.3g}",
        row.verdict,
    ]


def _number(value: float | None, sign: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def _interval(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return ""
    return f"[{low:+.4f}, {high:+.4f}]"
