"""The OpenAI-compatible HTTP front end: validation, tokenization, responses.

Everything a request can get wrong is refused here with a 400, so the engine only ever sees
valid ``WorkItem``s. String prompts are tokenized exactly as lm-eval's ``local-completions``
does (``add_special_tokens=False``), because lm-eval computes the context length with its
own tokenizer and sums ``token_logprobs[ctxlen:-1]``: any difference silently shifts scores.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatMessage,
    ChatResponseMessage,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    UsageInfo,
)
from .ports import bind_listening_socket
from .tokenizer import ServerTokenizer
from .triton_binding import TritonInferenceError, TritonUnavailableError
from .work import SamplingParams, WorkItem, WorkResult

LOGGER = logging.getLogger(__name__)

# Harnesses send temperature 1e-7 to mean greedy; the engine's greedy test is temperature <= 0.
GREEDY_TEMPERATURE_BELOW = 1e-5
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
WARMUP_PROMPT = "hello, my name is"

# Accepted for compatibility, refused unless left at the value that means "off".
UNSUPPORTED_SAMPLING_FIELDS: dict[str, Any] = {
    "n": 1,
    "stream": False,
    "stream_options": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": None,
}
UNSUPPORTED_COMPLETION_FIELDS: dict[str, Any] = {"suffix": None, "best_of": None}
UNSUPPORTED_CHAT_FIELDS: dict[str, Any] = {
    "logprobs": False,
    "top_logprobs": None,
    "response_format": None,
    "tools": None,
    "tool_choice": None,
}


class InferenceClient(Protocol):
    async def infer(self, items: list[WorkItem]) -> list[WorkResult]: ...

    async def ready(self) -> bool: ...


class OpenAIError(Exception):
    """A request the server refuses; becomes an OpenAI error body."""

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    @property
    def error_type(self) -> str:
        name = HTTPStatus(self.status).phrase.title().replace(" ", "")  # "NotFound", like vLLM
        return name if name.endswith("Error") else name + "Error"


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str  # what echo returns: the prompt as sent, or the decoded token ids


class _TokenTexts:
    """Token ids -> the strings reported in log-probs, and texts for whole sequences."""

    def __init__(self, tokenizer: ServerTokenizer) -> None:
        self._tokenizer = tokenizer
        # A token's text alone never depends on its neighbours, so caching it is exact; an
        # echoed prompt needs one piece per token plus one per top alternative.
        self._pieces: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def pieces(self, token_ids: Sequence[int]) -> list[str]:
        known = self.known(token_ids)
        return [known[token_id] for token_id in token_ids]

    def known(self, token_ids: Iterable[int]) -> dict[int, str]:
        """Token id -> text, holding at least every id of ``token_ids``."""
        missing = {token_id for token_id in token_ids if token_id not in self._pieces}
        if missing:
            missing_ids = list(missing)
            self._pieces.update(zip(missing_ids, self._tokenizer.decode_each(missing_ids)))
        return self._pieces


def create_app(
    *, model_name: str, tokenizer: ServerTokenizer, max_seq_length: int, client: InferenceClient
) -> FastAPI:
    """Build the FastAPI app. It closes ``client`` (if it has ``aclose``) on shutdown."""
    texts = _TokenTexts(tokenizer)
    vocab_size = tokenizer.vocab_size

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        aclose = getattr(client, "aclose", None)
        if aclose is not None:
            await aclose()

    app = FastAPI(title="mtserve", lifespan=lifespan)
    app.router.redirect_slashes = False  # both spellings are routed; a redirect would lose the POST body
    app.state.warmed_up = False
    _install_error_handlers(app)

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != model_name:
            raise OpenAIError(
                f"The model `{requested}` does not exist; this server serves `{model_name}`",
                param="model",
                code="model_not_found",
            )

    def work_item(request: SamplingFields, prompt: Prompt, max_tokens: int, **extra: Any) -> WorkItem:
        _check_prompt(prompt.token_ids, max_tokens, max_seq_length=max_seq_length)
        return WorkItem(
            prompt_tokens=prompt.token_ids,
            max_tokens=max_tokens,
            sampling=_sampling_params(request),
            stop=_stop_strings(request.stop),
            ignore_eos=request.ignore_eos,
            **extra,
        )

    async def infer(items: list[WorkItem]) -> list[WorkResult]:
        try:
            return await client.infer(items)
        except TritonUnavailableError as error:
            raise OpenAIError(f"the inference server is not ready: {error}", status=503) from None
        except TritonInferenceError as error:
            raise OpenAIError(str(error), status=500) from None

    async def completions(request: CompletionRequest) -> CompletionResponse:
        _refuse_unsupported(request, {**UNSUPPORTED_SAMPLING_FIELDS, **UNSUPPORTED_COMPLETION_FIELDS})
        check_model(request.model)
        prompts = _completion_prompts(request.prompt, texts, vocab_size)
        max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
        items = [work_item(request, p, max_tokens, logprobs=request.logprobs, echo=request.echo) for p in prompts]
        results = await infer(items)
        choices = [
            _completion_choice(index, prompt, result, texts, echo=request.echo, logprobs=request.logprobs)
            for index, (prompt, result) in enumerate(zip(prompts, results))
        ]
        return CompletionResponse(model=model_name, choices=choices, usage=_usage(prompts, results))

    async def chat_completions(request: ChatCompletionRequest) -> ChatCompletionResponse:
        _refuse_unsupported(request, {**UNSUPPORTED_SAMPLING_FIELDS, **UNSUPPORTED_CHAT_FIELDS})
        check_model(request.model)
        prompt = _chat_prompt(request.messages, tokenizer, texts)
        max_tokens = _chat_max_tokens(request, len(prompt.token_ids), max_seq_length)
        (result,) = await infer([work_item(request, prompt, max_tokens)])
        message = ChatResponseMessage(content=_generated_text(result, texts))
        choice = ChatCompletionResponseChoice(index=0, message=message, finish_reason=result.finish_reason)
        return ChatCompletionResponse(model=model_name, choices=[choice], usage=_usage([prompt], [result]))

    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=max_seq_length)])

    async def health() -> JSONResponse:
        if not app.state.warmed_up:
            return _error_response(OpenAIError("the server is still warming up", status=503))
        if not await client.ready():
            return _error_response(OpenAIError("the inference server (Triton) is not ready", status=503))
        return JSONResponse({"status": "ok"})

    _add_route(app, "/v1/completions", completions, "POST", CompletionResponse)
    _add_route(app, "/v1/chat/completions", chat_completions, "POST", ChatCompletionResponse)
    _add_route(app, "/v1/models", models, "GET", ModelList)
    _add_route(app, "/v1/health", health, "GET", None)
    return app


def _add_route(app: FastAPI, path: str, endpoint: Callable[..., Any], method: str, model: Any) -> None:
    for spelling in (path, path + "/"):
        app.add_api_route(
            spelling, endpoint, methods=[method], response_model=model, include_in_schema=spelling == path
        )


# --- errors -------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    async def openai_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, OpenAIError)
        if error.status >= 500:
            LOGGER.error("request failed: %s", error.message)
        return _error_response(error)

    async def invalid_body(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return _error_response(_validation_error(error))

    async def http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        return _error_response(OpenAIError(str(error.detail), status=error.status_code))

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _error_response(error: OpenAIError) -> JSONResponse:
    info = ErrorInfo(message=error.message, type=error.error_type, param=error.param, code=error.code)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=error.status)


def _validation_error(error: RequestValidationError) -> OpenAIError:
    first = error.errors()[0]
    kind, message = first.get("type"), first.get("msg")
    fields = [part for part in first.get("loc", ()) if part != "body"]
    if kind == "json_invalid":
        return OpenAIError(f"the request body is not valid JSON: {message}", code="invalid_json")
    if not fields:
        return OpenAIError(f"the request body must be a JSON object: {message}")
    param = str(fields[0])
    if kind == "missing":
        return OpenAIError(f"the required field `{param}` is missing", param=param)
    if param == "prompt":  # pydantic reports only one branch of the union; name them all
        return OpenAIError(
            "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            param=param,
        )
    return OpenAIError(f"invalid `{param}`: {message} (got {first.get('input')!r:.80})", param=param)


def _refuse_unsupported(request: SamplingFields, off_values: dict[str, Any]) -> None:
    for field, off in off_values.items():
        if getattr(request, field) != off:
            raise OpenAIError(f"`{field}` = {getattr(request, field)!r} is not supported by this server", param=field)
    if request.model_extra:
        LOGGER.warning("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))


# --- requests -> work items ---------------------------------------------------------------


def _completion_prompts(prompt: Any, texts: _TokenTexts, vocab_size: int) -> list[Prompt]:
    if isinstance(prompt, str):
        return [Prompt(texts.encode(prompt), prompt)]
    if not prompt:
        raise OpenAIError("`prompt` must not be an empty list", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if isinstance(prompt[0], str):
        return [Prompt(texts.encode(text), text) for text in prompt]
    for token_ids in prompt:
        _check_vocabulary(token_ids, vocab_size)
    return [Prompt(list(token_ids), texts.decode(token_ids)) for token_ids in prompt]


def _check_vocabulary(token_ids: list[int], vocab_size: int) -> None:
    outside = [token_id for token_id in token_ids if not 0 <= token_id < vocab_size]
    if outside:
        raise OpenAIError(
            f"token ids {outside[:5]} are outside the vocabulary (0 to {vocab_size - 1})", param="prompt"
        )


def _check_prompt(token_ids: list[int], max_tokens: int, *, max_seq_length: int) -> None:
    if not token_ids:
        raise OpenAIError("the prompt is empty (0 tokens); send at least one token", param="prompt")
    if len(token_ids) + max_tokens > max_seq_length:
        raise OpenAIError(
            f"This model's maximum context length is {max_seq_length} tokens. However, you requested "
            f"{len(token_ids) + max_tokens} tokens ({len(token_ids)} in the prompt, {max_tokens} in the "
            "completion). Please reduce the length of the prompt or the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )


def _sampling_params(request: SamplingFields) -> SamplingParams:
    temperature = 0.0 if request.temperature < GREEDY_TEMPERATURE_BELOW else request.temperature
    top_k = max(request.top_k or 0, 0)  # -1 (vLLM's "off") and 0 both disable top-k
    return SamplingParams(temperature=temperature, top_p=request.top_p, top_k=top_k, seed=request.seed)


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in strings):
        raise OpenAIError("`stop` strings must not be empty", param="stop")
    return strings


def _chat_prompt(messages: list[ChatMessage], tokenizer: ServerTokenizer, texts: _TokenTexts) -> Prompt:
    if not tokenizer.chat_template:
        raise OpenAIError(
            "this model's tokenizer has no chat template, so /v1/chat/completions cannot be served; "
            "use /v1/completions",
            param="messages",
        )
    conversation = [{"role": m.role, "content": _message_text(m)} for m in messages]
    try:
        text = tokenizer.render_chat(conversation)
    except Exception as error:  # the template's own checks (e.g. role order) raise jinja errors
        raise OpenAIError(f"the chat template refused these messages: {error}", param="messages") from None
    return Prompt(texts.encode(text), text)


def _message_text(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return "".join(part.text for part in message.content)
    return message.content or ""


def _chat_max_tokens(request: ChatCompletionRequest, prompt_length: int, max_seq_length: int) -> int:
    if request.max_completion_tokens is not None:
        return request.max_completion_tokens
    if request.max_tokens is not None:
        return request.max_tokens
    return max(max_seq_length - prompt_length, 0)  # OpenAI's chat default: as long as the context allows


# --- results -> responses -----------------------------------------------------------------


def _generated_text(result: WorkResult, texts: _TokenTexts) -> str:
    text = texts.decode(result.output_tokens, skip_special_tokens=True)
    if result.stop_string:
        cut = text.find(result.stop_string)
        if cut >= 0:
            text = text[:cut]
    return text


def _completion_choice(
    index: int, prompt: Prompt, result: WorkResult, texts: _TokenTexts, *, echo: bool, logprobs: int | None
) -> CompletionResponseChoice:
    generated = _generated_text(result, texts)
    return CompletionResponseChoice(
        index=index,
        text=prompt.text + generated if echo else generated,
        logprobs=None if logprobs is None else _completion_logprobs(prompt, result, texts, echo=echo),
        finish_reason=result.finish_reason,
    )


def _completion_logprobs(prompt: Prompt, result: WorkResult, texts: _TokenTexts, *, echo: bool) -> CompletionLogProbs:
    token_ids = list(result.output_tokens)
    token_logprobs: list[float | None] = list(result.output_logprobs or [])
    top: list[dict[int, float] | None] = list(result.output_top_logprobs or [])
    if echo:
        token_ids = prompt.token_ids + token_ids
        token_logprobs = list(result.prompt_logprobs or []) + token_logprobs
        top = list(result.prompt_top_logprobs or []) + top
    if not len(token_ids) == len(token_logprobs) == len(top):
        raise OpenAIError(
            f"the engine returned log-probs for {len(token_logprobs)} of {len(token_ids)} tokens", status=500
        )
    pieces = texts.pieces(token_ids)
    # One lookup for all alternatives: a call per prompt token was the front end's largest cost.
    text_of = texts.known(token_id for entry in top if entry for token_id in entry)
    return CompletionLogProbs(
        tokens=pieces,
        token_logprobs=token_logprobs,
        top_logprobs=[
            None if entry is None else {text_of[token_id]: value for token_id, value in entry.items()} for entry in top
        ],
        text_offset=_text_offsets(pieces),
    )


def _text_offsets(pieces: list[str]) -> list[int]:
    offsets, position = [], 0
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    return offsets


def _usage(prompts: list[Prompt], results: list[WorkResult]) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(r.output_tokens) for r in results)
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


# --- serving ------------------------------------------------------------------------------


class FrontEndServer:
    """Runs the app under uvicorn in a background thread (no signal handlers of its own)."""

    def __init__(
        self, app: FastAPI, host: str, port: int, *, listener: socket.socket | None = None, warmup_timeout_s: float = 600.0
    ) -> None:
        """``listener``: a socket bound to ``host:port`` already, shared with other front ends."""
        self._app = app
        self._host = host
        self._port = port
        self._listener = listener
        self._warmup_timeout_s = warmup_timeout_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Listen, answer one real completion over HTTP, then report healthy; returns the base URL."""
        sock = self._listener or bind_listening_socket(self._host, self._port, "HTTP front end", option="--port")
        port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, log_level="warning", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="mtserve-http", daemon=True)
        self._thread.start()
        self._wait_until_listening()
        url = f"http://{self._host}:{port}"
        self._warm_up(url)
        self._app.state.warmed_up = True
        return url

    def stop(self) -> None:
        """Stop serving (runs the app's shutdown, which closes the inference client)."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[sock])
        finally:
            sock.close()

    def _wait_until_listening(self) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP front end did not start listening; see the log above for why")
            time.sleep(0.02)

    def _warm_up(self, url: str) -> None:
        body = {"prompt": WARMUP_PROMPT, "max_tokens": 1}
        try:
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=self._warmup_timeout_s)
        except httpx.HTTPError as error:
            self.stop()
            raise RuntimeError(f"the warm-up request to {url}/v1/completions failed: {error!r}") from None
        if response.status_code != 200:
            self.stop()
            raise RuntimeError(
                f"the warm-up request to {url}/v1/completions answered {response.status_code}: {response.text}"
            )
