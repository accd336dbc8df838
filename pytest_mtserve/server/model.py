"""Build a Megatron-Core GPTModel for an architecture and load torch_dist weights into it."""

from __future__ import annotations

from pathlib import Path

import torch

from pytest_mtserve.server.architecture import ModelArchitecture
from pytest_mtserve.server.options import ATTENTION_BACKENDS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPU (what the weights were trained in) and float32 on CPU."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in _DTYPES:
        raise ValueError(f"unknown dtype {requested!r}: use auto, {', '.join(_DTYPES)}")
    return _DTYPES[requested]


def resolve_attention_backend(requested: str, device: torch.device) -> str:
    """``auto`` is torch's fused SDPA on GPU (1.1x the engine's throughput at 8B on an H100,
    docs/performance.md) and Megatron's unfused attention on CPU, which the demo's committed
    baselines were recorded with."""
    if requested == "auto":
        return "sdpa" if device.type == "cuda" else "unfused"
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}: use auto, {' or '.join(ATTENTION_BACKENDS)}")
    return requested


def build_model(
    arch: ModelArchitecture,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_sequence_length: int,
    attention_backend: str = "auto",
):
    """An inference-mode GPTModel with the local layer spec, sharded over the current TP group."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        **arch.transformer_config_kwargs(),
        tensor_model_parallel_size=_tp_size(),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,  # the weights come from the checkpoint
    )
    spec = get_gpt_layer_local_spec(normalization=arch.normalization, qk_layernorm=arch.qk_layernorm)
    if resolve_attention_backend(attention_backend, device) == "sdpa":
        from pytest_mtserve.server.sdpa_attention import SdpaCoreAttention

        spec.submodules.self_attention.submodules.core_attention = SdpaCoreAttention
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=max(max_sequence_length, arch.seq_length),
        parallel_output=False,  # every rank gets the full vocabulary's logits
        share_embeddings_and_output_weights=arch.share_embeddings_and_output_weights,
        position_embedding_type=arch.position_embedding_type,
        rotary_percent=arch.rotary_percent,
        rotary_base=arch.rotary_base,
    )
    return model.to(device=device, dtype=dtype).eval()


def load_checkpoint_model(
    info, *, device: torch.device, dtype: str, max_sequence_length: int, attention_backend: str = "auto"
):
    """This rank's part of the checkpoint ``info`` (a CheckpointInfo), ready for inference."""
    model = build_model(
        info.architecture,
        device=device,
        dtype=resolve_dtype(dtype, device),
        max_sequence_length=max_sequence_length,
        attention_backend=attention_backend,
    )
    load_weights(model, info.iteration_dir)
    return model


def load_weights(model, iteration_dir: Path) -> None:
    """Read this rank's shards of the torch_dist checkpoint (resharding to the current TP)."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    state = dist_checkpointing.load(sharded, str(iteration_dir), strict="raise_all")
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"{iteration_dir} lacks weights for {', '.join(missing[:5])}; the checkpoint does not match its run_config.yaml")


def _tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
