"""Forward passes of the GPTModel for the engine: a padded prefill and KV-cached decode steps.

Rows are right-padded, so every real token sits at its true position whatever the batch;
the attention mask hides padding and the future, and masked keys contribute exactly zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from pytest_mtserve.server.architecture import ModelArchitecture


class ModelRunner:
    def __init__(self, model, arch: ModelArchitecture, device: torch.device):
        self.model = model
        self.vocab_size = arch.vocab_size
        self.device = device

    def new_cache(self, batch_size: int, max_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        cache = StaticInferenceContext(batch_size, max_length)
        cache.materialize_only_last_token_logits = False  # echo needs every position
        return cache

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], cache=None, *, last_positions_only: bool = False) -> torch.Tensor:
        """Logits [batch, longest prompt, vocab] for every prompt position, or with
        ``last_positions_only`` [batch, 1, vocab] at each prompt's last token."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
        positions = torch.arange(width, device=self.device)
        future = positions[None, :] > positions[:, None]  # [query, key]
        padding = positions[None, :] >= lengths[:, None]  # [row, key]
        mask = (future[None, :, :] | padding[:, None, :])[:, None]  # [row, 1, query, key]
        with self._output_layer_only_at(lengths - 1) if last_positions_only else nullcontext():
            logits = self.model(
                tokens, positions.expand(len(prompts), -1), mask, inference_context=cache, runtime_gather_output=True
            )
        if cache is not None:
            cache.sequence_len_offset = width
        return logits[..., : self.vocab_size]

    @contextmanager
    def _output_layer_only_at(self, positions: torch.Tensor) -> Iterator[None]:
        """Feed the output layer one position per row: a generation needs no other logits,
        and over a long prompt the vocabulary projection of every position (and its
        [batch, length, vocab] result) is a large share of the prefill's cost."""
        rows = torch.arange(len(positions), device=positions.device)

        def select(module, args, kwargs):
            hidden = args[0]  # [sequence, batch, hidden]
            return (hidden[positions, rows][None], *args[1:]), kwargs

        handle = self.model.output_layer.register_forward_pre_hook(select, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @torch.inference_mode()
    def decode(self, cache, tokens: list[int], first_row: int, position: int) -> torch.Tensor:
        """Next-token logits [len(tokens), vocab] for rows first_row.. that all stand at ``position``.

        Rows of one call must have the same length so far: they share a cache offset.
        """
        cache.batch_size_offset = first_row
        cache.sequence_len_offset = position
        cache.enable_decode_mode()
        rows = len(tokens)
        step = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        positions = torch.full((rows, 1), position, dtype=torch.long, device=self.device)
        mask = torch.zeros(rows, 1, 1, position + 1, dtype=torch.bool, device=self.device)
        logits = self.model(step, positions, mask, inference_context=cache, runtime_gather_output=True)
        return logits[:, -1, : self.vocab_size]
