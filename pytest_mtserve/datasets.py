"""Offline datasets laid out the way the Hugging Face hub serves them.

lm-eval's stock tasks call ``datasets.load_dataset(path="<repo_id>", name="<config>")``.
With ``HF_DATASETS_OFFLINE=1`` and a directory ``<repo_id>`` under the working directory,
``datasets`` loads that directory instead of the hub: its ``README.md`` front matter names
the configs and, per split, the data file. So the stock task YAMLs work unchanged, and
``evaluation.run_benchmark(datasets_dir=root)`` only has to run the harness from ``root``.

Row schemas the stock tasks of nvidia-lm-eval 26.3 read (one mapping per question):

``hails/mmlu_no_train`` (tasks ``mmlu`` -> ``mmlu_str``, ``mmlu_instruct``): one config per
subject, all 57 needed (the group task loads every subject), named like
``abstract_algebra`` (see ``MMLU_SUBJECTS``); splits ``dev`` (the 5 few-shot examples),
``validation``, ``test`` (scored)::

    {"question": str, "subject": str, "choices": [str, str, str, str], "answer": int 0-3}

``allenai/ai2_arc`` (tasks ``arc_challenge``, ``arc_easy``, ``arc_challenge_chat``):
configs ``ARC-Challenge`` and ``ARC-Easy``; splits ``test`` (scored), ``validation`` and
``train`` (REQUIRED even at 0-shot: lm-eval reads it as the few-shot pool when it builds
the task; a small stand-in such as the validation rows works)::

    {"id": str, "question": str,
     "choices": {"text": [str, ...], "label": [str, ...]},   # labels "A".."E" or "1".."5"
     "answerKey": str}                                        # one of choices.label

``gsm8k`` (task ``gsm8k``): config ``main``; splits ``test`` (scored), ``train`` (the
5 few-shot examples)::

    {"question": str, "answer": str}   # answer ends with "#### <number>"

``hellaswag`` (task ``hellaswag``): config ``default``; splits ``validation`` (scored),
``train`` (few-shot)::

    {"ind": int, "activity_label": str, "ctx_a": str, "ctx_b": str, "ctx": str,
     "endings": [str, str, str, str], "source_id": str, "split": str,
     "split_type": str, "label": str}   # label "0".."3"

``winogrande`` (task ``winogrande``): config ``winogrande_xl``; splits ``validation``
(scored), ``train`` (few-shot)::

    {"sentence": str, "option1": str, "option2": str, "answer": str}   # "1" or "2"

Files are JSON Lines (one file per config and split), readable and diffable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

# The 57 subjects of hails/mmlu_no_train, which are also lm-eval's mmlu subtask suffixes.
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_medicine", "college_physics", "computer_security",
    "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science", "high_school_european_history",
    "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging",
    "human_sexuality", "international_law", "jurisprudence", "logical_fallacies",
    "machine_learning", "management", "marketing", "medical_genetics", "miscellaneous",
    "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology",
    "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip

# Config and split names become file names and YAML scalars: keep them plain.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_hub_dataset(
    root: Path,
    repo_id: str,
    configs: Mapping[str, Mapping[str, Sequence[Mapping]]],
) -> Path:
    """Write ``configs`` ({config: {split: rows}}) as ``root/<repo_id>`` and return that dir.

    ``repo_id`` is the task's ``dataset_path`` (``"allenai/ai2_arc"``, ``"gsm8k"``); each
    config is a task's ``dataset_name`` (use ``"default"`` for tasks without one). Row
    schemas per benchmark are in this module's docstring. Existing files of the same
    configs are overwritten; the README lists exactly the configs given here.
    """
    _check_layout(repo_id, configs)
    dataset_dir = Path(root) / repo_id
    for config, splits in configs.items():
        for split, rows in splits.items():
            _write_jsonl(dataset_dir / config / f"{split}.jsonl", rows)
    (dataset_dir / "README.md").write_text(_readme(repo_id, configs), encoding="utf-8")
    return dataset_dir


def _check_layout(repo_id: str, configs: Mapping[str, Mapping[str, Sequence[Mapping]]]) -> None:
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(_SAFE_NAME.match(part) for part in parts):
        raise ValueError(f"repo_id {repo_id!r} is not a hub id like 'owner/name' or 'name'")
    if not configs:
        raise ValueError(f"no configs given for {repo_id!r}: pass {{config: {{split: rows}}}}")
    for config, splits in configs.items():
        names = [config, *splits]
        bad = [name for name in names if not _SAFE_NAME.match(name)]
        if bad:
            raise ValueError(f"{repo_id}: config/split names {bad} must match {_SAFE_NAME.pattern}")
        empty = [split for split, rows in splits.items() if not rows]
        if not splits or empty:
            raise ValueError(f"{repo_id}/{config}: empty splits {empty or '(none given)'}")


def _write_jsonl(path: Path, rows: Sequence[Mapping]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    # Write then rename, so a concurrent reader never sees half a file.
    partial = path.with_suffix(".jsonl.partial")
    partial.write_text("".join(lines), encoding="utf-8")
    partial.replace(path)


def _readme(repo_id: str, configs: Mapping[str, Mapping[str, Sequence[Mapping]]]) -> str:
    # The front matter's `configs` list is what `datasets` reads to map a config name and
    # split to files in a local directory; the `default` flag keeps name=None working.
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines.append(f"- config_name: {config}")
        if config == "default":
            lines.append("  default: true")
        lines.append("  data_files:")
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    lines += ["---", "", f"# {repo_id} (offline copy)", ""]
    lines += [f"- {config}: {', '.join(splits)}" for config, splits in configs.items()]
    return "\n".join(lines) + "\n"
