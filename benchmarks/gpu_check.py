"""Correctness of the served stack on GPUs: ``python benchmarks/gpu_check.py --tp N --out DIR``.

1. writes the tiny checkpoint, computes its float32 log-probs on the CPU (the reference);
2. serves it with ``--device cuda --tp N`` and checks /v1/models, echo log-probs against
   the reference (bf16 tolerance), greedy generation repeated gives the same text.
Prints one JSON line per check and exits non-zero if any failed. Whole benchmarks run
twice with identical per-question outcomes are ``gpu_gate.sh``'s part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from pytest_mtserve.launcher import ServerSettings, server_command, start_server

PROMPTS = [[5, 17, 256, 3, 99, 400, 12, 7, 640, 2], [33, 8, 911, 45], list(range(100, 400, 3))]
# float32 on the GPU must reproduce the CPU to rounding: that is the exactness check. bf16
# (8-bit mantissa) rounds weights and every activation; on the tiny model's random weights
# its worst log-prob error over these tokens measured 0.33 on an H200 and 0.31 in bf16 on
# the CPU (2026-12-01): precision, not a defect.
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5}


def cpu_reference(checkpoint: Path, python: str) -> list[list[float]]:
    """Float32 CPU log-probs of PROMPTS' tokens (in a subprocess: its own gloo group)."""
    code = (
        "import json,sys,torch; from pytest_mtserve.server.local_model import load_model\n"
        f"m=load_model({str(checkpoint)!r}, device='cpu', dtype='float32'); out=[]\n"
        f"for p in {PROMPTS!r}:\n"
        "    lp=torch.log_softmax(m.logits(torch.tensor([p]))[0].double(),-1)\n"
        "    out.append(lp[:-1].gather(1,torch.tensor(p[1:])[:,None])[:,0].tolist())\n"
        "print('REF'+json.dumps(out))\n"
    )
    text = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).stdout
    return json.loads(next(line[3:] for line in text.splitlines() if line.startswith("REF")))


def check(name: str, ok: bool, **details) -> bool:
    print(json.dumps({"check": name, "ok": ok, **details}), flush=True)
    return ok


def served_checks(server, reference: list[list[float]], dtype: str) -> list[bool]:
    results = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        models = client.get("/v1/models").json()
        results.append(check(f"models_{dtype}", models["data"][0]["id"] == server.model, models=models))
        differences = []
        for prompt, ref in zip(PROMPTS, reference):
            body = {"model": server.model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
            got = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(prompt)]
            differences += [abs(a - b) for a, b in zip(got, ref)]
        tolerance = LOGPROB_TOLERANCE[dtype]
        results.append(check(f"logprobs_{dtype}_vs_cpu_fp32", max(differences) <= tolerance, max_abs_diff=max(differences),
                             mean_abs_diff=sum(differences) / len(differences), tolerance=tolerance))  # fmt: skip
        body = {"model": server.model, "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}
        texts = [client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)]
        results.append(check(f"greedy_repeatable_{dtype}", texts[0] == texts[1], text=texts[0][:60]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: a quick dry run of this script without a GPU")
    parser.add_argument("--server-python", default=sys.executable, help="interpreter of the server and the CPU reference")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "tiny"
    if not checkpoint.exists():
        subprocess.run([args.server_python, "-m", "pytest_mtserve.cli", "make-tiny-checkpoint", str(checkpoint)], check=True)
    reference = cpu_reference(checkpoint, args.server_python)
    settings = ServerSettings(checkpoint=checkpoint, tp=args.tp, device=args.device, max_batch_size=16, python=args.server_python)
    results = []
    for dtype in LOGPROB_TOLERANCE:
        command = [*server_command(settings), "--dtype", dtype]
        server = start_server(command, args.out / f"server-tp{args.tp}-{dtype}.log", timeout_s=400)
        try:
            results += served_checks(server, reference, dtype)
        finally:
            server.stop()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
