"""The unit of work that travels from the HTTP front end through Triton to every rank.

A request is fully described by token ids and sampling parameters (the front end owns the
tokenizer for prompts); a result carries per-row variable-length data as plain lists (as
arrays on the wire), so nothing in it can be padding from another row of the same batch.
"""

from __future__ import annotations

import base64
import json
from array import array
from dataclasses import dataclass, field
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


@dataclass
class WorkResult:
    """What the engine produced for one WorkItem."""

    output_tokens: list[int]
    finish_reason: FinishReason
    # Set when the item asked for echo and log-probs: one entry per prompt token, the first None.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
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
            data[key] = _packed_top_logprobs(data[key])
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
            data[key] = _unpacked_top_logprobs(data[key])
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


def _packed_top_logprobs(entries: list[TopLogprobs | None] | None) -> dict[str, str] | None:
    if entries is None:
        return None
    counts, token_ids, values = array("i"), array("i"), array("d")
    for entry in entries:
        if entry is None:
            counts.append(-1)
        else:
            counts.append(len(entry))
            token_ids.extend(entry)
            values.extend(entry.values())
    return {"counts": _encoded(counts), "token_ids": _encoded(token_ids), "values": _encoded(values)}


def _unpacked_top_logprobs(packed: dict[str, str] | None) -> list[TopLogprobs | None] | None:
    if packed is None:
        return None
    token_ids, values = iter(_decoded("i", packed["token_ids"])), iter(_decoded("d", packed["values"]))
    return [None if count < 0 else {next(token_ids): next(values) for _ in range(count)} for count in _decoded("i", packed["counts"])]


def _encoded(values: array) -> str:
    return base64.b64encode(values.tobytes()).decode("ascii")


def _decoded(typecode: str, text: str) -> list:
    return array(typecode, base64.b64decode(text)).tolist()
