"""OpenAI API request and response bodies, field by field (after vLLM's protocol.py).

Only shapes and per-field ranges live here; rules that need the model (prompt length,
vocabulary, model name) and the list of accepted-but-unsupported features are checked in
``openai_api``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]
TokenIds = list[int]


class OpenAIRequest(BaseModel):
    # Unknown fields are kept (and logged by the endpoint) rather than refused: harnesses
    # pass extra generation settings through, as vLLM also tolerates.
    model_config = ConfigDict(extra="allow")


class OpenAIResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(OpenAIRequest):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM extension; -1 or 0 disable it
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension


class CompletionRequest(SamplingFields):
    # Order matters to pydantic's union matching only for ambiguous input; an empty
    # list is refused later with a clear message.
    prompt: str | list[str] | TokenIds | list[TokenIds]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = None


class ChatContentPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    role: str
    content: str | list[ChatContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class UsageInfo(OpenAIResponse):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogProbs(OpenAIResponse):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionResponseChoice(OpenAIResponse):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason


def _created() -> int:
    return int(time.time())


def _random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class CompletionResponse(OpenAIResponse):
    id: str = Field(default_factory=lambda: _random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class ChatResponseMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionResponseChoice(OpenAIResponse):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(OpenAIResponse):
    id: str = Field(default_factory=lambda: _random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_created)
    owned_by: str = "mtserve"
    max_model_len: int


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIResponse):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIResponse):
    error: ErrorInfo
