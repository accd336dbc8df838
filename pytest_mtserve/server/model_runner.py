"""Forward passes of the GPTModel for the engine: a padded prefill and KV-cached decode steps.

Rows are right-padded, so every real token sits at its true position whatever the batch;
the attention mask hides padding and the future, and masked keys contribute exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from pytest_mtserve.server.architecture import ModelArchitecture
from pytest_mtserve.server.batch_split import ForwardCost
from pytest_mtserve.server.shared_prefix import PREFIX_SEGMENT, Pack, pack_prompts

# Below this many FLOPs of matrix work a forward pass waits on its kernel launches, and a CUDA
# graph pays: at 8B on an H200, packed prefills of ~1,300 tokens ran 1.65x faster as graphs,
# of ~2,300 tokens 0.97x (benchmarks/cuda_graphs.py). Smaller models graph larger passes.
_LAUNCH_BOUND_FLOPS = 2.4e13
# Graphs of wider passes would take more start-up and memory than they save.
_MOST_GRAPHED_TOKENS = 8192


@dataclass
class BatchCache:
    """Megatron's static KV cache of one batch, and where each row's tokens sit in it.

    Slots [0, prompt length) of a row hold its prompt (right-padded up to ``width``); its
    k-th decoded token goes to slot ``width + k``. Megatron's static cache has one write
    offset for the whole batch, so rows of different lengths decode in lockstep at one
    shared slot: one forward pass per step for the batch, not one per distinct length. The
    padding slots in between are masked and the rotary embedding follows each row's true
    positions, so a row computes what it would alone.
    """

    context: object  # megatron.core.inference.contexts.StaticInferenceContext
    prompt_lengths: torch.Tensor | None = None  # [batch], set by the prefill
    width: int = 0  # longest prompt: the first decode slot
    steps: int = 0  # decode steps taken


class ModelRunner:
    def __init__(self, model, arch: ModelArchitecture, device: torch.device, *, cuda_graphs: bool = False):
        """``cuda_graphs``: packed prefills run their decoder as CUDA graphs (see ``cuda_graphs``)."""
        self.model = model
        self.vocab_size = arch.vocab_size
        self.device = device
        self.forward_cost = ForwardCost.for_model(arch, device.type)
        self.graphs = None
        if cuda_graphs:
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        """DecoderGraphs for the passes that wait on their launches, every shape captured now."""
        from pytest_mtserve.server.cuda_graphs import DecoderGraphs

        matrix_flops_per_token = 2 * sum(p.numel() for p in self.model.decoder.parameters())
        max_tokens = min(_MOST_GRAPHED_TOKENS, int(_LAUNCH_BOUND_FLOPS // matrix_flops_per_token))
        self.graphs = DecoderGraphs(self.model.decoder, max_tokens=max_tokens)
        for rows, width in self.graphs.shapes():
            self.prefill_packed(pack_prompts([[0] * width] * rows, share=False))

    def new_cache(self, batch_size: int, longest_prompt: int, max_new_tokens: int) -> BatchCache:
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(batch_size, longest_prompt + max_new_tokens)
        context.materialize_only_last_token_logits = False  # echo needs every position
        return BatchCache(context)

    @torch.inference_mode()
    def prefill(
        self, prompts: list[list[int]], cache: BatchCache | None = None, *, last_positions_only: bool = False
    ) -> torch.Tensor:
        """Logits [batch, longest prompt, vocab] for every prompt position, or with
        ``last_positions_only`` [batch, 1, vocab] at each prompt's last token."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        tokens = self._right_padded(prompts, width)
        positions = torch.arange(width, device=self.device)
        mask = self._causal_mask(lengths, width)[:, None]  # [row, 1, query, key]
        with self._output_layer_only_at(lengths - 1) if last_positions_only else nullcontext():
            logits = self.model(
                tokens,
                positions.expand(len(prompts), -1),
                mask,
                inference_context=None if cache is None else cache.context,
                runtime_gather_output=True,
            )
        if cache is not None:
            cache.context.sequence_len_offset = width
            cache.prompt_lengths, cache.width = lengths, width
        return logits[..., : self.vocab_size]

    @torch.inference_mode()
    def prefill_packed(self, packs: Sequence[Pack]) -> torch.Tensor:
        """Logits [packs, longest pack, vocab] at every slot of each pack (``shared_prefix``).

        A member's own tokens see the shared prefix and their own earlier tokens, never
        another member's, and run at their positions in their own prompt."""
        real_rows, real_width = len(packs), max(len(p) for p in packs)
        rows, width = self._padded_shape(real_rows, real_width)
        # Rows added to reach a CUDA graph's shape hold one visible token, so that no row of
        # the mask is all hidden.
        lengths = torch.tensor([len(p) for p in packs] + [1] * (rows - real_rows), device=self.device)
        tokens = self._right_padded([p.tokens for p in packs], width, rows)
        positions = self._right_padded([p.positions for p in packs], width, rows)
        # Padding gets segment 0 == PREFIX_SEGMENT: a padding query sees the prefix, so no row of
        # the mask is all hidden (SDPA would give NaN there); padding keys are hidden anyway.
        segments = self._right_padded([p.segments for p in packs], width, rows)
        key_segment, query_segment = segments[:, None, :], segments[:, :, None]
        other_member = (key_segment != PREFIX_SEGMENT) & (key_segment != query_segment)  # [row, query, key]
        mask = (self._causal_mask(lengths, width) | other_member)[:, None]
        hidden = self.model.embedding(input_ids=tokens, position_ids=positions)  # [slot, row, hidden]
        rotary = self._rotary_of_rows(positions)
        if self.graphs is None:
            hidden = self.model.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)
        else:
            hidden = self.graphs(hidden, mask, rotary)
        return self._output_logits(hidden[:real_width, :real_rows])

    def _padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        return (rows, width) if self.graphs is None else self.graphs.padded_shape(rows, width)

    def _rotary_of_rows(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Rotary embeddings [slots, rows, 1, dim] at each row's ``positions`` ([rows, slots])."""
        rotary = getattr(self.model, "rotary_pos_emb", None)
        if rotary is None:  # learned absolute positions come from the position ids
            return None
        return _by_row(rotary(positions.shape[1]), positions.T)

    def _output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, slots, vocab] of the decoder's output [slots, rows, hidden], as
        GPTModel's last step computes them."""
        model = self.model
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits.transpose(0, 1)[..., : self.vocab_size]

    def _right_padded(self, rows: Sequence[Sequence[int]], width: int, count: int | None = None) -> torch.Tensor:
        """[count (default: rows), width] long tensor, each row's values first, then zeros."""
        # Filled on the host and copied once: a copy per row costs a GPU round trip each.
        padded = torch.zeros(len(rows) if count is None else count, width, dtype=torch.long)
        for index, values in enumerate(rows):
            padded[index, : len(values)] = torch.tensor(values)
        return padded.to(self.device)

    def _causal_mask(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """[row, query, key], True where a key is hidden: the future, and each row's padding."""
        slots = torch.arange(width, device=self.device)
        future = slots[None, :] > slots[:, None]  # [query, key]
        padding = slots[None, :] >= lengths[:, None]  # [row, key]
        return future[None] | padding[:, None, :]

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
    def decode(self, cache: BatchCache, tokens: list[int], first_row: int) -> torch.Tensor:
        """Next-token logits [len(tokens), vocab] for rows first_row.. of the batch, each
        token following its own row's prompt and the tokens decoded before it."""
        rows, slot = len(tokens), cache.width + cache.steps
        context = cache.context
        context.batch_size_offset = first_row
        context.sequence_len_offset = slot
        context.enable_decode_mode()
        lengths = cache.prompt_lengths[first_row : first_row + rows]
        slots = torch.arange(slot + 1, device=self.device)
        padding = (slots[None, :] >= lengths[:, None]) & (slots[None, :] < cache.width)  # [row, key]
        step = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        positions = (lengths + cache.steps)[:, None]
        with self._rotary_at(lambda slots: self._decode_positions(slots, lengths, cache.width)):
            logits = self.model(step, positions, padding[:, None, None, :], inference_context=context, runtime_gather_output=True)
        cache.steps += 1
        return logits[:, -1, : self.vocab_size]

    @staticmethod
    def _decode_positions(slots: int, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """Position of each cache slot per row [slots, rows]: slot j is position j in the prompt
        part and length + (j - width) in the decoded part."""
        slot = torch.arange(slots, device=lengths.device)[:, None]
        return torch.where(slot < width, slot, lengths[None, :] + slot - width)

    @contextmanager
    def _rotary_at(self, positions_for: Callable[[int], torch.Tensor]) -> Iterator[None]:
        """Rotary embeddings at each row's own position per slot; ``positions_for(slots)``
        gives them as [slots, rows]. Megatron rotates slot j by position j for every row (its
        static cache keeps keys unrotated and rotates them each step by slot), which holds
        neither for rows decoding in lockstep nor for packed prompts."""
        rotary = getattr(self.model, "rotary_pos_emb", None)
        if rotary is None:  # learned absolute positions come from the position ids
            yield
            return

        def per_row(module, args, by_slot: torch.Tensor) -> torch.Tensor:
            return _by_row(by_slot, positions_for(by_slot.shape[0]))

        handle = rotary.register_forward_hook(per_row)
        try:
            yield
        finally:
            handle.remove()


def _by_row(by_slot: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Megatron's rotary embedding [slots, 1, 1, dim] at ``positions`` [slots, rows]: [slots, rows, 1, dim]."""
    return by_slot[:, 0, 0][positions][:, :, None]
