"""The demo model's full ARC scores on a GPU: ``python benchmarks/demo_scores.py --cache DIR --out FILE``.

``DIR`` is a demo cache (``pytest_mtserve.demo.assets``) holding at least the GGUF and
``datasets/``; the tokenizer and Megatron checkpoint are converted there if missing. The
model is served with ``--device cuda`` and scored over HTTP (``http_mc``: lm-eval's ARC
prompts and metrics, 0-shot, every test question).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_mc import score_arc  # noqa: E402

from pytest_mtserve.demo.assets import ensure_demo_assets  # noqa: E402
from pytest_mtserve.launcher import ServerSettings, server_command, start_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--benchmarks", default="arc_easy,arc_challenge")
    args = parser.parse_args()
    assets = ensure_demo_assets(args.cache)
    settings = ServerSettings(checkpoint=assets.checkpoint_dir, tp=args.tp, device="cuda", max_batch_size=32)
    server = start_server(server_command(settings), args.out.parent / "demo-server.log", timeout_s=400)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets.tokenizer_dir))
    results = {}
    try:
        for name in args.benchmarks.split(","):
            result = score_arc(server.url, server.model, tokenizer, assets.datasets_dir, name, concurrency=args.concurrency)
            results[name] = result
            summary = {k: v for k, v in result.items() if k != "outcomes"}
            print(json.dumps(summary), flush=True)
    finally:
        server.stop()
    args.out.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
