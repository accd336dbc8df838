import json
import pickle
from pathlib import Path

import pytest

from pytest_mtserve.report import Report, ReportRow
from pytest_mtserve.statistics import GateResult

FAILED_GATE = GateResult(
    verdict="fail",
    method="mcnemar-exact",
    delta=-0.035,
    ci_low=-0.0452,
    ci_high=-0.0248,
    p_value=1.2e-9,
    n_paired=2000,
    discordant=(80, 10),
    reason="significant drop larger than the min effect 0.01",
)
PASSED_GATE = GateResult(
    verdict="pass",
    method="mcnemar-exact",
    delta=0.0,
    ci_low=0.0,
    ci_high=0.0,
    p_value=1.0,
    n_paired=1172,
    discordant=(0, 0),
    reason="no significant change at alpha 0.05",
)
COMMAND = "pytest --checkpoint /ckpts/x --benchmarks hellaswag --update-baselines"


def sample_report() -> Report:
    report = Report()
    report.add(ReportRow.from_gate("mmlu", "acc", 0.65, 0.615, FAILED_GATE))
    report.add(ReportRow.from_gate("arc_challenge", "acc_norm", 0.27, 0.27, PASSED_GATE))
    report.add(ReportRow.missing("hellaswag", "acc_norm", 0.43, COMMAND))
    report.add(
        ReportRow.mismatch("winogrande", "acc", 0.55, 0.56, ["limit: baseline 50, current 100"])
    )
    report.add(ReportRow.saved("piqa", "acc", 0.61, 0.63))
    report.add(ReportRow.saved("gsm8k", "exact_match", None, 0.02))
    return report


def test_the_table_shows_every_benchmark_with_its_numbers() -> None:
    table = sample_report().to_table()
    mmlu_line = next(line for line in table.splitlines() if line.startswith("mmlu "))
    assert mmlu_line.split() == [
        "mmlu",
        "acc",
        "0.6500",
        "0.6150",
        "-0.0350",
        "[-0.0452,",
        "-0.0248]",
        "1.2e-09",
        "fail",
    ]
    for header in ("baseline", "current", "delta", "95% CI of delta", "p", "verdict"):
        assert header in table.splitlines()[0]


def test_the_table_explains_everything_that_did_not_simply_pass() -> None:
    table = sample_report().to_table()
    assert "mmlu (fail): significant drop" in table
    assert f"hellaswag (missing): no baseline; record it with: {COMMAND}" in table
    assert "winogrande (mismatch): settings differ from the baseline's: limit: baseline 50" in table
    assert "piqa (updated): baseline updated 0.6100 -> 0.6300" in table
    assert "gsm8k (recorded): new baseline" in table
    assert "arc_challenge (pass)" not in table
    counts = "1 fail, 1 mismatch, 1 missing, 1 pass, 1 recorded, 1 updated"
    assert table.splitlines()[-1] == f"pytest-mtserve benchmark gate: {counts}"


def test_rows_are_sorted_whatever_order_workers_sent_them() -> None:
    assert [row.benchmark for row in sample_report().rows] == [
        "arc_challenge",
        "gsm8k",
        "hellaswag",
        "mmlu",
        "piqa",
        "winogrande",
    ]


def test_rows_survive_the_trip_from_an_xdist_worker() -> None:
    for row in sample_report().rows:
        as_sent = json.loads(json.dumps(row.to_dict()))
        assert ReportRow.from_dict(as_sent) == row
        assert pickle.loads(pickle.dumps(row)) == row


def test_from_dict_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError):
        ReportRow.from_dict({**ReportRow("mmlu", "acc", "pass").to_dict(), "colour": "red"})


def test_json_report_holds_rows_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "gate.json"
    sample_report().to_json(path)
    document = json.loads(path.read_text())
    assert document["counts"]["fail"] == 1
    mmlu = next(row for row in document["rows"] if row["benchmark"] == "mmlu")
    assert (mmlu["baseline"], mmlu["current"], mmlu["p_value"]) == (0.65, 0.615, 1.2e-9)


def test_markdown_is_appended_not_overwritten(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    sample_report().append_markdown(summary)
    sample_report().append_markdown(summary)
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    assert text.count("### pytest-mtserve benchmark gate") == 2
    assert "| mmlu " in text
    assert "- **mmlu** (fail): significant drop" in text


def test_pipes_in_cells_do_not_break_the_markdown_table() -> None:
    report = Report([ReportRow("a|b", "acc", "pass")])
    assert "a\\|b" in report.to_markdown()


def test_step_summary_is_written_only_when_github_sets_it(tmp_path: Path) -> None:
    summary = tmp_path / "step_summary.md"
    assert sample_report().append_to_step_summary({}) is None
    assert sample_report().append_to_step_summary({"GITHUB_STEP_SUMMARY": str(summary)}) == summary
    assert "| winogrande " in summary.read_text()


def test_an_empty_report_says_so() -> None:
    assert Report().to_table().endswith("pytest-mtserve benchmark gate: no benchmarks")
