"""A tiny OpenAI-compatible server with deterministic made-up answers, for bridge tests.

Log-likelihood requests (``echo`` + ``logprobs``) get one log-prob per prompt token (same
tokenizer as the client, so lm-eval's context split lands on token boundaries) plus one
generated token. A token's log-prob depends only on its id, so scores are reproducible and
differ between answer choices. Generation requests get an answer letter picked from a hash
of the prompt, or a GSM8K-style ``#### <number>`` line.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def token_logprob(token_id: int) -> float:
    return -((token_id * 7) % 13 + 1) / 4


def answer_letter(prompt: str) -> str:
    return "ABCD"[hashlib.sha256(prompt.encode()).digest()[0] % 4]


class FakeModel:
    def __init__(self, tokenizer_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        self.requests: list[dict] = []
        self._lock = threading.Lock()

    def complete(self, body: dict) -> dict:
        self._record(body)
        prompt = body["prompt"]
        if isinstance(prompt, list):  # lm-eval batches prompts as a list of strings
            choices = [self._completion_choice(body, text, index) for index, text in enumerate(prompt)]
        else:
            choices = [self._completion_choice(body, prompt, 0)]
        return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model"), "choices": choices}

    def chat(self, body: dict) -> dict:
        self._record(body)
        prompt = "\n".join(message["content"] for message in body["messages"])
        message = {"role": "assistant", "content": f"The best answer is {answer_letter(prompt)}"}
        return {"id": "chat-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    def _record(self, body: dict) -> None:
        with self._lock:
            self.requests.append(body)

    def _completion_choice(self, body: dict, prompt: str, index: int) -> dict:
        if body.get("echo") and body.get("logprobs"):
            return self._scored(prompt, index)
        if "####" in prompt:  # GSM8K few-shot examples end their answers so
            text = f" The answer is {len(prompt) % 50}.\n#### {len(prompt) % 50}"
        else:
            text = " " + answer_letter(prompt)
        return {"index": index, "text": text, "finish_reason": "stop", "logprobs": None}

    def _scored(self, prompt: str, index: int) -> dict:
        encoding = self.tokenizer.encode(prompt)
        ids = [*encoding.ids, 0]  # one "generated" token, as max_tokens=1 asks
        tokens = [self.tokenizer.id_to_token(token_id) for token_id in ids]
        logprobs = [token_logprob(token_id) for token_id in ids]
        offsets = [start for start, _ in encoding.offsets] + [len(prompt)]
        return {
            "index": index,
            "text": prompt + tokens[-1],
            "finish_reason": "length",
            "logprobs": {
                "tokens": tokens,
                "token_logprobs": [None, *logprobs[1:]],
                "top_logprobs": [None, *({token: lp} for token, lp in zip(tokens[1:], logprobs[1:]))],
                "text_offset": offsets,
            },
        }


def _handler(model: FakeModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            path = self.path.rstrip("/")
            if path.endswith("/v1/completions"):
                self._reply(200, model.complete(body))
            elif path.endswith("/v1/chat/completions"):
                self._reply(200, model.chat(body))
            else:
                self._reply(404, {"error": f"no route {self.path}"})

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


@contextmanager
def fake_openai_server(tokenizer_dir: Path) -> Iterator[tuple[str, FakeModel]]:
    """Serve a FakeModel on a free localhost port; yields (base url, model)."""
    model = FakeModel(tokenizer_dir)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(model))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", model
    finally:
        server.shutdown()
        server.server_close()
