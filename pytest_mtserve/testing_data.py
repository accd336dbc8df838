"""Tiny, deterministic, made-up datasets in the hub layout, for tests of the evaluation path.

The questions are simple arithmetic dressed in each dataset's schema (see ``datasets``),
so every row is well formed and has exactly one right answer. The same call writes
byte-identical files, so lm-eval's ``doc_hash`` values are stable across test runs.
"""

from __future__ import annotations

import random
from pathlib import Path

from pytest_mtserve.datasets import MMLU_SUBJECTS, write_hub_dataset

ARC_QUESTIONS_PER_SPLIT = 20
MMLU_TEST_QUESTIONS_PER_SUBJECT = 2
MMLU_DEV_QUESTIONS_PER_SUBJECT = 5  # the stock mmlu tasks are 5-shot from `dev`
GSM8K_TEST_QUESTIONS = 10
GSM8K_TRAIN_QUESTIONS = 8  # the stock gsm8k task is 5-shot from `train`


def write_tiny_datasets(root: Path) -> Path:
    """Write tiny ARC (Challenge, Easy), MMLU (all 57 subjects) and GSM8K under ``root``."""
    rng = random.Random(20261201)
    write_hub_dataset(root, "allenai/ai2_arc", {
        config: {split: arc_rows(rng, f"{config}-{split}", ARC_QUESTIONS_PER_SPLIT)
                 for split in ("test", "validation", "train")}
        for config in ("ARC-Challenge", "ARC-Easy")
    })
    write_hub_dataset(root, "hails/mmlu_no_train", {
        subject: {
            "dev": mmlu_rows(rng, subject, MMLU_DEV_QUESTIONS_PER_SUBJECT),
            "validation": mmlu_rows(rng, subject, 1),
            "test": mmlu_rows(rng, subject, MMLU_TEST_QUESTIONS_PER_SUBJECT),
        }
        for subject in MMLU_SUBJECTS
    })
    write_hub_dataset(root, "gsm8k", {"main": {
        "test": gsm8k_rows(rng, GSM8K_TEST_QUESTIONS),
        "train": gsm8k_rows(rng, GSM8K_TRAIN_QUESTIONS),
    }})
    return root


def _addition(rng: random.Random) -> tuple[int, int, list[int]]:
    """Two addends and four distinct candidate sums, the right one among them."""
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    wrong = rng.sample([a + b + delta for delta in (-3, -2, -1, 1, 2, 3)], 3)
    candidates = [a + b, *wrong]
    rng.shuffle(candidates)
    return a, b, candidates


def arc_rows(rng: random.Random, prefix: str, count: int) -> list[dict]:
    """ARC rows (``id, question, choices{text,label}, answerKey``); some use 1-4 labels."""
    rows = []
    for index in range(count):
        a, b, candidates = _addition(rng)
        labels = ["1", "2", "3", "4"] if index % 5 == 4 else ["A", "B", "C", "D"]
        rows.append({
            "id": f"{prefix}-{index}",
            "question": f"A box holds {a} red balls and {b} blue balls. How many balls are in the box?",
            "choices": {"text": [str(c) for c in candidates], "label": labels},
            "answerKey": labels[candidates.index(a + b)],
        })
    return rows


def mmlu_rows(rng: random.Random, subject: str, count: int) -> list[dict]:
    """MMLU rows (``question, subject, choices[4], answer`` index)."""
    rows = []
    for _ in range(count):
        a, b, candidates = _addition(rng)
        rows.append({
            "question": f"In a {subject.replace('_', ' ')} exam, what is {a} plus {b}?",
            "subject": subject,
            "choices": [str(c) for c in candidates],
            "answer": candidates.index(a + b),
        })
    return rows


def gsm8k_rows(rng: random.Random, count: int) -> list[dict]:
    """GSM8K rows (``question, answer``), the answer ending in ``#### <number>``."""
    rows = []
    for _ in range(count):
        apples, eaten = rng.randint(10, 60), rng.randint(1, 9)
        left = apples - eaten
        rows.append({
            "question": f"Tom has {apples} apples and eats {eaten}. How many apples are left?",
            "answer": f"Tom has {apples} - {eaten} = <<{apples}-{eaten}={left}>>{left} apples left.\n#### {left}",
        })
    return rows
