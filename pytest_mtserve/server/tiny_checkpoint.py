"""A small, deterministic Llama-style checkpoint for tests: `mtserve make-tiny-checkpoint DIR`.

16 attention heads in 8 query groups (GQA) so that tensor parallelism 1, 2, 4 and 8 all
split it; random weights from a fixed seed, so every build is identical.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pytest_mtserve.server.architecture import ModelArchitecture, run_config_model_section

TINY_ARCHITECTURE = ModelArchitecture(
    num_layers=2,
    hidden_size=128,
    ffn_hidden_size=256,
    num_attention_heads=16,
    num_query_groups=8,
    kv_channels=8,
    vocab_size=1000,
    padded_vocab_size=1024,
    seq_length=4096,
    normalization="RMSNorm",
    layernorm_epsilon=1e-5,
    gated_linear_unit=True,
    activation="silu",
    position_embedding_type="rope",
    rotary_base=10000.0,
    share_embeddings_and_output_weights=False,
    add_bias_linear=False,
)
_SEED = 1234


def write_tiny_checkpoint(run_dir: Path, *, seed: int = _SEED) -> Path:
    """Write the tiny model to ``run_dir/iter_0000001``; returns that folder."""
    from pytest_mtserve.server.checkpoint_writer import write_checkpoint
    from pytest_mtserve.server.tiny_tokenizer import build_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer"
        build_tiny_tokenizer(tokenizer_dir)
        return write_checkpoint(
            Path(run_dir),
            model_config=run_config_model_section(TINY_ARCHITECTURE, "megatron.bridge.models.llama.LlamaModelProvider"),
            state_dict=tiny_state_dict(seed),
            tokenizer_dir=tokenizer_dir,
        )


def tiny_state_dict(seed: int = _SEED) -> dict[str, torch.Tensor]:
    """Random weights in Megatron-Core local-spec names, identical for the same seed."""
    arch = TINY_ARCHITECTURE
    generator = torch.Generator().manual_seed(seed)
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels

    def matrix(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) * std

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(arch.hidden_size, generator=generator)

    state = {"embedding.word_embeddings.weight": matrix(arch.padded_vocab_size, arch.hidden_size, 1.0)}
    for i in range(arch.num_layers):
        prefix = f"decoder.layers.{i}."
        state[prefix + "input_layernorm.weight"] = norm()
        state[prefix + "self_attention.linear_qkv.weight"] = matrix(qkv_rows, arch.hidden_size, 0.15)
        state[prefix + "self_attention.linear_proj.weight"] = matrix(arch.hidden_size, arch.num_attention_heads * arch.kv_channels, 0.1)
        state[prefix + "pre_mlp_layernorm.weight"] = norm()
        state[prefix + "mlp.linear_fc1.weight"] = matrix(2 * arch.ffn_hidden_size, arch.hidden_size, 0.1)
        state[prefix + "mlp.linear_fc2.weight"] = matrix(arch.hidden_size, arch.ffn_hidden_size, 0.1)
    state["decoder.final_layernorm.weight"] = norm()
    state["output_layer.weight"] = matrix(arch.padded_vocab_size, arch.hidden_size, 0.3)
    return state
