"""``--log-batches``: one line per batch that reaches the engine, to see how full Triton's
batches are and where each one's time goes.

    mtserve batch: requests 32 engine_ms 120.2 wait_ms 97.5 callable_ms 226.3 idle_ms 1.8 left 81234.567

``engine_ms`` is the engine's run (all ranks), ``wait_ms`` how long the batch waited for the
engine to finish another Triton instance's batch, ``callable_ms`` the whole Triton callable
(reading the WorkItems, the wait, the engine, writing the WorkResults), ``idle_ms`` how long
the engine sat idle before this batch, since its previous one, and ``left`` the
``time.monotonic()`` second the batch left, which other processes on the host read from the
same clock.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

LINE_PREFIX = "mtserve batch:"
_LINE = re.compile(
    re.escape(LINE_PREFIX)
    + r" requests (\d+) engine_ms ([\d.]+) wait_ms ([\d.]+) callable_ms ([\d.]+) idle_ms ([\d.]+|-) left ([\d.]+)$"
)


@dataclass(frozen=True)
class BatchTimes:
    requests: int
    engine_ms: float
    wait_ms: float
    callable_ms: float
    idle_ms: float | None  # None for the first batch
    left: float


@dataclass(frozen=True)
class EngineTurn:
    """When one batch ran on the engine, and how long the engine sat idle before it."""

    started: float
    finished: float
    idle_s: float | None  # None for the first batch


class BatchLog:
    """Writes a line per batch; Triton's instances call :meth:`record` from their own threads."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def record(self, requests: int, entered: float, turn: EngineTurn) -> None:
        """The batch of ``requests`` that entered the callable at ``entered`` and had its
        ``turn`` on the engine leaves the callable now."""
        idle = "-" if turn.idle_s is None else f"{1e3 * turn.idle_s:.1f}"
        with self._lock:  # the lines in the order their batches left
            left = time.monotonic()
            line = (f"{LINE_PREFIX} requests {requests} engine_ms {1e3 * (turn.finished - turn.started):.1f} "
                    f"wait_ms {1e3 * (turn.started - entered):.1f} callable_ms {1e3 * (left - entered):.1f} "
                    f"idle_ms {idle} left {left:.3f}")  # fmt: skip
            print(line, file=self._stream or sys.stderr, flush=True)


def parse_batch_lines(lines: Iterable[str]) -> list[BatchTimes]:
    """The batches in a server log, other lines skipped."""
    batches = []
    for line in lines:
        if (match := _LINE.search(line.rstrip())) is not None:
            requests, engine_ms, wait_ms, callable_ms, idle_ms, left = match.groups()
            batches.append(BatchTimes(int(requests), float(engine_ms), float(wait_ms), float(callable_ms),
                                      None if idle_ms == "-" else float(idle_ms), float(left)))  # fmt: skip
    return batches
