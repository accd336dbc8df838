"""``--log-batches``: one line per batch that reaches the engine, to see how full Triton's
batches are and where each one's time goes.

    mtserve batch: requests 22 engine_ms 109.7 callable_ms 127.1 idle_ms 23.9 left 81234.567

``engine_ms`` is the engine's run (all ranks), ``callable_ms`` the Triton callable around it
(reading the WorkItems, the engine, writing the WorkResults), ``idle_ms`` the time since the
previous batch left the callable (Triton's round trip and the requests still arriving), and
``left`` the ``time.monotonic()`` second the batch left, which other processes on the host
read from the same clock.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO, TypeVar

LINE_PREFIX = "mtserve batch:"
_LINE = re.compile(
    re.escape(LINE_PREFIX)
    + r" requests (\d+) engine_ms ([\d.]+) callable_ms ([\d.]+) idle_ms ([\d.]+|-) left ([\d.]+)$"
)

Items = TypeVar("Items")
Results = TypeVar("Results")


@dataclass(frozen=True)
class BatchTimes:
    requests: int
    engine_ms: float
    callable_ms: float
    idle_ms: float | None  # None for the first batch
    left: float


class BatchLog:
    """Writes a line per batch; Triton calls the callable one batch at a time."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._previous_left: float | None = None
        self._engine_s = 0.0

    def timing_engine(self, run_batch: Callable[[Items], Results]) -> Callable[[Items], Results]:
        """``run_batch``, timed: the next :meth:`record` reports how long its last call took."""

        def run(items: Items) -> Results:
            started = time.monotonic()
            try:
                return run_batch(items)
            finally:
                self._engine_s = time.monotonic() - started

        return run

    def record(self, requests: int, entered: float) -> None:
        """The batch of ``requests`` that entered the callable at ``entered`` leaves it now."""
        left = time.monotonic()
        idle = "-" if self._previous_left is None else f"{1e3 * (entered - self._previous_left):.1f}"
        self._previous_left = left
        line = (f"{LINE_PREFIX} requests {requests} engine_ms {1e3 * self._engine_s:.1f} "
                f"callable_ms {1e3 * (left - entered):.1f} idle_ms {idle} left {left:.3f}")  # fmt: skip
        print(line, file=self._stream or sys.stderr, flush=True)


def parse_batch_lines(lines: Iterable[str]) -> list[BatchTimes]:
    """The batches in a server log, other lines skipped."""
    batches = []
    for line in lines:
        if (match := _LINE.search(line.rstrip())) is not None:
            requests, engine_ms, callable_ms, idle_ms, left = match.groups()
            batches.append(BatchTimes(int(requests), float(engine_ms), float(callable_ms),
                                      None if idle_ms == "-" else float(idle_ms), float(left)))  # fmt: skip
    return batches
