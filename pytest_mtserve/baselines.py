"""Baseline files: ``<root>/<model-id>/<benchmark>.json``, one per benchmark.

A file is meant to be committed and reviewed: indented JSON with sorted keys, the summary
first and the per-question outcomes last, one ``"<doc_hash prefix>": value`` per line, so an
update shows in a diff as the questions that flipped.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import re
import secrets
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import filelock

from pytest_mtserve.statistics import Scored, pairing_keys

SCHEMA_VERSION = 1
# Distributions whose versions say what produced a baseline; looked up, never imported.
_PROVENANCE_DISTRIBUTIONS = ("pytest-mtserve", "nemo-evaluator", "nvidia-lm-eval")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NUMBER = (int, float)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "benchmark": (str,),
    "metric": (str,),
    "value": _NUMBER,
    "stderr": (*_NUMBER, type(None)),
    "n": (int,),
    "settings": (dict,),
    "outcomes": (dict,),
    "provenance": (dict,),
}
_RERECORD_HINT = "fix or delete the file, then record it again with --update-baselines"


class BaselineError(Exception):
    """A baseline file or store that cannot be used; the message names the file and the fix."""


class BenchmarkResultLike(Scored, Protocol):
    """What ``evaluation.BenchmarkResult`` offers (kept structural: no import needed)."""

    @property
    def benchmark(self) -> str: ...
    @property
    def metric(self) -> str: ...
    @property
    def settings(self) -> Mapping[str, Any]: ...


@dataclass
class Baseline:
    benchmark: str
    metric: str
    value: float
    stderr: float | None
    n: int
    settings: dict[str, Any]  # must equal the candidate's for the two to be comparable
    outcomes: dict[str, float]  # doc_hash prefix -> per-question metric value
    provenance: dict[str, Any]  # checkpoint, iteration, tp/pp, versions, date, git commit

    @classmethod
    def from_result(
        cls, result: BenchmarkResultLike, provenance: Mapping[str, Any] | None = None
    ) -> Baseline:
        """A baseline recording ``result``; ``provenance`` wins over the date/versions added."""
        if not math.isfinite(result.value):
            raise ValueError(f"{result.benchmark}: cannot record a non-finite score {result.value}")
        outcomes = pairing_keys(result.outcomes)
        if not all(math.isfinite(value) for value in outcomes.values()):
            raise ValueError(f"{result.benchmark}: cannot record non-finite per-question outcomes")
        stderr = result.stderr
        return cls(
            benchmark=result.benchmark,
            metric=result.metric,
            value=float(result.value),
            stderr=float(stderr) if stderr is not None and math.isfinite(stderr) else None,
            n=int(result.n),
            settings=_as_json_value(result.settings),
            outcomes=outcomes,
            provenance=_as_json_value({**default_provenance(), **(provenance or {})}),
        )

    def to_json(self) -> str:
        document = {
            "schema_version": SCHEMA_VERSION,
            "benchmark": self.benchmark,
            "metric": self.metric,
            "value": self.value,
            "stderr": self.stderr,
            "n": self.n,
            "settings": _sorted_deep(self.settings),
            "provenance": _sorted_deep(self.provenance),
            # 0/1 outcomes written as 0/1, not 0.0/1.0: a sixth of the bytes of an MMLU file.
            "outcomes": {key: _compact(self.outcomes[key]) for key in sorted(self.outcomes)},
        }
        return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> Baseline:
        """Parse and validate a baseline file's text; ``source`` names it in errors."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise BaselineError(f"{source}: not valid JSON ({error}); {_RERECORD_HINT}") from None
        _validate(document, source)
        return cls(
            benchmark=document["benchmark"],
            metric=document["metric"],
            value=float(document["value"]),
            stderr=None if document["stderr"] is None else float(document["stderr"]),
            n=document["n"],
            settings=document["settings"],
            outcomes={key: float(value) for key, value in document["outcomes"].items()},
            provenance=document["provenance"],
        )


def _lock_path(path: Path) -> Path:
    """The lock of one baseline file, outside the user's tree (filelock never deletes it)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "pytest-mtserve-locks"
    folder.mkdir(exist_ok=True)
    return folder / f"{path.name}.{digest}.lock"


class BaselineStore:
    """The baselines of one model: ``<root>/<model_id>/<benchmark>.json``."""

    def __init__(self, root: Path, model_id: str, *, lock_timeout_s: float = 120.0) -> None:
        self.root = Path(root)
        self.model_id = _checked_name(model_id, "model id")
        self.lock_timeout_s = lock_timeout_s

    def path_for(self, benchmark: str) -> Path:
        return self.root / self.model_id / f"{_checked_name(benchmark, 'benchmark name')}.json"

    def load(self, benchmark: str) -> Baseline | None:
        """The stored baseline, or None if there is none; BaselineError if it is unusable."""
        path = self.path_for(benchmark)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise BaselineError(f"{path}: cannot be read ({error}); {_RERECORD_HINT}") from None
        baseline = Baseline.from_json(text, path)
        if baseline.benchmark != benchmark:
            raise BaselineError(
                f"{path}: holds the baseline of {baseline.benchmark!r}, not {benchmark!r} "
                f"(copied or renamed?); {_RERECORD_HINT}"
            )
        return baseline

    def save(self, baseline: Baseline) -> Baseline | None:
        """Write ``baseline`` atomically and return the one it replaced (None if none or unusable).

        Safe for concurrent pytest-xdist workers: read-previous-and-replace runs under a lock
        file, and readers never see a partial file because it is swapped in with os.replace.
        """
        path = self.path_for(baseline.benchmark)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = _lock_path(path)
        try:
            with filelock.FileLock(lock_path, timeout=self.lock_timeout_s):
                previous = self._previous(baseline.benchmark)
                _write_atomically(path, baseline.to_json())
        except filelock.Timeout:
            raise BaselineError(
                f"{path}: another process held {lock_path} for {self.lock_timeout_s:g} s; "
                "wait for the other pytest run to finish (the lock frees itself when it exits)"
            ) from None
        return previous

    def _previous(self, benchmark: str) -> Baseline | None:
        try:
            return self.load(benchmark)
        except BaselineError:  # an unusable file is exactly what an update is meant to fix
            return None


def settings_mismatch(
    baseline_settings: Mapping[str, Any], candidate_settings: Mapping[str, Any]
) -> list[str]:
    """The settings that differ, e.g. ``["limit: baseline 50, current 100"]``; [] if none."""
    baseline_json = _as_json_value(baseline_settings)
    candidate_json = _as_json_value(candidate_settings)
    differences = []
    for key in sorted(baseline_json.keys() | candidate_json.keys()):
        old, new = baseline_json.get(key, _UNSET), candidate_json.get(key, _UNSET)
        if old != new:
            differences.append(f"{key}: baseline {_shown(old)}, current {_shown(new)}")
    return differences


def record_command(
    checkpoint: str | os.PathLike[str], benchmarks: Sequence[str], extra_args: Sequence[str] = ()
) -> str:
    """The shell command that (re)records the baselines of ``benchmarks`` for ``checkpoint``.

    ``extra_args`` are the run's other options that shape the results (``--tp 8``,
    ``--baselines-dir ...``), passed through in order.
    """
    args = [
        "pytest",
        "--checkpoint",
        os.fspath(checkpoint),
        "--benchmarks",
        ",".join(benchmarks),
        *extra_args,
        "--update-baselines",
    ]
    return shlex.join(args)


def default_provenance() -> dict[str, Any]:
    """Recording date (UTC) and versions of the installed evaluation stack."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: _installed_version(name) for name in _PROVENANCE_DISTRIBUTIONS},
    }


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


class _Unset:
    def __repr__(self) -> str:
        return "(not set)"


_UNSET = _Unset()


def _shown(value: Any) -> str:
    return repr(value) if value is _UNSET else json.dumps(value, sort_keys=True)


def _checked_name(name: str, what: str) -> str:
    """``name`` if it is one safe path component (it becomes a file or folder name)."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name.strip(".") == "":
        raise BaselineError(
            f"{what} {name!r} cannot name a baseline file: use 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (e.g. 'llama3-8b'); no '/' or '..'"
        )
    return name


def _validate(document: Any, source: Path) -> None:
    if not isinstance(document, dict):
        raise BaselineError(f"{source}: expected a JSON object; {_RERECORD_HINT}")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BaselineError(
            f"{source}: schema_version {version!r}, this pytest-mtserve reads {SCHEMA_VERSION}; "
            "record it again with --update-baselines"
        )
    for field, types in _FIELD_TYPES.items():
        if field not in document:
            raise BaselineError(f"{source}: field {field!r} is missing; {_RERECORD_HINT}")
        value = document[field]
        if isinstance(value, bool) or not isinstance(value, types):
            raise BaselineError(
                f"{source}: field {field!r} has the wrong type ({value!r:.60}); {_RERECORD_HINT}"
            )
    bad = [key for key, value in document["outcomes"].items() if not _is_number(value)]
    if bad:
        raise BaselineError(
            f"{source}: outcomes of {len(bad)} questions are not numbers (first: {bad[0]!r}); "
            f"{_RERECORD_HINT}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value)


def _compact(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _as_json_value(value: Any) -> Any:
    """``value`` as JSON brings it back (paths -> str, tuples -> lists): to compare and store."""
    return json.loads(json.dumps(value, default=str, allow_nan=False))


def _sorted_deep(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted_deep(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_deep(item) for item in value]
    return value


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that no reader, crash or Ctrl-C sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with 0o666 lets the umask decide the mode, as for any file the user writes.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; Windows has no directory handles to sync)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
