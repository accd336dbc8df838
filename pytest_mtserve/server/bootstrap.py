"""Builds one server rank: process groups, model, weights, tokenizer and engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pytest_mtserve.server.distributed import ParallelGroups, init_parallel, resolve_device, shutdown_parallel
from pytest_mtserve.server.engine import InferenceEngine
from pytest_mtserve.server.options import ServerOptions, uses_cuda_graphs
from pytest_mtserve.server.rank_coordinator import ControlChannel, Leader, follow
from pytest_mtserve.server.tokenizer import load_tokenizer


@dataclass
class Rank:
    groups: ParallelGroups
    engine: InferenceEngine
    channel: ControlChannel
    tokenizer_dir: Path  # for the front end's process
    leader: Leader | None  # rank 0 only

    @property
    def is_leader(self) -> bool:
        return self.leader is not None

    def follow(self) -> None:
        follow(self.engine, self.channel)

    def close(self) -> None:
        shutdown_parallel()


def build_rank(options: ServerOptions) -> Rank:
    from pytest_mtserve.server.checkpoint import locate_checkpoint
    from pytest_mtserve.server.model import load_checkpoint_model
    from pytest_mtserve.server.model_runner import ModelRunner

    info = locate_checkpoint(options.checkpoint)
    groups = init_parallel(options.tp, options.pp, resolve_device(options.device))
    model = load_checkpoint_model(
        info,
        device=groups.device,
        dtype=options.dtype,
        max_sequence_length=options.inference_max_seq_length,
        attention_backend=options.attention_backend,
    )
    tokenizer = load_tokenizer(info.tokenizer_dir) if groups.rank == 0 else None
    channel = ControlChannel(groups.control_group, groups.world_size)
    engine = InferenceEngine(
        ModelRunner(
            model, info.architecture, groups.device,
            cuda_graphs=uses_cuda_graphs(options.cuda_graphs, groups.device.type, options.tp),
        ),  # fmt: skip
        is_leader=groups.rank == 0,
        share_tokens=channel.broadcast,
        eos_token_ids={tokenizer.eos_token_id} if tokenizer is not None and tokenizer.eos_token_id is not None else set(),
        detokenizer=tokenizer,
    )
    leader = Leader(engine, channel) if groups.rank == 0 else None
    return Rank(groups, engine, channel, info.tokenizer_dir, leader)
