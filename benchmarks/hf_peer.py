"""The peer for ``serving_overhead.py``: Hugging Face transformers scoring the same stream.

    python benchmarks/hf_peer.py --checkpoint RUN_DIR --out peer.json [--requests 384]

Builds ``LlamaForCausalLM`` of the checkpoint's shape on the GPU (random weights: only
throughput is compared), then scores ``serving_overhead``'s request stream (same seed,
same tokenizer, so the same token ids) in right-padded batches with an attention mask:
what lm-eval's in-process ``hf`` backend does for log-likelihood requests, log-softmax
and gather included. Runs under an interpreter that can import transformers' models
(the server's numpy<2 environment cannot on images whose scipy needs numpy 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_perf import hf_forward  # noqa: E402
from serving_overhead import WARMUP_REQUESTS, build_request_stream, total_tokens  # noqa: E402

from pytest_mtserve.server.checkpoint import locate_checkpoint  # noqa: E402
from pytest_mtserve.server.tokenizer import load_tokenizer  # noqa: E402


def scorer(model: torch.nn.Module):
    @torch.inference_mode()
    def score(batch: list[list[int]]) -> list[torch.Tensor]:
        width = max(len(ids) for ids in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        picked = logprobs[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
        return [picked[row, : len(tokens) - 1].cpu() for row, tokens in enumerate(batch)]

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    info = locate_checkpoint(args.checkpoint)
    stream = build_request_stream(load_tokenizer(info.tokenizer_dir), WARMUP_REQUESTS + args.requests, args.seed)
    _, _, model = hf_forward(info.architecture)
    score = scorer(model)
    warmup, timed = stream[:WARMUP_REQUESTS], stream[WARMUP_REQUESTS:]
    batches = [[r.token_ids for r in timed[i : i + args.batch_size]] for i in range(0, len(timed), args.batch_size)]
    for i in range(0, len(warmup), args.batch_size):
        score([r.token_ids for r in warmup[i : i + args.batch_size]])
    rates = []
    for _ in range(args.rounds):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches:
            score(batch)
        torch.cuda.synchronize()
        rates.append(total_tokens(timed) / (time.perf_counter() - started))
    print(f"hf peer tokens/s per round: {', '.join(f'{rate:,.0f}' for rate in rates)}", flush=True)
    args.out.write_text(json.dumps({"tokens_per_s": max(rates), "rounds": rates, "transformers": __import__("transformers").__version__}))


if __name__ == "__main__":
    main()
