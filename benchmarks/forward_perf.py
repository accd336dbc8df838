"""Raw forward throughput on one GPU: the engine's GPTModel (TP1) against the card's bf16
matmul peak and Hugging Face ``LlamaForCausalLM`` on the same token batch.

    python benchmarks/forward_perf.py --out results.json

Random weights (normal, std 0.02): timing on zeros or uninitialised memory would flatter
the kernels. FLOPs are counted as 2 x parameters x tokens for the matrix products plus
4 x layers x hidden x prompt_length x tokens for causal attention's two products at full
(unmasked) cost: the usual convention, so MFU numbers compare with others'.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pytest_mtserve.server.architecture import ModelArchitecture

SHAPES = {
    "llama3-8b": ModelArchitecture(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, vocab_size=128256, padded_vocab_size=128256, seq_length=8192, rotary_base=500000.0,
    ),
    "smollm2-135m": ModelArchitecture(
        num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
        kv_channels=64, vocab_size=49152, padded_vocab_size=49152, seq_length=8192, rotary_base=100000.0,
        share_embeddings_and_output_weights=True,
    ),
}  # fmt: skip
BATCHES = {"llama3-8b": [(8, 1024), (16, 512)], "smollm2-135m": [(32, 512), (64, 512)]}


def timed(fn, repeats: int = 10) -> float:
    """Median seconds of ``fn()`` after warm-up, timed with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, repeats=20) / 1e12


def forward_flops(arch: ModelArchitecture, params: int, batch: int, length: int) -> float:
    tokens = batch * length
    return 2 * params * tokens + 4 * arch.num_layers * arch.hidden_size * length * tokens


def randomize(model: torch.nn.Module) -> int:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return sum(p.numel() for p in model.parameters())


def megatron_forward(arch, backend: str):
    from pytest_mtserve.server.model import build_model
    from pytest_mtserve.server.model_runner import ModelRunner

    model = build_model(arch, device=torch.device("cuda"), dtype=torch.bfloat16, max_sequence_length=4096, attention_backend=backend)
    params = randomize(model)
    runner = ModelRunner(model, arch, torch.device("cuda"))
    return params, lambda prompts: runner.prefill(prompts), model


def hf_forward(arch):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=arch.padded_vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, head_dim=arch.kv_channels, rope_theta=arch.rotary_base,
        tie_word_embeddings=arch.share_embeddings_and_output_weights, max_position_embeddings=4096,
        attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device("cuda"):  # initialising 8B parameters on the CPU would take minutes
        model = LlamaForCausalLM(config).to(dtype=torch.bfloat16).eval()
    params = randomize(model)

    @torch.inference_mode()
    def run(prompts):
        ids = torch.tensor(prompts, device="cuda")
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    return params, run, model


ENGINES = ("megatron-unfused", "megatron-sdpa", "hf-transformers")


def measure(name: str, peak: float, engines: list[str]) -> list[dict]:
    arch = SHAPES[name]
    rows = []
    reference_logits = None  # unfused attention's, for the SDPA backend's error
    for engine in engines:
        params, run, model = hf_forward(arch) if engine == "hf-transformers" else megatron_forward(arch, engine.split("-")[1])
        for index, (batch, length) in enumerate(BATCHES[name]):
            prompts = torch.randint(0, arch.vocab_size, (batch, length), generator=torch.Generator().manual_seed(index)).tolist()
            seconds = timed(lambda: run(prompts))
            if index == 0 and engine.startswith("megatron"):
                logits = run(prompts).float()
                if reference_logits is None:
                    reference_logits = logits
                else:
                    error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
                    print(json.dumps({"model": name, "sdpa_vs_unfused_relative_error": error}), flush=True)
                    reference_logits = None
            tflops = forward_flops(arch, params, batch, length) / seconds / 1e12
            rows.append(dict(model=name, engine=engine, batch=batch, length=length, params=params,
                             tokens_per_s=batch * length / seconds, tflops=tflops, mfu=tflops / peak))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        del model, run
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="smollm2-135m,llama3-8b")
    # The peer runs apart where the server's environment (numpy<2) cannot import transformers' models.
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if unknown := set(engines) - set(ENGINES):
        parser.error(f"unknown engines {sorted(unknown)}: use {', '.join(ENGINES)}")
    if any(engine.startswith("megatron") for engine in engines):
        from pytest_mtserve.server.distributed import init_parallel

        init_parallel(1, 1, torch.device("cuda"))
    started = time.time()
    peak = matmul_peak_tflops()
    print(f"bf16 matmul peak (8192^3, random): {peak:.0f} TFLOP/s", flush=True)
    rows = [row for name in args.models.split(",") for row in measure(name, peak, engines)]
    result = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, matmul_peak_tflops=peak, rows=rows,
                  wall_s=time.time() - started)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'model':14} {'engine':17} {'batch':>5} {'len':>5} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        print(f"{r['model']:14} {r['engine']:17} {r['batch']:5} {r['length']:5} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {r['mfu']:6.1%}")


if __name__ == "__main__":
    main()
