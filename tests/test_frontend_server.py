"""The OpenAI front end over real PyTriton and real uvicorn, with a fake engine.

The fake engine's log-probs depend only on (previous token, token) of its own row, so any
value that differs from ``fake_logprob`` in a response came from another row or a bug.
"""

from __future__ import annotations

import asyncio
import glob
import io
import os
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from pytest_mtserve.server.batch_log import BatchLog, parse_batch_lines
from pytest_mtserve.server.openai_api import FrontEndServer, create_app
from pytest_mtserve.server.tokenizer import ServerTokenizer
from pytest_mtserve.server.triton_binding import TritonClient, TritonEngineServer
from pytest_mtserve.server.work import WorkItem, WorkResult

pytestmark = pytest.mark.slow

MODEL = "tiny"
MAX_SEQ_LENGTH = 64
FAILING_MAX_TOKENS = 13  # the fake engine raises on this, to test engine failures
GREEDY_LOGPROB = -0.05


def fake_next_token(previous: int) -> int:
    return (previous * 7 + 3) % 990 + 10  # never a special token (ids 0-2)


def fake_logprob(previous: int, token: int) -> float:
    if token == fake_next_token(previous):
        return GREEDY_LOGPROB
    return -((previous * 31 + token) % 97 + 1) / 10 - 0.1


class FakeEngine:
    def __init__(self, tokenizer: ServerTokenizer) -> None:
        self.tokenizer = tokenizer
        self.batch_sizes: list[int] = []

    def __call__(self, items: list[WorkItem]) -> list[WorkResult]:
        self.batch_sizes.append(len(items))
        return [self._row(item) for item in items]

    def _row(self, item: WorkItem) -> WorkResult:
        if item.max_tokens == FAILING_MAX_TOKENS:
            raise RuntimeError("fake engine failure")
        if item.stop:  # pretend generation ran into the first stop string
            generated = self.tokenizer.encode(" yes" + item.stop[0] + " more")
            result = WorkResult(output_tokens=generated, finish_reason="stop", stop_string=item.stop[0])
        else:
            result = WorkResult(output_tokens=fake_generation(item.prompt_tokens, item.max_tokens), finish_reason="length")
        if item.logprobs is not None:
            self._add_logprobs(item, result)
        return result

    @staticmethod
    def _add_logprobs(item: WorkItem, result: WorkResult) -> None:
        full = item.prompt_tokens + result.output_tokens
        logprobs = [fake_logprob(full[i - 1], full[i]) for i in range(1, len(full))]
        tops = [{fake_next_token(full[i - 1]): GREEDY_LOGPROB} if item.logprobs else {} for i in range(1, len(full))]
        split = len(item.prompt_tokens) - 1
        result.output_logprobs, result.output_top_logprobs = logprobs[split:], tops[split:]
        if item.echo:
            result.prompt_logprobs = [None, *logprobs[:split]]
            result.prompt_top_logprobs = [None, *tops[:split]]


def fake_generation(prompt: list[int], max_tokens: int) -> list[int]:
    generated, previous = [], prompt[-1]
    for _ in range(max_tokens):
        previous = fake_next_token(previous)
        generated.append(previous)
    return generated



class Stack:
    """Triton + front end, started and stopped the way the server's main does it."""

    def __init__(self, tokenizer: ServerTokenizer) -> None:
        self.engine = FakeEngine(tokenizer)
        self.batch_log = io.StringIO()
        self.triton = TritonEngineServer(
            self.engine, max_batch_size=8, queue_delay_us=50_000, batch_log=BatchLog(self.batch_log)
        )
        self.triton.start()
        client = TritonClient(self.triton.url, self.triton.triton_model_name, timeout_s=30)
        app = create_app(model_name=MODEL, tokenizer=tokenizer, max_seq_length=MAX_SEQ_LENGTH, client=client)
        self.front_end = FrontEndServer(app, "127.0.0.1", 0)
        try:
            self.url = self.front_end.start()
        except BaseException:
            self.triton.stop()
            raise

    def stop(self) -> None:
        self.front_end.stop()  # first: it closes the keep-alive connections Triton would wait for
        self.triton.stop()


@pytest.fixture(scope="module")
def stack(server_tokenizer) -> Iterator[Stack]:
    running = Stack(server_tokenizer)
    yield running
    running.stop()


def post(stack: Stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(stack.url + path, json=body, timeout=30)


def expected_prompt_logprobs(token_ids: list[int]) -> list[float | None]:
    return [None] + [fake_logprob(token_ids[i - 1], token_ids[i]) for i in range(1, len(token_ids))]


def test_echo_completion_field_by_field(stack: Stack, tokenizer) -> None:
    prompt = "Question: Which gas do plants absorb?\nAnswer: carbon dioxide"
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True, "seed": 1234}
    response = post(stack, "/v1/completions", body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert set(data) == {"id", "object", "created", "model", "choices", "usage"}
    assert data["object"] == "text_completion" and data["model"] == MODEL and data["id"].startswith("cmpl-")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generated = fake_generation(prompt_ids, 1)
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["text"] == prompt + tokenizer.decode(generated)
    logprobs = choice["logprobs"]
    all_ids = prompt_ids + generated
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in all_ids]
    assert logprobs["token_logprobs"] == expected_prompt_logprobs(all_ids)
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1:] == [
        {tokenizer.decode([fake_next_token(previous)]): GREEDY_LOGPROB} for previous in all_ids[:-1]
    ]
    assert [choice["text"][offset:offset + len(token)] for offset, token in zip(logprobs["text_offset"], logprobs["tokens"])] == logprobs["tokens"]
    assert data["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 1, "total_tokens": len(prompt_ids) + 1}


@pytest.mark.parametrize(
    "prompt",
    [["The quick brown fox", "Water boils"], [[321, 28, 390], [5, 6, 7, 8, 9]], [321, 28, 390], "Hello"],
    ids=["strings", "token-lists", "token-ids", "string"],
)
def test_each_prompt_gets_its_own_choice(stack: Stack, tokenizer, prompt) -> None:
    response = post(stack, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 1e-7})
    assert response.status_code == 200, response.text
    prompts = prompt if isinstance(prompt, list) and not isinstance(prompt[0], int) else [prompt]
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == list(range(len(prompts)))
    for choice, one in zip(choices, prompts):
        ids = tokenizer(one, add_special_tokens=False)["input_ids"] if isinstance(one, str) else one
        assert choice["text"] == tokenizer.decode(fake_generation(ids, 3))
        assert choice["logprobs"] is None


def test_echo_with_zero_max_tokens_scores_only_the_prompt(stack: Stack, tokenizer) -> None:
    prompt = "Answer: Paris is the capital of France."
    response = post(stack, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == prompt
    assert choice["logprobs"]["token_logprobs"] == expected_prompt_logprobs(tokenizer(prompt)["input_ids"])
    assert response.json()["usage"]["completion_tokens"] == 0


def test_stop_string_cuts_the_text(stack: Stack) -> None:
    response = post(stack, "/v1/completions", {"prompt": "Question: hi\nAnswer:", "max_tokens": 5, "stop": ["\n\n"]})
    choice = response.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (" yes", "stop")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/completions/", "/v1/chat/completions", "/v1/chat/completions/"])
def test_both_spellings_answer_without_redirect(stack: Stack, path: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    response = post(stack, path, {**body, "max_tokens": 2})
    assert response.status_code == 200, response.text


def test_chat_completion_field_by_field(stack: Stack, tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    response = post(stack, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 4})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-") and data["model"] == MODEL
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    (choice,) = data["choices"]
    assert choice["message"] == {"role": "assistant", "content": tokenizer.decode(fake_generation(prompt_ids, 4))}
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert data["usage"]["prompt_tokens"] == len(prompt_ids)


def test_models_and_health(stack: Stack) -> None:
    models = httpx.get(stack.url + "/v1/models").json()
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [(MODEL, "model", MAX_SEQ_LENGTH)]
    assert httpx.get(stack.url + "/v1/health").status_code == 200


def test_rows_of_different_lengths_in_one_batch_keep_their_own_values(stack: Stack, tokenizer) -> None:
    prompts = [list(range(10, 10 + length)) for length in (2, 9, 4, 30, 3, 17, 6, 11)]
    batches_before = len(stack.engine.batch_sizes)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
            body = {"max_tokens": 2, "logprobs": 1, "echo": True}
            return await asyncio.gather(*(client.post("/v1/completions", json={**body, "prompt": p}) for p in prompts))

    responses = asyncio.run(send_all())
    assert max(stack.engine.batch_sizes[batches_before:]) > 1, "requests were not batched together"
    for prompt, response in zip(prompts, responses):
        all_ids = prompt + fake_generation(prompt, 2)
        assert response.json()["choices"][0]["logprobs"]["token_logprobs"] == expected_prompt_logprobs(all_ids)


def test_the_batch_log_has_a_line_per_batch_with_its_requests(stack: Stack) -> None:
    batches_before = len(stack.engine.batch_sizes)
    lines_before = len(parse_batch_lines(stack.batch_log.getvalue().splitlines()))

    async def send_all() -> None:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
            body = {"max_tokens": 1, "logprobs": 1, "echo": True}
            await asyncio.gather(*(client.post("/v1/completions", json={**body, "prompt": [10, 11 + i]}) for i in range(6)))

    asyncio.run(send_all())
    logged = parse_batch_lines(stack.batch_log.getvalue().splitlines())[lines_before:]
    # Two Triton instances: a batch may leave the callable before the one the engine ran first.
    assert sorted(batch.requests for batch in logged) == sorted(stack.engine.batch_sizes[batches_before:])
    assert sum(batch.requests for batch in logged) == 6
    rounding_ms = 0.15  # each field is rounded to 0.1 ms on its own
    assert all(batch.engine_ms + batch.wait_ms <= batch.callable_ms + rounding_ms for batch in logged)
    assert all(batch.idle_ms is not None and batch.idle_ms >= 0 for batch in logged)
    assert [batch.left for batch in logged] == sorted(batch.left for batch in logged)


class SlowEngine:
    """Takes ``seconds`` per batch and counts how many batches it ever ran at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, items: list[WorkItem]) -> list[WorkResult]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return [WorkResult(output_tokens=[5], finish_reason="length") for _ in items]


@pytest.mark.parametrize("instances", [1, 2])
def test_a_second_triton_instance_delivers_the_next_batch_while_the_engine_runs(instances: int) -> None:
    engine, batch_log = SlowEngine(seconds=0.6), io.StringIO()
    triton = TritonEngineServer(engine, max_batch_size=1, queue_delay_us=100, instances=instances,
                                batch_log=BatchLog(batch_log))  # fmt: skip
    triton.start()
    try:
        client = TritonClient(triton.url, triton.triton_model_name, timeout_s=30)

        async def send_two() -> list[WorkResult]:
            try:
                return await client.infer([WorkItem(prompt_tokens=[3, 4], max_tokens=1) for _ in range(2)])
            finally:
                await client.aclose()

        results = asyncio.run(send_two())
    finally:
        triton.stop()
    assert [result.output_tokens for result in results] == [[5], [5]]
    assert engine.most_at_once == 1, "the engine ran two batches at once"
    first, second = parse_batch_lines(batch_log.getvalue().splitlines())
    # With two instances the second batch reached the callable during the first one's run and
    # waited there for the engine; with one, Triton held it until the first batch had left.
    assert (second.wait_ms > 300) == (instances == 2), second
    assert first.wait_ms < 300


@pytest.mark.parametrize("tokenized_requests", [False, True], ids=["string-prompts", "token-prompts"])
def test_harness_loglikelihood_gets_the_engines_values(stack: Stack, tokenizer, tokenizer_dir, tokenized_requests) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    harness = LocalCompletionsAPI(
        model=MODEL, base_url=stack.url + "/v1/completions", tokenizer=str(tokenizer_dir),
        tokenizer_backend="huggingface", tokenized_requests=tokenized_requests, num_concurrent=4, max_length=MAX_SEQ_LENGTH,
    )
    context = "Question: What do bees make?\nAnswer:"
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    greedy_text = tokenizer.decode(fake_generation(context_ids, 3))
    pairs = [(context, " honey and wax"), (context, " carbon dioxide"), (context, greedy_text)]
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    results = harness.loglikelihood(requests, disable_tqdm=True)
    for (ctx, continuation), (logprob, is_greedy) in zip(pairs, results):
        whole = tokenizer(ctx + continuation, add_special_tokens=False)["input_ids"]
        expected = [fake_logprob(whole[i - 1], whole[i]) for i in range(len(context_ids), len(whole))]
        assert logprob == sum(expected)
        assert is_greedy == all(value == GREEDY_LOGPROB for value in expected)
    assert results[2][1] is True


BAD_REQUESTS = {
    "malformed-json": ("/v1/completions", b'{"prompt": "hi",', "invalid_json", None),
    "not-an-object": ("/v1/completions", b"[1, 2]", None, None),
    "missing-prompt": ("/v1/completions", {"max_tokens": 1}, None, "prompt"),
    "prompt-of-wrong-type": ("/v1/completions", {"prompt": [[1, "a"]]}, None, "prompt"),
    "empty-prompt-list": ("/v1/completions", {"prompt": []}, None, "prompt"),
    "empty-prompt-string": ("/v1/completions", {"prompt": ""}, None, "prompt"),
    "token-outside-vocabulary": ("/v1/completions", {"prompt": [[5, 1000]]}, None, "prompt"),
    "negative-token": ("/v1/completions", {"prompt": [-1]}, None, "prompt"),
    "too-long": ("/v1/completions", {"prompt": [5] * 60, "max_tokens": 10}, "context_length_exceeded", "max_tokens"),
    "unknown-model": ("/v1/completions", {"model": "other", "prompt": "hi"}, "model_not_found", "model"),
    "n-above-one": ("/v1/completions", {"prompt": "hi", "n": 2}, None, "n"),
    "stream": ("/v1/completions", {"prompt": "hi", "stream": True}, None, "stream"),
    "logprobs-above-20": ("/v1/completions", {"prompt": "hi", "logprobs": 21}, None, "logprobs"),
    "negative-temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}, None, "temperature"),
    "zero-top-p": ("/v1/completions", {"prompt": "hi", "top_p": 0}, None, "top_p"),
    "negative-max-tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, None, "max_tokens"),
    "empty-stop": ("/v1/completions", {"prompt": "hi", "stop": [""]}, None, "stop"),
    "chat-without-messages": ("/v1/chat/completions", {"messages": []}, None, "messages"),
    "chat-logprobs": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, None, "logprobs"),
    "chat-too-long": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 80}]}, "context_length_exceeded", "max_tokens"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_request_is_a_400_and_the_server_keeps_serving(stack: Stack, case: str) -> None:
    path, body, code, param = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        response = httpx.post(stack.url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = post(stack, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["code"], error["param"]) == ("BadRequestError", code, param)
    assert post(stack, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_context_length_error_says_the_numbers(stack: Stack) -> None:
    message = post(stack, "/v1/completions", {"prompt": [5] * 60, "max_tokens": 10}).json()["error"]["message"]
    assert "maximum context length is 64 tokens" in message and "70 tokens (60 in the prompt, 10 in the completion)" in message


def test_engine_failure_fails_only_that_request(stack: Stack) -> None:
    response = post(stack, "/v1/completions", {"prompt": "hi", "max_tokens": FAILING_MAX_TOKENS})
    assert response.status_code == 500
    assert "fake engine failure" in response.json()["error"]["message"]
    assert post(stack, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


def _triton_processes() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True) if "tritonserver" in child.name()}


def _pytriton_leftovers() -> set[str]:
    from pytriton.constants import PYTRITON_HOME

    return {str(p) for p in PYTRITON_HOME.iterdir()} | set(glob.glob(f"/dev/shm/pytrtion{os.getpid()}-*"))


def test_stop_leaves_no_port_process_or_shared_memory(server_tokenizer) -> None:
    # The module's own stack runs meanwhile, and other runs may share PYTRITON_HOME: look only
    # at what this stack added.
    processes_before, leftovers_before = _triton_processes(), _pytriton_leftovers()
    own_stack = Stack(server_tokenizer)
    ports = [int(url.rsplit(":", 1)[1]) for url in (own_stack.url, own_stack.triton.url)]
    own_processes = _triton_processes() - processes_before
    own_leftovers = _pytriton_leftovers() - leftovers_before
    assert own_processes and own_leftovers
    own_stack.stop()
    assert not own_processes & _triton_processes()
    assert not own_leftovers & _pytriton_leftovers()
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
