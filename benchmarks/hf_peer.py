"""The peer for ``serving_overhead.py``: Hugging Face transformers scoring the same stream.

    python benchmarks/hf_peer.py --checkpoint RUN_DIR --out peer.json [--requests 384]

Builds ``LlamaForCausalLM`` of the checkpoint's shape on the GPU (random weights: only
throughput is compared), then scores ``serving_overhead``'s request stream (same seed,
same tokenizer, so the same token ids) in right-padded batches with an attention mask,
log-softmax and gather included, in two modes: one row per request, and one row per
distinct prompt-but-its-last-token within a batch, which is what lm-eval's in-process ``hf``
backend does with its default ``logits_cache`` (one forward for the four " A".." D"
continuations of an MMLU question). Runs under an interpreter that can import transformers' models
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
from serving_overhead import STREAMS, in_batches, total_tokens, warmup_and_timed  # noqa: E402

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


def one_row_per_context(batch: list[list[int]]) -> list[list[int]]:
    """lm-eval's ``logits_cache``: requests equal but for their last token share one row."""
    return list({tuple(tokens[:-1]): tokens for tokens in batch}.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", default="mmlu", choices=STREAMS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    info = locate_checkpoint(args.checkpoint)
    warmup, timed = warmup_and_timed(load_tokenizer(info.tokenizer_dir), args.requests, args.seed, args.stream)
    _, _, model = hf_forward(info.architecture)
    score = scorer(model)
    batches = [[r.token_ids for r in batch] for batch in in_batches(timed, args.batch_size)]
    modes = {"one row per request": batches, "lm-eval logits cache": [one_row_per_context(b) for b in batches]}
    for batch in in_batches(warmup, args.batch_size):
        score([r.token_ids for r in batch])
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, mode_batches in modes.items():
            torch.cuda.synchronize()
            started = time.perf_counter()
            for batch in mode_batches:
                score(batch)
            torch.cuda.synchronize()
            rates[mode].append(total_tokens(timed) / (time.perf_counter() - started))
    for mode, mode_rates in rates.items():
        print(f"hf peer, {mode}: tokens/s per round: {', '.join(f'{rate:,.0f}' for rate in mode_rates)}", flush=True)
    best = {mode: max(mode_rates) for mode, mode_rates in rates.items()}
    args.out.write_text(json.dumps({"tokens_per_s": best, "rounds": rates, "transformers": __import__("transformers").__version__}))


if __name__ == "__main__":
    main()
