"""Correctness of the served stack on GPUs: ``python benchmarks/gpu_check.py --tp N --out DIR``.

1. writes the tiny checkpoint, computes its float32 log-probs on the CPU (the reference);
2. serves it with ``--device cuda --tp N`` and checks /v1/models, echo log-probs against
   the reference (bf16 tolerance), greedy generation repeated gives the same text;
3. scores ARC-Easy (first ``--arc-limit`` questions) over HTTP twice: per-question outcomes
   must be identical.
Prints one JSON line per check and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_mc import score_arc  # noqa: E402

from pytest_mtserve.launcher import ServerSettings, server_command, start_server  # noqa: E402

PROMPTS = [[5, 17, 256, 3, 99, 400, 12, 7, 640, 2], [33, 8, 911, 45], list(range(100, 400, 3))]
# bf16 weights and activations on random tiny weights: logits of std ~3 carry ~1e-2 error.
LOGPROB_TOLERANCE = 0.15


def cpu_reference(checkpoint: Path) -> list[list[float]]:
    """Float32 CPU log-probs of PROMPTS' tokens (in a subprocess: its own gloo group)."""
    code = (
        "import json,sys,torch; from pytest_mtserve.server.local_model import load_model\n"
        f"m=load_model({str(checkpoint)!r}, device='cpu', dtype='float32'); out=[]\n"
        f"for p in {PROMPTS!r}:\n"
        "    lp=torch.log_softmax(m.logits(torch.tensor([p]))[0].double(),-1)\n"
        "    out.append(lp[:-1].gather(1,torch.tensor(p[1:])[:,None])[:,0].tolist())\n"
        "print('REF'+json.dumps(out))\n"
    )
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).stdout
    return json.loads(next(line[3:] for line in text.splitlines() if line.startswith("REF")))


def check(name: str, ok: bool, **details) -> bool:
    print(json.dumps({"check": name, "ok": ok, **details}), flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", type=Path, required=True)
    parser.add_argument("--arc-limit", type=int, default=300)
    parser.add_argument("--device", default="cuda", help="cpu: a quick dry run of this script without a GPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "tiny"
    if not checkpoint.exists():
        subprocess.run([sys.executable, "-m", "pytest_mtserve.cli", "make-tiny-checkpoint", str(checkpoint)], check=True)
    reference = cpu_reference(checkpoint)
    settings = ServerSettings(checkpoint=checkpoint, tp=args.tp, device=args.device, max_batch_size=16)
    server = start_server(server_command(settings), args.out / f"server-tp{args.tp}.log", timeout_s=400)
    results = []
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            models = client.get("/v1/models").json()
            results.append(check("models", models["data"][0]["id"] == server.model, models=models))
            worst = 0.0
            for prompt, ref in zip(PROMPTS, reference):
                body = {"model": server.model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
                got = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(prompt)]
                worst = max(worst, max(abs(a - b) for a, b in zip(got, ref)))
            results.append(check("logprobs_vs_cpu_fp32", worst <= LOGPROB_TOLERANCE, max_abs_diff=worst, tolerance=LOGPROB_TOLERANCE))
            body = {"model": server.model, "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}
            texts = [client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)]
            results.append(check("greedy_repeatable", texts[0] == texts[1], text=texts[0][:60]))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(next(checkpoint.glob("iter_*")) / "tokenizer"))
        runs = [score_arc(server.url, server.model, tokenizer, args.datasets, "arc_easy", limit=args.arc_limit) for _ in range(2)]
        same = runs[0]["outcomes"] == runs[1]["outcomes"]
        results.append(check("arc_easy_twice_identical", same, n=runs[0]["n"], acc=[r["acc"] for r in runs], wall_s=[r["wall_s"] for r in runs]))
    finally:
        server.stop()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
