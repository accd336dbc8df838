"""The gate end to end: the built-in suite (``pytest --pyargs pytest_mtserve.suite``) in pytest
subprocesses, against the REAL server (torchrun ranks, PyTriton, FastAPI) on the tiny
checkpoint, evaluated by REAL nemo-evaluator + lm-eval on tiny offline datasets. Nothing is
faked; each pytest run starts a server and the harness, so the runs are few and small.

The tiny model has random weights: on made-up questions a damaged copy is not worse on
average, only different, and a paired test (rightly) sees no drop. So the damage test first
makes the ARC questions ones the healthy model answers well, honestly: each question's gold
answer becomes the healthy model's own choice, read from lm-eval's per-sample records of a
healthy run (``arc_rows_answered_as_in``). The healthy model then scores 1.0, a damaged copy
about chance, and the exact McNemar test fires on 20 questions.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from conftest import write_in_subprocess
from pytest_mtserve.benchmarks import DEFAULT_REGISTRY
from pytest_mtserve.datasets import MMLU_SUBJECTS, write_hub_dataset
from pytest_mtserve.evaluation import Endpoint, EvaluationError, run_benchmark
from pytest_mtserve.testing_data import (
    ARC_QUESTIONS_PER_SPLIT,
    MMLU_DEV_QUESTIONS_PER_SUBJECT,
    arc_rows,
    gsm8k_rows,
    mmlu_rows,
)

pytest_plugins = ["pytester"]

MODEL_ID = "tiny"  # every run gates against baselines/tiny/, whatever checkpoint it serves
LIMIT = 8  # questions per (sub)task: 8 ARC, 57 MMLU (one per subject in these datasets)
ONE_OF_EACH_KIND = ("arc_challenge", "mmlu", "arc_challenge_chat")  # log-likelihood, generation, chat
ARC_SPLITS = ("test", "validation", "train")  # lm-eval reads train as the few-shot pool
LOGLIKELIHOOD_TOLERANCE = 1e-4  # a choice's summed log-likelihood over its tokens, float32
DAMAGE = 1.0  # noise as large as the weights' own spread: answers flip, the model still runs


# --------------------------------------------------------------------------------- data


def write_arc(root: Path, test_rows: list[dict] | None = None) -> None:
    """Tiny ARC-Challenge (20 questions per split); ``test_rows`` replace its test split."""
    rng = random.Random(20261201)
    splits = {split: arc_rows(rng, f"ARC-Challenge-{split}", ARC_QUESTIONS_PER_SPLIT) for split in ARC_SPLITS}
    write_hub_dataset(root, "allenai/ai2_arc", {"ARC-Challenge": {**splits, "test": test_rows or splits["test"]}})


def write_mmlu(root: Path) -> None:
    """Tiny MMLU: one scored question per subject (57), the 5 few-shot examples of each."""
    rng = random.Random(20261202)
    write_hub_dataset(root, "hails/mmlu_no_train", {
        subject: {
            "dev": mmlu_rows(rng, subject, MMLU_DEV_QUESTIONS_PER_SUBJECT),
            "validation": mmlu_rows(rng, subject, 1),
            "test": mmlu_rows(rng, subject, 1),
        }
        for subject in MMLU_SUBJECTS
    })  # fmt: skip


def arc_rows_answered_as_in(samples_files: Iterable[Path]) -> list[dict]:
    """The ARC questions of lm-eval ``samples_arc_*.jsonl`` files, in their order, each with
    the model's own choice as its gold answer: lm-eval's ``acc_norm`` choice, the highest
    log-likelihood per character of the answer. A model scored on these rows gets
    ``acc_norm`` 1.0 exactly when it answers as it did in those samples."""
    records = [json.loads(line) for path in samples_files for line in path.read_text().splitlines()]
    rows = []
    for record in sorted(records, key=lambda record: record["doc_id"]):
        doc, choices = record["doc"], record["doc"]["choices"]
        log_likelihoods = [float(log_likelihood) for log_likelihood, _is_greedy in record["filtered_resps"]]
        per_character = [ll / len(text) for ll, text in zip(log_likelihoods, choices["text"], strict=True)]
        chosen = per_character.index(max(per_character))  # argmax: the first of equals, as numpy
        rows.append({**doc, "answerKey": choices["label"][chosen]})
    return rows


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def damaged_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with its weights perturbed: same shape and tokenizer, other answers."""
    run_dir = tmp_path_factory.mktemp("damaged-checkpoint")
    write_in_subprocess(
        "from pytest_mtserve.server.checkpoint_writer import write_perturbed_copy as w; import sys; "
        "w(sys.argv[1], sys.argv[2], relative_noise=float(sys.argv[3]))",
        tiny_checkpoint,
        run_dir,
        DAMAGE,
    )
    return run_dir


def run_suite(pytester: pytest.Pytester, checkpoint: Path, name: str, *args: str) -> pytest.RunResult:
    """The built-in suite on ``checkpoint`` in a pytest subprocess; its temporary files (server
    log, evaluation output) under ``pytester.path / name``, its report in ``name.json``.

    Directories are passed as ``--option=DIR``: pytest picks its rootdir (where
    ``--baselines-dir`` is) before the plugin's options exist, and takes a separate ``DIR``
    argument for a test path."""
    return pytester.runpytest_subprocess(
        "--pyargs", "pytest_mtserve.suite", "-v",
        f"--checkpoint={checkpoint}", "--device", "cpu", "--model-id", MODEL_ID,
        "--datasets-dir=datasets", "--baselines-dir=baselines",
        "--basetemp", str(pytester.path / name), "--mtserve-report", f"{name}.json",
        *args,
    )  # fmt: skip


def report_rows(pytester: pytest.Pytester, name: str) -> dict[str, dict[str, Any]]:
    document = json.loads((pytester.path / f"{name}.json").read_text())
    return {row["benchmark"]: row for row in document["rows"]}


def samples_files(run_dir: Path, task: str) -> list[Path]:
    return sorted(run_dir.rglob(f"samples_{task}_*.jsonl"))


def answers(run_dir: Path) -> dict[str, Any]:
    """Every question's raw answer (generated text or log-likelihoods) in a run, by doc_hash."""
    return {
        record["doc_hash"]: record["resps"]
        for path in run_dir.rglob("samples_*.jsonl")
        for record in map(json.loads, path.read_text().splitlines())
    }


def assert_same_answers(left: dict[str, Any], right: dict[str, Any]) -> None:
    """Generated texts equal; log-likelihoods equal up to float32 reassociation: a choice
    packed with other prompts sharing its context (``server/shared_prefix.py``) runs in
    matrices of other shapes than alone, which moves its sum by ~1e-6."""
    assert left and left.keys() == right.keys()
    for doc_hash in left:
        for mine, theirs in zip(_leaves(left[doc_hash]), _leaves(right[doc_hash]), strict=True):
            if _is_number(mine) and _is_number(theirs):
                assert abs(float(mine) - float(theirs)) <= LOGLIKELIHOOD_TOLERANCE, (doc_hash, mine, theirs)
            else:
                assert mine == theirs, (doc_hash, mine, theirs)


def _leaves(value: Any) -> list[Any]:
    return [leaf for item in value for leaf in _leaves(item)] if isinstance(value, list) else [value]


def _is_number(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def server_ready_lines(run_dir: Path) -> list[str]:
    return [
        line
        for log in run_dir.rglob("server.log")
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("MTSERVE_READY ")
    ]


def processes_mentioning(*markers: Path) -> list[str]:
    """Command lines of live processes that name any of ``markers`` (server ranks name their
    checkpoint; tritonserver and its stubs name their workspace under the pytester HOME)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if any(str(marker) in command for marker in markers) and cmdline.parent.name != str(os.getpid()):
            found.append(command)
    return found


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_recorded_baselines_pass_again_with_one_shared_server_under_xdist(
    pytester: pytest.Pytester, tiny_checkpoint: Path
) -> None:
    write_arc(pytester.path / "datasets")
    write_mmlu(pytester.path / "datasets")
    benchmarks = ("--benchmarks", ",".join(ONE_OF_EACH_KIND), "--limit-samples", str(LIMIT))

    recorded = run_suite(pytester, tiny_checkpoint, "record", *benchmarks, "--update-baselines")
    recorded.assert_outcomes(passed=len(ONE_OF_EACH_KIND))
    assert {row["verdict"] for row in report_rows(pytester, "record").values()} == {"recorded"}
    for name in ONE_OF_EACH_KIND:
        check_baseline_file(pytester.path / "baselines" / MODEL_ID / f"{name}.json", name, tiny_checkpoint)

    gated = run_suite(pytester, tiny_checkpoint, "gate", *benchmarks, "-n", "2")
    gated.assert_outcomes(passed=len(ONE_OF_EACH_KIND))
    gated.stdout.fnmatch_lines(["*mtserve benchmark gate*", "*3 pass*"])
    # The server is deterministic whatever the batching (one client, then two workers' at once):
    # every answer is the same, so no question flips.
    assert_same_answers(answers(pytester.path / "gate"), answers(pytester.path / "record"))
    for name, row in report_rows(pytester, "gate").items():
        assert (row["verdict"], row["method"], row["p_value"], row["delta"]) == ("pass", "mcnemar-exact", 1.0, 0.0), name
        assert "(b=0, c=0)" in row["detail"], name

    # Both workers gated benchmarks, against one server, which is gone now.
    assert {"gw0", "gw1"} <= set(re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED", gated.stdout.str()))
    assert len(server_ready_lines(pytester.path / "gate")) == 1
    assert processes_mentioning(tiny_checkpoint, pytester.path) == []


def check_baseline_file(path: Path, name: str, checkpoint: Path) -> None:
    baseline = json.loads(path.read_text())
    expected_n = len(MMLU_SUBJECTS) if name == "mmlu" else LIMIT
    assert baseline["metric"] == DEFAULT_REGISTRY.get(name).metric
    assert baseline["n"] == len(baseline["outcomes"]) == expected_n
    assert set(baseline["outcomes"].values()) <= {0, 1}
    assert baseline["value"] == pytest.approx(statistics.fmean(baseline["outcomes"].values()))
    assert baseline["settings"]["limit"] == LIMIT
    assert baseline["settings"]["task"] == DEFAULT_REGISTRY.get(name).task
    assert baseline["provenance"]["checkpoint"] == str(checkpoint)
    assert baseline["provenance"]["tp"] == 1
    assert baseline["provenance"]["versions"]["nvidia-lm-eval"]


@pytest.mark.slow
def test_missing_baseline_names_its_command_and_a_damaged_checkpoint_fails(
    pytester: pytest.Pytester, tiny_checkpoint: Path, damaged_checkpoint: Path
) -> None:
    write_arc(pytester.path / "datasets")
    arc = ("--benchmarks", "arc_challenge")

    missing = run_suite(pytester, tiny_checkpoint, "missing", *arc)
    assert missing.ret == pytest.ExitCode.TESTS_FAILED
    missing.stdout.fnmatch_lines(["*arc_challenge has no baseline at *baselines/tiny/arc_challenge.json*"])
    command = re.search(r"no baseline; record it with: (.+)", missing.stdout.str())[1]

    # Make the questions ones the healthy model answers well: its own answers become gold.
    healthy_answers = arc_rows_answered_as_in(samples_files(pytester.path / "missing", "arc_challenge"))
    write_arc(pytester.path / "datasets", test_rows=healthy_answers)
    recorded = run_shell(command, pytester.path)
    assert recorded.returncode == 0, recorded.stdout
    assert "1 recorded" in recorded.stdout
    baseline = json.loads((pytester.path / "baselines" / MODEL_ID / "arc_challenge.json").read_text())
    assert (baseline["value"], baseline["n"]) == (1.0, ARC_QUESTIONS_PER_SPLIT)

    damaged = run_suite(pytester, damaged_checkpoint, "damaged", *arc)
    assert damaged.ret == pytest.ExitCode.TESTS_FAILED
    damaged.stdout.fnmatch_lines([
        "*arc_challenge is significantly worse than its baseline*",
        "*benchmark*metric*baseline*current*delta*95% CI of delta*p*verdict*",
        "*arc_challenge*acc_norm*1.0000*fail*",
    ])  # fmt: skip
    row = report_rows(pytester, "damaged")["arc_challenge"]
    assert row["verdict"] == "fail" and row["method"] == "mcnemar-exact"
    assert row["current"] < 0.75 and row["p_value"] < 0.01
    assert processes_mentioning(tiny_checkpoint, damaged_checkpoint, pytester.path) == []


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``command`` as a user would paste it into a shell, with this Python's ``pytest``."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run(
        command, shell=True, cwd=cwd, env={**os.environ, "PATH": path},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def test_offline_dataset_named_like_its_task_is_a_clear_error(tmp_path: Path) -> None:
    # lm-eval would take datasets/gsm8k/ for a folder of task YAMLs and run nothing.
    write_hub_dataset(tmp_path, "gsm8k", {"main": {"test": gsm8k_rows(random.Random(1), 2)}})
    unreachable = Endpoint("http://127.0.0.1:9", "model")  # the check comes before any request
    with pytest.raises(EvaluationError, match=r"dataset folder 'gsm8k', named like the lm-eval task"):
        run_benchmark(
            DEFAULT_REGISTRY.get("gsm8k"), unreachable, tmp_path / "out",
            limit=1, parallelism=1, request_timeout=1, datasets_dir=tmp_path,
        )  # fmt: skip
