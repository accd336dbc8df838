"""Keeps every rank stepping together: rank 0 leads, the others follow its broadcasts.

Rank 0 receives batches from Triton and broadcasts each one (the complete work
description: token ids and every sampling parameter) before computing it; the other ranks
wait in :func:`follow` for the next message. Shutdown is a message too. All messages go
over the gloo control group, whose timeout is long, so idle ranks never time out.
"""

from __future__ import annotations

import threading
from typing import Any

import torch.distributed as dist

from pytest_mtserve.server.engine import InferenceEngine
from pytest_mtserve.server.work import WorkItem, WorkResult

_RUN, _STOP = "run", "stop"


class ControlChannel:
    """Broadcast of small Python objects from rank 0 over the control group."""

    def __init__(self, group: dist.ProcessGroup, world_size: int):
        self.group = group
        self.single = world_size == 1

    def broadcast(self, message: Any = None) -> Any:
        if self.single:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class Leader:
    """Rank 0: runs batches on all ranks, one at a time."""

    def __init__(self, engine: InferenceEngine, channel: ControlChannel):
        self.engine = engine
        self.channel = channel
        self._lock = threading.Lock()  # Triton may call from several threads
        self._stopped = False

    def run_batch(self, items: list[WorkItem]) -> list[WorkResult]:
        with self._lock:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            self.channel.broadcast((_RUN, items))
            return self.engine.run(items)

    def stop_followers(self) -> None:
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self.channel.broadcast((_STOP, None))


def follow(engine: InferenceEngine, channel: ControlChannel) -> None:
    """Ranks > 0: run every batch rank 0 announces, until it announces shutdown."""
    while True:
        kind, items = channel.broadcast()
        if kind == _STOP:
            return
        engine.run(items)
