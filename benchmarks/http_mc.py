"""Multiple-choice log-likelihood scoring over the server's HTTP API, the way lm-eval does it.

A pure-HTTP stand-in for nemo-evaluator where it is not installed (offline GPU hosts without
``mtserve bundle --with-eval``): lm-eval's ``arc_easy`` / ``arc_challenge`` prompt
("Question: {question}\\nAnswer:" + " {choice}"), its context/continuation tokenization
(continuation = tokens of context+choice beyond those of the context, no special tokens),
one ``/v1/completions`` request per choice with ``echo``, ``logprobs=1``, ``max_tokens=1``,
and its metrics: acc (argmax log-likelihood) and acc_norm (log-likelihood per character).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import httpx

ARC_FILES = {"arc_easy": "allenai/ai2_arc/ARC-Easy/test.jsonl", "arc_challenge": "allenai/ai2_arc/ARC-Challenge/test.jsonl"}


def load_arc(datasets_dir: Path, name: str, limit: int | None = None) -> list[dict]:
    lines = (Path(datasets_dir) / ARC_FILES[name]).read_text().splitlines()
    docs = [json.loads(line) for line in lines if line.strip()]
    return docs[:limit] if limit else docs


def requests_for(doc: dict, tokenizer) -> tuple[list[list[int]], list[int]]:
    """Token ids per choice (context + continuation) and the context's length."""
    context = f"Question: {doc['question']}\nAnswer:"
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    prompts = [tokenizer.encode(context + " " + choice, add_special_tokens=False) for choice in doc["choices"]["text"]]
    return prompts, len(context_ids)


async def _loglikelihood(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], context_length: int) -> float:
    payload = {"model": model, "prompt": prompt, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    response = await client.post(url, json=payload)
    response.raise_for_status()
    token_logprobs = response.json()["choices"][0]["logprobs"]["token_logprobs"]
    return float(sum(token_logprobs[context_length:len(prompt)]))


async def _score_all(docs, tokenizer, url: str, model: str, concurrency: int) -> tuple[list[dict], int]:
    semaphore = asyncio.Semaphore(concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(prompt, context_length):
            async with semaphore:
                return await _loglikelihood(client, url, model, prompt, context_length)

        async def doc_outcome(doc):
            nonlocal tokens
            prompts, context_length = requests_for(doc, tokenizer)
            tokens += sum(len(p) for p in prompts)
            lls = await asyncio.gather(*(one(p, context_length) for p in prompts))
            target = doc["choices"]["label"].index(doc["answerKey"])
            norm = [ll / len(text) for ll, text in zip(lls, doc["choices"]["text"])]
            return {"id": doc["id"], "acc": float(_argmax(lls) == target), "acc_norm": float(_argmax(norm) == target)}

        outcomes = await asyncio.gather(*(doc_outcome(d) for d in docs))
    return list(outcomes), tokens


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def score_arc(base_url: str, model: str, tokenizer, datasets_dir: Path, name: str, *, limit=None, concurrency=16) -> dict:
    """Score one ARC test set; returns the metrics with standard errors and every outcome."""
    docs = load_arc(datasets_dir, name, limit)
    started = time.time()
    outcomes, tokens = asyncio.run(_score_all(docs, tokenizer, base_url.rstrip("/") + "/v1/completions", model, concurrency))
    wall = time.time() - started
    result = {"benchmark": name, "n": len(outcomes), "wall_s": wall, "prompt_tokens_per_s": tokens / wall,
              "requests": sum(len(d["choices"]["text"]) for d in docs), "outcomes": {o["id"]: [o["acc"], o["acc_norm"]] for o in outcomes}}  # fmt: skip
    for metric in ("acc", "acc_norm"):
        values = [o[metric] for o in outcomes]
        mean = sum(values) / len(values)
        result[metric] = mean
        result[metric + "_stderr"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    return result
