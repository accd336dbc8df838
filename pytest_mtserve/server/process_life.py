"""How the server's processes end: on SIGTERM or SIGINT, and with the process that started them."""

from __future__ import annotations

import ctypes
import signal
import threading

_PR_SET_PDEATHSIG = 1


def stop_requested_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets, for an orderly stop (call from the main thread)."""
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    return stop_requested


def die_with_parent() -> None:
    """The kernel kills this process when its parent dies (called in the child)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
