"""The unit of work that travels from the HTTP front end through Triton to every rank.

A request is fully described by token ids and sampling parameters (the front end owns the
tokenizer for prompts); a result carries per-row variable-length data as plain lists (as
arrays on the wire), so nothing in it can be padding from another row of the same batch.
"""

from __future__ import annotations

import base64
import json
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k filtering
    seed: int | None = None  # same seed + same prompt -> same tokens, whatever the batch

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class WorkItem:
    """One completion to compute: a prompt of token ids and what to produce after it."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Number of top alternatives to return per position; None = return no log-probs.
    logprobs: int | None = None
    # Return the prompt's own log-probs (first prompt token has none).
    echo: bool = False
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def to_json(self) -> str:
        # Shallow field copies: dataclasses.asdict deep-copies every token id, a real cost per request.
        return json.dumps({**vars(self), "sampling": vars(self.sampling)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkItem:
        data = json.loads(text)
        data["sampling"] = SamplingParams(**data["sampling"])
        return cls(**data)


TopLogprobs = dict[int, float]  # token id -> log-prob, highest first


class TopLogprobTable(Sequence["TopLogprobs | None"]):
    """Top alternatives per position as three flat arrays, the form they travel in: per
    position the number of alternatives (-1 where there are none to give: a prompt's first
    token), then every alternative's token id and log-prob in order.

    Rank 0 fills a prompt's table straight from tensors: with a dict per prompt position,
    then packed into arrays again for the wire, a batch of 32 MMLU-shaped results took 8.6 ms
    of rank 0's Python against 1.9 ms (benchmarks/result_encoding.py, 2-core machine).
    """

    def __init__(self, counts: array, token_ids: array, values: array) -> None:
        self.counts, self.token_ids, self.values = counts, token_ids, values
        self._starts: list[int] | None = None

    @classmethod
    def of(cls, entries: Iterable[TopLogprobs | None]) -> TopLogprobTable:
        if isinstance(entries, TopLogprobTable):
            return entries
        table = cls(array("i"), array("i"), array("d"))
        for entry in entries:
            if entry is None:
                table.counts.append(-1)
            else:
                table.counts.append(len(entry))
                table.token_ids.extend(entry)
                table.values.extend(entry.values())
        return table

    @classmethod
    def of_positions(cls, token_ids: bytes, values: bytes, positions: int, *, first_missing: bool) -> TopLogprobTable:
        """The same number of alternatives at each of ``positions``, from their native int32
        ids and float64 log-probs position by position; with ``first_missing`` a position
        without any comes first."""
        ids = array("i", token_ids)
        counts = array("i", [len(ids) // positions if positions else 0]) * positions
        return cls(array("i", [-1]) + counts if first_missing else counts, ids, array("d", values))

    def packed(self) -> dict[str, str]:
        return {key: _encoded(getattr(self, key)) for _, key in _TABLE_ARRAYS}

    @classmethod
    def unpacked(cls, packed: dict[str, str]) -> TopLogprobTable:
        return cls(*(array(typecode, base64.b64decode(packed[key])) for typecode, key in _TABLE_ARRAYS))

    def __len__(self) -> int:
        return len(self.counts)

    def __iter__(self) -> Iterator[TopLogprobs | None]:
        token_ids, values = iter(self.token_ids.tolist()), iter(self.values.tolist())
        for count in self.counts:
            yield None if count < 0 else {next(token_ids): next(values) for _ in range(count)}

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return list(self)[index]
        if self._starts is None:
            self._starts = list(accumulate((max(count, 0) for count in self.counts), initial=0))
        count, start = self.counts[index], self._starts[index % len(self)]
        return None if count < 0 else dict(zip(self.token_ids[start : start + count], self.values[start : start + count]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


_TABLE_ARRAYS = (("i", "counts"), ("i", "token_ids"), ("d", "values"))


@dataclass
class WorkResult:
    """What the engine produced for one WorkItem."""

    output_tokens: list[int]
    finish_reason: FinishReason
    # Set when the item asked for echo and log-probs: one entry per prompt token, the first None;
    # the alternatives are a TopLogprobTable as the engine makes them, a list once across the wire.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: Sequence[TopLogprobs | None] | None = None
    # Set when the item asked for log-probs: one entry per output token.
    output_logprobs: list[float] | None = None
    output_top_logprobs: list[TopLogprobs] | None = None
    # The stop string that ended generation; the front end cuts the text before it.
    stop_string: str | None = None

    def to_json(self) -> str:
        data = dict(vars(self))
        for key in _LOGPROB_LISTS:
            data[key] = _packed_logprobs(data[key])
        for key in _TOP_LOGPROB_LISTS:
            data[key] = None if data[key] is None else TopLogprobTable.of(data[key]).packed()
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkResult:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkResult:
        """From ``json.loads(to_json())``; ``data`` is consumed."""
        for key in _LOGPROB_LISTS:
            data[key] = _unpacked_logprobs(data[key])
        for key in _TOP_LOGPROB_LISTS:
            data[key] = None if data[key] is None else list(TopLogprobTable.unpacked(data[key]))
        return cls(**data)


# Log-probs travel as base64 of float64 and int32 arrays inside the JSON: as JSON numbers, with
# a dict per prompt token, encoding took ~1 ms per request of ~275 tokens on rank 0, beside the
# engine, and decoding ~0.75 ms in the front end; as arrays, a quarter of that. float64 keeps
# every value exactly. Native byte order: rank 0 and its front ends share one host.
_LOGPROB_LISTS = ("prompt_logprobs", "output_logprobs")
_TOP_LOGPROB_LISTS = ("prompt_top_logprobs", "output_top_logprobs")


def _packed_logprobs(values: list[float | None] | None) -> dict[str, Any] | None:
    if values is None:
        return None
    missing = [index for index, value in enumerate(values) if value is None]
    if missing:
        values = [0.0 if value is None else value for value in values]
    return {"values": _encoded(array("d", values)), "missing": missing}


def _unpacked_logprobs(packed: dict[str, Any] | None) -> list[float | None] | None:
    if packed is None:
        return None
    values: list[float | None] = _decoded("d", packed["values"])
    for index in packed["missing"]:
        values[index] = None
    return values


def _encoded(values: array) -> str:
    return base64.b64encode(values.tobytes()).decode("ascii")


def _decoded(typecode: str, text: str) -> list:
    return array(typecode, base64.b64decode(text)).tolist()
