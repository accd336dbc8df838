import hashlib
import json
import os
import re
import shlex
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_mtserve.baselines import (
    Baseline,
    BaselineError,
    BaselineStore,
    record_command,
    settings_mismatch,
)
from pytest_mtserve.statistics import compare

SETTINGS = {
    "task": "mmlu",
    "num_fewshot": 5,
    "limit": 50,
    "metric": "acc",
    "dataset_fingerprint": "f00d",
}
PROVENANCE = {"checkpoint": "/ckpts/run/iter_0001000", "iteration": 1000, "tp": 8, "pp": 1}


@dataclass
class Result:
    """Shaped like evaluation.BenchmarkResult."""

    benchmark: str = "mmlu"
    metric: str = "acc"
    value: float = 0.5
    stderr: float | None = 0.05
    n: int = 100
    outcomes: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=lambda: dict(SETTINGS))


def full_hash(index: int) -> str:
    return hashlib.sha256(f"doc {index}".encode()).hexdigest()


def result(value: float = 0.5, questions: int = 100) -> Result:
    outcomes = {full_hash(i): float(i < value * questions) for i in range(questions)}
    return Result(value=value, n=questions, outcomes=outcomes)


def test_a_baseline_round_trips_through_its_file(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path, "llama3-8b")
    recorded = Baseline.from_result(result(), PROVENANCE)
    assert store.save(recorded) is None
    assert store.load("mmlu") == recorded
    assert store.path_for("mmlu") == tmp_path / "llama3-8b" / "mmlu.json"


def test_a_question_held_twice_is_recorded_and_gated_twice(tmp_path: Path) -> None:
    # Full MMLU holds 27 questions twice; the evaluation keys each repeat "<doc_hash>#2".
    store = BaselineStore(tmp_path, "llama3-8b")
    fresh = result()
    fresh.outcomes[f"{full_hash(0)}#2"] = 0.0
    fresh.n += 1
    store.save(Baseline.from_result(fresh, PROVENANCE))
    recorded = store.load("mmlu")
    assert recorded is not None and len(recorded.outcomes) == fresh.n
    assert compare(recorded, fresh).n_paired == fresh.n


def test_a_loaded_baseline_pairs_with_the_fresh_result(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path, "m")
    store.save(Baseline.from_result(result(), PROVENANCE))
    gate = compare(store.load("mmlu"), result())
    assert (gate.verdict, gate.n_paired, gate.p_value) == ("pass", 100, 1.0)


def test_the_file_is_diff_friendly(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path, "m")
    store.save(Baseline.from_result(result(questions=4), {"date": "2026-11-01T00:00:00+00:00"}))
    lines = store.path_for("mmlu").read_text().splitlines()
    outcome_lines = lines[lines.index('  "outcomes": {') + 1 : -2]
    entries = [
        f'    "{key}": {value}'
        for key, value in sorted((full_hash(i)[:16], int(i < 2)) for i in range(4))
    ]
    assert outcome_lines == [entry + "," for entry in entries[:-1]] + entries[-1:]
    first_fields = [line.split('"')[1] for line in lines[1:7]]
    assert first_fields == ["schema_version", "benchmark", "metric", "value", "stderr", "n"]
    assert lines[-2:] == ["  }", "}"]  # outcomes last, after the short summary


def test_provenance_gets_a_date_and_versions_and_keeps_the_callers_fields() -> None:
    provenance = Baseline.from_result(result(), PROVENANCE).provenance
    assert provenance["checkpoint"] == PROVENANCE["checkpoint"]
    assert provenance["date"].endswith("+00:00")
    assert provenance["versions"]["pytest-mtserve"] == "0.1.0"
    assert set(provenance["versions"]) == {"pytest-mtserve", "nemo-evaluator", "nvidia-lm-eval"}


def test_non_finite_stderr_is_stored_as_unknown() -> None:
    unknown = Result(stderr=float("nan"))
    assert Baseline.from_result(unknown).stderr is None


def test_a_non_finite_score_cannot_be_recorded() -> None:
    with pytest.raises(ValueError, match="non-finite score"):
        Baseline.from_result(Result(value=float("nan")))


def test_save_returns_the_baseline_it_replaced(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path, "m")
    first = Baseline.from_result(result(0.5), PROVENANCE)
    second = Baseline.from_result(result(0.6), PROVENANCE)
    store.save(first)
    assert store.save(second) == first
    assert store.load("mmlu") == second


def test_a_missing_baseline_loads_as_none(tmp_path: Path) -> None:
    assert BaselineStore(tmp_path, "m").load("mmlu") is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"schema_version": 1, "benchm', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"schema_version": 99}', "schema_version 99"),
        ('{"schema_version": 1, "benchmark": "mmlu"}', "field 'metric' is missing"),
    ],
)
def test_an_unusable_file_names_itself_and_the_fix(
    tmp_path: Path, content: str, problem: str
) -> None:
    store = BaselineStore(tmp_path, "m")
    path = store.path_for("mmlu")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(BaselineError, match=problem) as caught:
        store.load("mmlu")
    assert str(path) in str(caught.value)
    assert "--update-baselines" in str(caught.value)


@pytest.mark.parametrize(
    ("field_name", "bad_value"), [("value", "high"), ("n", 1.5), ("stderr", True), ("settings", [])]
)
def test_fields_of_the_wrong_type_are_rejected(
    tmp_path: Path, field_name: str, bad_value: Any
) -> None:
    store = BaselineStore(tmp_path, "m")
    store.save(Baseline.from_result(result(), PROVENANCE))
    document = json.loads(store.path_for("mmlu").read_text())
    document[field_name] = bad_value
    store.path_for("mmlu").write_text(json.dumps(document))
    with pytest.raises(BaselineError, match=f"field '{field_name}' has the wrong type"):
        store.load("mmlu")


def test_non_numeric_outcomes_are_rejected(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path, "m")
    store.save(Baseline.from_result(result(), PROVENANCE))
    document = json.loads(store.path_for("mmlu").read_text())
    document["outcomes"]["0123456789abcdef"] = "right"
    store.path_for("mmlu").write_text(json.dumps(document))
    with pytest.raises(BaselineError, match=r"not numbers.*0123456789abcdef"):
        store.load("mmlu")


def test_a_file_holding_another_benchmark_is_rejected(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path, "m")
    store.save(Baseline.from_result(result(), PROVENANCE))
    store.path_for("mmlu").rename(store.path_for("arc_challenge"))
    with pytest.raises(BaselineError, match="holds the baseline of 'mmlu', not 'arc_challenge'"):
        store.load("arc_challenge")


def test_saving_over_a_corrupt_file_repairs_it(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path, "m")
    store.path_for("mmlu").parent.mkdir(parents=True)
    store.path_for("mmlu").write_text("garbage")
    recorded = Baseline.from_result(result(), PROVENANCE)
    assert store.save(recorded) is None
    assert store.load("mmlu") == recorded


@pytest.mark.parametrize(
    "model_id", ["../escape", "a/b", "..", ".", "", ".hidden", "x" * 129, "a b"]
)
def test_unsafe_model_ids_are_refused(tmp_path: Path, model_id: str) -> None:
    with pytest.raises(BaselineError, match="cannot name a baseline file"):
        BaselineStore(tmp_path, model_id)


def test_unsafe_benchmark_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match=re.escape("benchmark name '../../etc/passwd'")):
        BaselineStore(tmp_path, "m").path_for("../../etc/passwd")


def test_an_interrupted_save_leaves_the_old_file_and_no_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BaselineStore(tmp_path, "m")
    old = Baseline.from_result(result(0.5), PROVENANCE)
    store.save(old)

    def interrupted_fsync(descriptor: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        store.save(Baseline.from_result(result(0.7), PROVENANCE))
    monkeypatch.undo()
    assert store.load("mmlu") == old
    # Nothing but the baseline itself: no temporary file, and the lock lives outside the tree.
    assert sorted(p.name for p in store.path_for("mmlu").parent.iterdir()) == ["mmlu.json"]


def test_a_saved_file_gets_the_umask_mode_not_a_private_temp_mode(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path, "m")
    store.save(Baseline.from_result(result(), PROVENANCE))
    umask = os.umask(0o022)
    os.umask(umask)
    assert store.path_for("mmlu").stat().st_mode & 0o777 == 0o666 & ~umask


def _save_many(root: str, writer: int, saves: int) -> list[float | None]:
    store = BaselineStore(Path(root), "m")
    replaced = []
    for i in range(saves):
        previous = store.save(
            Baseline.from_result(result(value=(writer * 100 + i) / 1000), PROVENANCE)
        )
        replaced.append(None if previous is None else previous.value)
    return replaced


def test_concurrent_saves_are_serialized(tmp_path: Path) -> None:
    writers, saves = 4, 5
    with ProcessPoolExecutor(max_workers=writers) as pool:
        futures = [pool.submit(_save_many, str(tmp_path), w, saves) for w in range(writers)]
        replaced = [value for future in futures for value in future.result()]
    final = BaselineStore(tmp_path, "m").load("mmlu").value
    written = sorted((w * 100 + i) / 1000 for w in range(writers) for i in range(saves))
    # Each save replaced exactly the one before it: a chain with no value read twice.
    assert replaced.count(None) == 1
    assert sorted([v for v in replaced if v is not None] + [final]) == written


def test_settings_mismatch_lists_each_differing_field() -> None:
    current = {**SETTINGS, "limit": 100, "seed": 1234}
    del current["dataset_fingerprint"]
    assert settings_mismatch(SETTINGS, current) == [
        'dataset_fingerprint: baseline "f00d", current (not set)',
        "limit: baseline 50, current 100",
        "seed: baseline (not set), current 1234",
    ]


def test_settings_compare_as_stored(tmp_path: Path) -> None:
    stored = Baseline.from_result(Result(settings={"data": Path("/d"), "tasks": ("a", "b")}))
    assert settings_mismatch(stored.settings, {"data": Path("/d"), "tasks": ("a", "b")}) == []


def test_record_command_is_a_runnable_command_line() -> None:
    command = record_command("/ckpts/my run/iter_0001000", ["mmlu", "arc_challenge"], ["--tp", "8"])
    assert shlex.split(command) == [
        "pytest",
        "--checkpoint",
        "/ckpts/my run/iter_0001000",
        "--benchmarks",
        "mmlu,arc_challenge",
        "--tp",
        "8",
        "--update-baselines",
    ]
