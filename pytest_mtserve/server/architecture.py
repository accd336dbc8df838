"""The model architecture, read as data from a checkpoint's ``run_config.yaml``.

Megatron Bridge stores the model provider's fields (TransformerConfig names) under
``model:``. We read them without importing Megatron Bridge and map them onto a
Megatron-Core ``TransformerConfig`` for the local (Transformer-Engine-free) layer spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

_ACTIVATIONS = {"silu": "silu", "swiglu": "silu", "gelu": "gelu", "gelu_new": "gelu", "relu": "relu"}


class ArchitectureError(ValueError):
    """The run_config's model section cannot be served; the message names the field."""


@dataclass(frozen=True)
class ModelArchitecture:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int  # the tokenizer's vocabulary; logits beyond it are padding
    padded_vocab_size: int  # rows of the embedding table
    seq_length: int
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    gated_linear_unit: bool = True
    activation: str = "silu"
    position_embedding_type: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    share_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False

    def check_parallelism(self, tp: int, pp: int) -> None:
        """Refuse splits the weights cannot take, before any process group starts."""
        if pp != 1:
            raise ArchitectureError(
                f"--pp {pp}: pipeline parallelism is not supported yet; use --pp 1 and raise --tp"
            )
        for name, count in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups", self.num_query_groups),
            ("padded vocabulary size", self.padded_vocab_size),
            ("ffn_hidden_size", self.ffn_hidden_size),
        ):
            if count % tp:
                divisors = [d for d in (1, 2, 4, 8) if count % d == 0]
                raise ArchitectureError(
                    f"--tp {tp} does not divide the model's {name} ({count}); "
                    f"use --tp one of {divisors}"
                )

    def transformer_config_kwargs(self) -> dict[str, Any]:
        import torch.nn.functional as F

        return dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization=self.normalization,
            layernorm_epsilon=self.layernorm_epsilon,
            gated_linear_unit=self.gated_linear_unit,
            activation_func=getattr(F, self.activation),
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
        )


def architecture_from_run_config(model: dict[str, Any], source: str) -> ModelArchitecture:
    """Build the architecture from run_config.yaml's ``model:`` mapping.

    ``source`` names the file in error messages.
    """

    def need(key: str) -> Any:
        if model.get(key) is None:
            raise ArchitectureError(f"{source}: model.{key} is missing; the checkpoint's run_config.yaml must set it")
        return model[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    vocab = int(need("vocab_size"))
    divisible_by = int(model.get("make_vocab_size_divisible_by") or 128)
    padded_vocab = int(model.get("padded_vocab_size") or math.ceil(vocab / divisible_by) * divisible_by)
    position = str(model.get("position_embedding_type") or "rope")
    if position not in ("rope", "learned_absolute"):
        raise ArchitectureError(f"{source}: model.position_embedding_type {position!r} is not supported (rope or learned_absolute)")
    normalization = str(model.get("normalization") or "LayerNorm")
    if normalization not in ("RMSNorm", "LayerNorm"):
        raise ArchitectureError(f"{source}: model.normalization {normalization!r} is not supported (RMSNorm or LayerNorm)")
    if model.get("num_moe_experts"):
        raise ArchitectureError(f"{source}: mixture-of-experts models (model.num_moe_experts) are not supported yet")
    return ModelArchitecture(
        num_layers=int(need("num_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(model.get("ffn_hidden_size") or 4 * hidden),
        num_attention_heads=heads,
        num_query_groups=int(model.get("num_query_groups") or heads),
        kv_channels=int(model.get("kv_channels") or hidden // heads),
        vocab_size=vocab,
        padded_vocab_size=padded_vocab,
        seq_length=int(model.get("seq_length") or 4096),
        normalization=normalization,
        layernorm_epsilon=float(model.get("layernorm_epsilon") or 1e-5),
        gated_linear_unit=bool(model.get("gated_linear_unit", False)),
        activation=_activation_name(model.get("activation_func"), source),
        position_embedding_type=position,
        rotary_base=float(model.get("rotary_base") or 10000),
        rotary_percent=float(model.get("rotary_percent") or 1.0),
        share_embeddings_and_output_weights=bool(model.get("share_embeddings_and_output_weights", True)),
        add_bias_linear=bool(model.get("add_bias_linear", True)),
        add_qkv_bias=bool(model.get("add_qkv_bias", False)),
        qk_layernorm=bool(model.get("qk_layernorm", False)),
    )


def _activation_name(value: Any, source: str) -> str:
    """Megatron Bridge writes callables as ``{_target_: torch.nn.functional.silu, _call_: false}``."""
    if value is None:
        return "gelu"
    target = value.get("_target_") if isinstance(value, dict) else value
    name = str(target).rsplit(".", 1)[-1]
    if name not in _ACTIVATIONS:
        raise ArchitectureError(f"{source}: model.activation_func {target!r} is not supported ({', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[name]


def run_config_model_section(arch: ModelArchitecture, provider: str) -> dict[str, Any]:
    """The inverse of :func:`architecture_from_run_config`, for checkpoint writers."""
    return {
        "_target_": provider,
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "kv_channels": arch.kv_channels,
        "vocab_size": arch.vocab_size,
        "make_vocab_size_divisible_by": 128,
        "padded_vocab_size": arch.padded_vocab_size,
        "seq_length": arch.seq_length,
        "normalization": arch.normalization,
        "layernorm_epsilon": arch.layernorm_epsilon,
        "gated_linear_unit": arch.gated_linear_unit,
        "activation_func": {"_target_": f"torch.nn.functional.{arch.activation}", "_call_": False},
        "position_embedding_type": arch.position_embedding_type,
        "rotary_base": arch.rotary_base,
        "rotary_percent": arch.rotary_percent,
        "share_embeddings_and_output_weights": arch.share_embeddings_and_output_weights,
        "add_bias_linear": arch.add_bias_linear,
        "add_qkv_bias": arch.add_qkv_bias,
        "qk_layernorm": arch.qk_layernorm,
    }
