"""The inference engine: scores prompts and generates continuations for a batch of WorkItems.

Every rank runs :meth:`InferenceEngine.run` on the same batch and performs the same
forward passes (tensor parallelism needs all of them). Rank 0 alone turns logits into
tokens and log-probs; the tokens it picks reach the other ranks through ``share_tokens``
each step, so all ranks agree on what comes next.

A batch of very different prompt lengths runs as several groups of similar lengths
(``batch_split``), so that short rows are not padded to the longest. Log-likelihood rows
(echoed prompt log-probs, at most one new token: how lm-eval scores each answer choice) run
apart from generations, in packs where prompts that share a prefix compute it once
(``shared_prefix``).

Batch invariance: each row's prompt is scored at its true positions (right padding, exact
masks) and each row decodes from its own KV-cache slots at its own positions (all rows in
one forward pass per step, see ``BatchCache``); a packed prompt sees only the shared prefix
and its own tokens, at its own positions; sampling uses the row's own seeded
generator. A request therefore gets the same result alone, inside any batch or any group,
up to floating-point reassociation inside matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from pytest_mtserve.server.batch_split import split_by_length
from pytest_mtserve.server.model_runner import ModelRunner
from pytest_mtserve.server.sampling import choose_token, row_generator, top_logprobs
from pytest_mtserve.server.shared_prefix import Pack, pack_prompts
from pytest_mtserve.server.work import TopLogprobTable, WorkItem, WorkResult

# Rank 0 passes the tokens it chose (None for finished rows); other ranks receive them.
ShareTokens = Callable[[list[int | None] | None], list[int | None]]


class Detokenizer(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


@dataclass
class _Row:
    item: WorkItem
    generator: torch.Generator | None
    result: WorkResult = field(default_factory=lambda: WorkResult(output_tokens=[], finish_reason="length"))
    done: bool = False  # tracked on rank 0; the other ranks follow the shared tokens


def _scores_prompt_only(item: WorkItem) -> bool:
    """A log-likelihood request (how lm-eval scores a choice): the echoed prompt's log-probs
    and at most one new token, so no decode step and no KV cache."""
    return item.echo and item.logprobs is not None and item.max_tokens <= 1


class InferenceEngine:
    def __init__(
        self,
        runner: ModelRunner,
        *,
        is_leader: bool,
        share_tokens: ShareTokens,
        eos_token_ids: set[int],
        detokenizer: Detokenizer | None,
        group_by_length: bool = True,
        share_prefixes: bool = True,
    ):
        self.runner = runner
        self.group_by_length = group_by_length
        self.share_prefixes = share_prefixes
        self.is_leader = is_leader
        self.share_tokens = share_tokens
        self.eos_token_ids = eos_token_ids
        self.detokenizer = detokenizer

    def run(self, items: list[WorkItem]) -> list[WorkResult]:
        """Results in the order of ``items`` (meaningful on rank 0 only)."""
        order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_tokens))
        rows = [_Row(items[i], self._generator(items[i])) for i in order]
        # Work only rank 0 does must not leave the other ranks waiting for its next message:
        # after an error rank 0 still runs every group, telling the others "every row is
        # done" at each step, and raises at the end.
        errors: list[Exception] = []
        generating = [r for r in rows if not _scores_prompt_only(r.item)]
        for group in self._groups([len(r.item.prompt_tokens) for r in generating], [r.item.max_tokens for r in generating]):
            self._run_group(generating[group.start : group.stop], errors)
        self._run_packs([r for r in rows if _scores_prompt_only(r.item)], errors)
        if errors:
            raise errors[0]

        results: list[WorkResult | None] = [None] * len(items)
        for sorted_index, original_index in enumerate(order):
            results[original_index] = rows[sorted_index].result
        return results  # type: ignore[return-value]

    def _groups(self, lengths: list[int], new_tokens: list[int]) -> list[range]:
        """Forward passes over rows sorted by ``lengths`` (``batch_split``)."""
        if not lengths:
            return []
        if not self.group_by_length:
            return [range(len(lengths))]
        return split_by_length(lengths, new_tokens, self.runner.forward_cost)

    def _run_packs(self, rows: list[_Row], errors: list[Exception]) -> None:
        """Score log-likelihood rows (no decode step) in packs that compute a prefix shared
        by several prompts once (``shared_prefix``)."""
        packs: list[tuple[Pack, list[_Row]]] = []
        # One top-k per pack: its members ask for the same number of alternatives.
        for alternatives in sorted({r.item.logprobs for r in rows}):
            asking = [r for r in rows if r.item.logprobs == alternatives]
            for pack in pack_prompts([r.item.prompt_tokens for r in asking], share=self.share_prefixes):
                packs.append((pack, [asking[i] for i in pack.members]))
        packs.sort(key=lambda entry: len(entry[0]))
        for group in self._groups([len(pack) for pack, _ in packs], [1] * len(packs)):
            batch = packs[group.start : group.stop]
            logits = self.runner.prefill_packed([pack for pack, _ in batch])
            if self.is_leader and not errors:
                try:
                    for (pack, members), pack_logits in zip(batch, logits):
                        self._score_pack(pack, members, pack_logits)
                except Exception as error:
                    errors.append(error)

    def _score_pack(self, pack: Pack, members: list[_Row], logits: torch.Tensor) -> None:
        for row in members:
            row.result.output_logprobs, row.result.output_top_logprobs = [], []
        self._score_prompts(members, pack.member_slots, logits[: len(pack)])
        for row, slots in zip(members, pack.member_slots):
            if row.item.max_tokens == 1:
                self._append_token(row, logits[slots[-1]])

    def _score_prompts(self, rows: list[_Row], member_slots: list[list[int]], logits: torch.Tensor) -> None:
        """Each row's prompt log-probs and top alternatives, read at ``member_slots`` of
        ``logits`` ([slots, vocab]; the rows ask for the same number of alternatives)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        index = {"dtype": torch.long, "device": logprobs.device}  # long even when empty (one-token prompts)
        scored = torch.tensor([slot for slots in member_slots for slot in slots[:-1]], **index)
        targets = torch.tensor([token for row in rows for token in row.item.prompt_tokens[1:]], **index)
        values = logprobs[scored, targets].tolist()
        top_values, top_ids = torch.topk(logprobs, rows[0].item.logprobs, dim=-1)
        # The alternatives leave the GPU as two arrays, never a Python object per position.
        top_ids = top_ids[scored].to(torch.int32).cpu().numpy()
        top_values = top_values[scored].double().cpu().numpy()
        start = 0
        for row, slots in zip(rows, member_slots):
            end = start + len(slots) - 1
            row.result.prompt_logprobs = [None] + values[start:end]
            row.result.prompt_top_logprobs = TopLogprobTable.of_positions(
                top_ids[start:end].tobytes(), top_values[start:end].tobytes(), end - start, first_missing=True
            )
            start = end

    def _run_group(self, rows: list[_Row], errors: list[Exception]) -> None:
        """Prefill and decode rows (sorted by prompt length) as one batch."""
        most_new_tokens = max(r.item.max_tokens for r in rows)
        longest_prompt = len(rows[-1].item.prompt_tokens)
        cache = self.runner.new_cache(len(rows), longest_prompt, most_new_tokens) if most_new_tokens > 1 else None

        # Only echoed prompts with log-probs read the logits of every prompt position.
        every_position = any(r.item.echo and r.item.logprobs is not None for r in rows)
        logits = self.runner.prefill([r.item.prompt_tokens for r in rows], cache, last_positions_only=not every_position)
        if self.is_leader and not errors:
            try:
                for row_index, row in enumerate(rows):
                    self._record_prompt(row, logits[row_index])
            except Exception as error:
                errors.append(error)
        next_logits = {
            i: logits[i, len(r.item.prompt_tokens) - 1 if every_position else 0] for i, r in enumerate(rows) if r.item.max_tokens > 0
        }
        while next_logits:
            feed = self._choose(rows, next_logits, errors)
            next_logits = self._decode_step(rows, feed, cache)

    def _generator(self, item: WorkItem) -> torch.Generator | None:
        return row_generator(item.sampling) if self.is_leader else None

    def _record_prompt(self, row: _Row, logits: torch.Tensor) -> None:
        item = row.item
        if item.logprobs is None:
            return
        row.result.output_logprobs = []
        row.result.output_top_logprobs = []
        if item.echo:
            length = len(item.prompt_tokens)
            self._score_prompts([row], [list(range(length))], logits[: length - 1])

    def _choose(self, rows: list[_Row], next_logits: dict[int, torch.Tensor], errors: list[Exception]) -> list[int | None]:
        """Rank 0 picks each waiting row's next token and records it.

        Returns, on every rank, the token to feed back per row: None where the row is done
        (every row, once rank 0 has hit an error in ``errors``).
        """
        feed: list[int | None] | None = None
        if self.is_leader:
            feed = [None] * len(rows)
            if not errors:
                try:
                    for index, logits in next_logits.items():
                        token = self._append_token(rows[index], logits)
                        feed[index] = None if rows[index].done else token
                except Exception as error:
                    errors.append(error)
                    feed = [None] * len(rows)
        return self.share_tokens(feed)

    def _append_token(self, row: _Row, logits: torch.Tensor) -> int:
        item, result = row.item, row.result
        token = choose_token(logits, item.sampling, row.generator)
        result.output_tokens.append(token)
        if item.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            result.output_logprobs.append(float(logprobs[token]))
            result.output_top_logprobs.extend(top_logprobs(logprobs[None], item.logprobs))
        self._update_finish(row, token)
        return token

    def _update_finish(self, row: _Row, token: int) -> None:
        item, result = row.item, row.result
        if token in self.eos_token_ids and not item.ignore_eos:
            result.finish_reason, row.done = "stop", True
        elif item.stop and self.detokenizer is not None:
            text = self.detokenizer.decode(result.output_tokens)
            hit = next((s for s in item.stop if s in text), None)
            if hit is not None:
                result.finish_reason, result.stop_string, row.done = "stop", hit, True
        if len(result.output_tokens) >= item.max_tokens:
            row.done = True

    def _decode_step(self, rows: list[_Row], feed: list[int | None], cache) -> dict[int, torch.Tensor]:
        """Feed each continuing row its new token; returns next-token logits by row index.

        One forward pass over the span of rows from the first to the last continuing one:
        finished rows inside it get a stand-in token and their logits are dropped.
        """
        active = [i for i, token in enumerate(feed) if token is not None]
        if not active:
            return {}
        first, last = active[0], active[-1]
        tokens = [feed[i] if feed[i] is not None else 0 for i in range(first, last + 1)]
        logits = self.runner.decode(cache, tokens, first)
        return {i: logits[i - first] for i in active}
