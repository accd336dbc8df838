"""Convert a llama-architecture GGUF file (llama.cpp's format) to a Hugging Face Llama folder.

The output is what ``LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
read: ``config.json``, ``model.safetensors`` (float32, dequantized) and a fast tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) rebuilt from the
vocabulary embedded in the GGUF header.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

GGUF_CONTROL_TOKEN = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


class GGUFConversionError(ValueError):
    """The GGUF file is not a model this converter understands."""


def convert_gguf_to_hf(gguf_path: Path, dst: Path) -> Path:
    """Write ``dst`` as a Hugging Face Llama folder converted from ``gguf_path``; return ``dst``."""
    reader = _open(gguf_path)
    config = llama_config_from_gguf(reader)
    dst.mkdir(parents=True, exist_ok=True)
    _write_json(dst / "config.json", config)
    _save_safetensors(hf_state_dict_from_gguf(reader, config), dst / "model.safetensors")
    write_hf_tokenizer(reader, dst, model_max_length=config["max_position_embeddings"])
    return dst


def write_tokenizer_from_gguf(gguf_path: Path, dst: Path) -> Path:
    """Write only the Hugging Face tokenizer files rebuilt from ``gguf_path`` into ``dst``."""
    reader = _open(gguf_path)
    config = llama_config_from_gguf(reader)
    dst.mkdir(parents=True, exist_ok=True)
    write_hf_tokenizer(reader, dst, model_max_length=config["max_position_embeddings"])
    return dst


# --- header -> config.json -------------------------------------------------------------


def llama_config_from_gguf(reader: Any) -> dict[str, Any]:
    """The Hugging Face ``LlamaConfig`` dict described by a GGUF header."""
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise GGUFConversionError(
            f"general.architecture is {architecture!r}; only 'llama' GGUF files can be converted"
        )
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    rotary_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise GGUFConversionError(
            f"llama.rope.dimension_count is {rotary_dim} but the head dimension is {head_dim}; "
            "partial rotary embeddings are not a Llama model"
        )
    token_count = len(_field(reader, "tokenizer.ggml.tokens"))
    has_output_matrix = any(tensor.name == "output.weight" for tensor in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        # GGUF stores these as float32; round back to the decimal the model was written with.
        "rms_norm_eps": _float32_to_decimal(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_to_decimal(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": int(_field(reader, "llama.vocab_size", token_count)),
        "tie_word_embeddings": not has_output_matrix,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": _optional_int(_field(reader, "tokenizer.ggml.padding_token_id", None)),
        "torch_dtype": "float32",
    }


# --- tensors -----------------------------------------------------------------------------

# GGUF tensor name suffix inside a block -> Hugging Face module name inside a layer.
_BLOCK_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_state_dict_from_gguf(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dequantized float32 tensors under Hugging Face Llama names, Q/K rows in HF order."""
    from gguf.quants import dequantize

    row_fixes: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "attn_q.weight": lambda w: unpermute_rotary_rows(w, config["num_attention_heads"]),
        "attn_k.weight": lambda w: unpermute_rotary_rows(w, config["num_key_value_heads"]),
    }
    state_dict = {}
    for tensor in reader.tensors:
        weights = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        hf_name, suffix = _hf_tensor_name(tensor.name)
        fix = row_fixes.get(suffix)
        state_dict[hf_name] = fix(weights) if fix else weights
    return state_dict


def unpermute_rotary_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K projection.

    convert_hf_to_gguf.py interleaves each head's two rotary halves
    (``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``) so that rotated pairs are
    adjacent; Hugging Face's ``rotate_half`` expects the halves contiguous again.
    """
    head_dim = weights.shape[0] // n_heads
    paired = weights.reshape(n_heads, head_dim // 2, 2, *weights.shape[1:])
    return np.ascontiguousarray(paired.swapaxes(1, 2).reshape(weights.shape))


def _hf_tensor_name(gguf_name: str) -> tuple[str, str]:
    """(Hugging Face name, GGUF suffix) of one GGUF tensor name."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name], gguf_name
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix != "blk" or not layer.isdigit() or suffix not in _BLOCK_TENSOR_NAMES:
        raise GGUFConversionError(
            f"unexpected GGUF tensor {gguf_name!r}; a plain Llama model has only "
            f"{sorted(_GLOBAL_TENSOR_NAMES)} and blk.N.{{{','.join(_BLOCK_TENSOR_NAMES)}}}"
        )
    return f"model.layers.{layer}.{_BLOCK_TENSOR_NAMES[suffix]}", suffix


def _save_safetensors(state_dict: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(state_dict, str(path), metadata={"format": "pt"})


# --- tokenizer ---------------------------------------------------------------------------


def write_hf_tokenizer(reader: Any, dst: Path, *, model_max_length: int) -> None:
    """Rebuild the GGUF's byte-level BPE tokenizer as Hugging Face fast-tokenizer files."""
    model_name = _field(reader, "tokenizer.ggml.model")
    if model_name != "gpt2":
        raise GGUFConversionError(
            f"tokenizer.ggml.model is {model_name!r}; only byte-level BPE ('gpt2') tokenizers "
            "can be rebuilt"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]
    special_tokens = [tok for tok, kind in zip(tokens, token_types) if kind == GGUF_CONTROL_TOKEN]
    tokenizer = _byte_level_bpe(tokens, merges, special_tokens, _field(reader, "tokenizer.ggml.pre"))
    tokenizer.save(str(dst / "tokenizer.json"), pretty=True)

    def token_at(key: str) -> str | None:
        index = _optional_int(_field(reader, key, None))
        return None if index is None else tokens[index]

    special_map = {
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "additional_special_tokens": special_tokens,
    }
    # Written by hand, not by save_pretrained: transformers 5 would write a tokenizer_class
    # that transformers 4 (the evaluation client's) cannot load.
    _write_json(
        dst / "tokenizer_config.json",
        {
            **special_map,
            "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
            "add_prefix_space": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
            "chat_template": _field(reader, "tokenizer.chat_template", None),
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(dst / "special_tokens_map.json", special_map)


# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose splitting is GPT-2's regex,
# optionally preceded by splitting every digit on its own.
_GPT2_REGEX_PRE_TOKENIZERS = {"gpt-2": False, "smollm": True, "starcoder": True}


def _byte_level_bpe(tokens: list[str], merges: list[tuple[str, str]], special_tokens: list[str], pre: str):
    """A ``tokenizers.Tokenizer`` (imported lazily) equal to llama.cpp's for this vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if pre not in _GPT2_REGEX_PRE_TOKENIZERS:
        raise GGUFConversionError(
            f"tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: {sorted(_GPT2_REGEX_PRE_TOKENIZERS)}"
        )
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _GPT2_REGEX_PRE_TOKENIZERS[pre]:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which text_offset relies on.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    return tokenizer


# --- helpers -----------------------------------------------------------------------------

_MISSING = object()


def _open(gguf_path: Path) -> Any:
    from gguf import GGUFReader

    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    return GGUFReader(str(gguf_path))


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFConversionError(f"the GGUF header has no {key!r} field, which a Llama model needs")
        return default
    return field.contents()


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float32_to_decimal(value: float) -> float:
    return float(f"{value:.7g}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
