"""Offline hub-layout datasets: ``datasets.load_dataset`` finds them as lm-eval asks for them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_mtserve.datasets import MMLU_SUBJECTS, write_hub_dataset
from pytest_mtserve.testing_data import write_tiny_datasets

ARC_ROW = {"id": "q1", "question": "2 + 2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"}

# Loads the way lm-eval's tasks do, offline, from the working directory; in a subprocess so
# the offline environment variables cannot leak into other tests.
LOAD = """
import json, sys, datasets
path, name = sys.argv[1], None if sys.argv[2] == "-" else sys.argv[2]
loaded = datasets.load_dataset(path=path, name=name)
print(json.dumps({split: loaded[split].to_list() for split in loaded}))
"""


def _load(root: Path, path: str, name: str | None) -> dict[str, list[dict]]:
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / ".hf"), "PATH": ""}
    completed = subprocess.run(
        [sys.executable, "-c", LOAD, path, name or "-"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_hub_layout_loads_offline_unchanged(tmp_path: Path) -> None:
    written = write_hub_dataset(tmp_path, "allenai/ai2_arc", {
        "ARC-Easy": {"test": [ARC_ROW], "train": [ARC_ROW, ARC_ROW]},
        "ARC-Challenge": {"test": [ARC_ROW]},
    })
    assert written == tmp_path / "allenai" / "ai2_arc"
    assert "ARC-Challenge" in (written / "README.md").read_text()
    loaded = _load(tmp_path, "allenai/ai2_arc", "ARC-Easy")
    assert loaded == {"test": [ARC_ROW], "train": [ARC_ROW, ARC_ROW]}


def test_default_config_loads_without_a_name(tmp_path: Path) -> None:
    row = {"sentence": "The cat sat.", "label": "0"}
    write_hub_dataset(tmp_path, "hellaswag", {"default": {"validation": [row]}})
    assert _load(tmp_path, "hellaswag", None) == {"validation": [row]}


@pytest.mark.parametrize(
    ("repo_id", "configs", "problem"),
    [
        ("../escape", {"c": {"test": [ARC_ROW]}}, "not a hub id"),
        ("a/b/c", {"c": {"test": [ARC_ROW]}}, "not a hub id"),
        ("owner/name", {}, "no configs"),
        ("owner/name", {"c": {"test": []}}, "empty splits"),
        ("owner/name", {"bad name": {"test": [ARC_ROW]}}, "must match"),
    ],
)
def test_bad_layouts_are_refused(tmp_path: Path, repo_id: str, configs: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        write_hub_dataset(tmp_path, repo_id, configs)


def test_tiny_datasets_are_deterministic_and_complete(tmp_path: Path) -> None:
    first, second = write_tiny_datasets(tmp_path / "a"), write_tiny_datasets(tmp_path / "b")
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in files)
    mmlu = {path.parent.name for path in (first / "hails" / "mmlu_no_train").rglob("test.jsonl")}
    assert mmlu == set(MMLU_SUBJECTS) and len(MMLU_SUBJECTS) == 57


def test_tiny_rows_have_one_right_answer(tmp_path: Path) -> None:
    root = write_tiny_datasets(tmp_path)
    for line in (root / "allenai/ai2_arc/ARC-Challenge/test.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["answerKey"] in row["choices"]["label"]
        assert len(set(row["choices"]["text"])) == len(row["choices"]["text"])
    for line in (root / "gsm8k/main/test.jsonl").read_text().splitlines():
        assert "\n#### " in json.loads(line)["answer"]
