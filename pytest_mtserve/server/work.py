"""The unit of work that travels from the HTTP front end through Triton to every rank.

A request is fully described by token ids and sampling parameters (the front end owns the
tokenizer for prompts); a result carries per-row variable-length data as plain lists, so
nothing in it can be padding from another row of the same batch.
"""

from __future__ import annotations

import json
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
        return json.dumps(_with_str_keys(dict(vars(self))), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkResult:
        data = json.loads(text)
        for key in ("prompt_top_logprobs", "output_top_logprobs"):
            if data.get(key) is not None:
                data[key] = [_int_keys(entry) for entry in data[key]]
        return cls(**data)


def _with_str_keys(data: dict[str, Any]) -> dict[str, Any]:
    # JSON object keys are strings; keep token ids readable on the wire.
    for key in ("prompt_top_logprobs", "output_top_logprobs"):
        if data.get(key) is not None:
            data[key] = [None if e is None else {str(k): v for k, v in e.items()} for e in data[key]]
    return data


def _int_keys(entry: dict[str, float] | None) -> TopLogprobs | None:
    return None if entry is None else {int(k): v for k, v in entry.items()}
