"""Convert a Llama-family Hugging Face folder to our Megatron Bridge checkpoint layout.

Source: ``config.json``, one or more ``*.safetensors`` files (sharded or not) and the
tokenizer files. Target: a run directory written by
:func:`pytest_mtserve.server.checkpoint_writer.write_checkpoint`, with Megatron-Core
local-spec tensor names at tensor parallelism 1. This is ``mtserve convert-hf SRC DST``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from pytest_mtserve.server.architecture import ModelArchitecture, run_config_model_section

LLAMA_PROVIDER = "megatron.bridge.models.llama.llama_provider.LlamaModelProvider"
VOCAB_DIVISIBLE_BY = 128

# Every file a Hugging Face tokenizer may be made of; the ones present travel along.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class HFConversionError(ValueError):
    """The Hugging Face folder is not a model this converter handles; the message names why."""


def convert_hf_checkpoint(src: Path, dst: Path) -> Path:
    """Write the Hugging Face Llama folder ``src`` as a Megatron checkpoint run dir ``dst``.

    Returns the iteration folder written inside ``dst`` (``dst/iter_0000001``).
    """
    from pytest_mtserve.server.checkpoint_writer import write_checkpoint

    src, dst = Path(src), Path(dst)
    arch = architecture_from_hf_config(read_hf_config(src), f"{src}/config.json")
    with HFTensors(src) as tensors, tempfile.TemporaryDirectory() as scratch:
        state_dict = megatron_state_dict(tensors.get, arch)
        tokenizer_dir = _copy_tokenizer(src, Path(scratch) / "tokenizer")
        return write_checkpoint(
            dst,
            model_config=run_config_model_section(arch, LLAMA_PROVIDER),
            state_dict=state_dict,
            tokenizer_dir=tokenizer_dir,
        )


# --- config.json -> architecture ------------------------------------------------------------


def read_hf_config(src: Path) -> dict[str, Any]:
    """``src/config.json`` as a dict."""
    path = Path(src) / "config.json"
    if not path.is_file():
        raise HFConversionError(f"{path} does not exist; SRC must be a Hugging Face model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def architecture_from_hf_config(config: dict[str, Any], source: str) -> ModelArchitecture:
    """The Megatron architecture of a Llama ``config.json``; ``source`` names it in errors."""
    _check_llama(config, source)
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    vocab = int(config["vocab_size"])
    return ModelArchitecture(
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(config["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        kv_channels=int(config.get("head_dim") or hidden // heads),
        vocab_size=vocab,
        padded_vocab_size=math.ceil(vocab / VOCAB_DIVISIBLE_BY) * VOCAB_DIVISIBLE_BY,
        seq_length=int(config.get("max_position_embeddings") or 4096),
        normalization="RMSNorm",
        layernorm_epsilon=float(config.get("rms_norm_eps") or 1e-6),
        gated_linear_unit=True,
        activation="silu",
        position_embedding_type="rope",
        rotary_base=_rope_theta(config),
        rotary_percent=1.0,
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
        add_bias_linear=False,
        add_qkv_bias=False,
    )


def _check_llama(config: dict[str, Any], source: str) -> None:
    """Refuse what a plain Megatron GPT model with RoPE and SwiGLU cannot reproduce."""
    expectations = {
        "model_type": ("llama",),
        "hidden_act": ("silu",),
        "attention_bias": (False, None),
        "mlp_bias": (False, None),
    }
    for field, allowed in expectations.items():
        if config.get(field) not in allowed:
            raise HFConversionError(
                f"{source}: {field} is {config.get(field)!r}; only Llama models with "
                f"{field} in {allowed} can be converted"
            )
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if config.get("rope_scaling") or rope_type != "default":
        raise HFConversionError(
            f"{source}: rope_scaling / rope_parameters.rope_type {rope_type!r} is set; "
            "only plain RoPE (rope_type 'default') can be converted"
        )
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if config.get(field) is None:
            raise HFConversionError(f"{source}: {field} is missing")


def _rope_theta(config: dict[str, Any]) -> float:
    # transformers 5 nests it in rope_parameters; older configs have it at the top level.
    nested = (config.get("rope_parameters") or {}).get("rope_theta")
    return float(nested or config.get("rope_theta") or 10000.0)


# --- tensors --------------------------------------------------------------------------------

TensorGetter = Callable[[str], torch.Tensor]

# Megatron name inside decoder.layers.{i} -> how to build it from that layer's HF tensors
# (`get` takes names relative to model.layers.{i}).
_LAYER_TENSORS: dict[str, Callable[[TensorGetter, ModelArchitecture], torch.Tensor]] = {
    "input_layernorm.weight": lambda get, arch: get("input_layernorm.weight"),
    "self_attention.linear_qkv.weight": lambda get, arch: grouped_qkv(
        get("self_attn.q_proj.weight"), get("self_attn.k_proj.weight"), get("self_attn.v_proj.weight"), arch
    ),
    "self_attention.linear_proj.weight": lambda get, arch: get("self_attn.o_proj.weight"),
    "pre_mlp_layernorm.weight": lambda get, arch: get("post_attention_layernorm.weight"),
    "mlp.linear_fc1.weight": lambda get, arch: torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]),
    "mlp.linear_fc2.weight": lambda get, arch: get("mlp.down_proj.weight"),
}


def megatron_state_dict(get: TensorGetter, arch: ModelArchitecture) -> dict[str, torch.Tensor]:
    """Megatron-Core local-spec tensors (TP1, float32) from HF tensors fetched by name."""
    state = {"embedding.word_embeddings.weight": pad_vocab_rows(get("model.embed_tokens.weight"), arch)}
    for layer in range(arch.num_layers):
        layer_get = _prefixed(get, f"model.layers.{layer}.")
        for name, build in _LAYER_TENSORS.items():
            state[f"decoder.layers.{layer}.{name}"] = build(layer_get, arch)
    state["decoder.final_layernorm.weight"] = get("model.norm.weight")
    if not arch.share_embeddings_and_output_weights:
        state["output_layer.weight"] = pad_vocab_rows(get("lm_head.weight"), arch)
    return {name: tensor.to(torch.float32).contiguous() for name, tensor in state.items()}


def _prefixed(get: TensorGetter, prefix: str) -> TensorGetter:
    return lambda name: get(prefix + name)


def grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArchitecture) -> torch.Tensor:
    """Megatron's fused QKV rows: per query group, its query heads, then its key, then its value."""
    groups, head_dim = arch.num_query_groups, arch.kv_channels
    heads_per_group = arch.num_attention_heads // groups
    hidden = q.shape[1]
    per_group = [
        q.reshape(groups, heads_per_group * head_dim, hidden),
        k.reshape(groups, head_dim, hidden),
        v.reshape(groups, head_dim, hidden),
    ]
    return torch.cat(per_group, dim=1).reshape(-1, hidden)


def pad_vocab_rows(weights: torch.Tensor, arch: ModelArchitecture) -> torch.Tensor:
    """Zero rows up to the padded vocabulary (their logits are never read)."""
    missing = arch.padded_vocab_size - weights.shape[0]
    return torch.cat([weights, weights.new_zeros(missing, weights.shape[1])]) if missing else weights


class HFTensors:
    """Tensors of all ``*.safetensors`` files of a folder, read one at a time by name."""

    def __init__(self, src: Path):
        self._files = sorted(Path(src).glob("*.safetensors"))
        if not self._files:
            raise HFConversionError(
                f"{src} has no *.safetensors files; re-save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}

    def __enter__(self) -> HFTensors:
        from safetensors import safe_open

        for path in self._files:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            self._where.update(dict.fromkeys(handle.keys(), handle))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise HFConversionError(
                f"tensor {name!r} is not in {', '.join(p.name for p in self._files)}; "
                "the weights do not match a Llama config.json"
            )
        return self._where[name].get_tensor(name)


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    present = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not (src / "tokenizer.json").is_file():
        from pytest_mtserve.server.tokenizer import missing_fast_tokenizer

        raise HFConversionError(missing_fast_tokenizer(src))
    dst.mkdir(parents=True)
    for path in present:
        shutil.copy2(path, dst / path.name)
    return dst
