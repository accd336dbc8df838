"""The server's tokenizer against transformers' AutoTokenizer, which it replaces in the server.

Each comparison loads the same directory both ways and asks both the same questions:
encode (no special tokens added), decode with and without special tokens, per-token
decode, vocabulary size, EOS id and chat rendering.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest
from transformers import AutoTokenizer

from pytest_mtserve.server.tiny_tokenizer import TRAINING_TEXT
from pytest_mtserve.server.tokenizer import (
    ServerTokenizer,
    TokenizerError,
    load_tokenizer,
)

TEXTS = [
    "Question: What is the capital of France?\nAnswer: Paris",
    "",
    " ",
    "  leading,   inner   and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nand blank lines\n",
    "naïve café, Straße, 東京, Ελλάδα, emoji 🙂👍🏽 and \u200b zero width",
    "don't , stop . here ? now ! it 's we 've they 're I 'm ' quoted '",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "special inside<|endoftext|>text and <|im_end|> split <|im_ partial",
    "numbers 1234567 3.14159 -42 1e10 and code: def f(x): return x**2  # done",
]
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 12 plus 30? Answer with digits."},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And «30 minus 12» — in words?"},
]


def assert_same(reference: Any, ours: ServerTokenizer, texts: list[str] = TEXTS) -> None:
    assert ours.vocab_size == len(reference)
    assert ours.eos_token_id == reference.eos_token_id
    for text in texts:
        ids = reference(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids, text
        assert_same_decoding(reference, ours, ids)
    # Every special and added token, plus ordinary ids the texts above may not reach.
    assert_same_decoding(reference, ours, sorted(reference.added_tokens_decoder) + list(range(3, 300, 7)))
    if ours.chat_template is not None:
        for conversation in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[:3]):
            rendered = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            assert ours.render_chat(conversation) == rendered


def assert_same_decoding(reference: Any, ours: ServerTokenizer, ids: list[int]) -> None:
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert ours.decode_each(ids) == reference.batch_decode([[token_id] for token_id in ids])


def load_both(directory: Path) -> tuple[Any, ServerTokenizer]:
    return AutoTokenizer.from_pretrained(str(directory)), load_tokenizer(directory)


def variant(source: Path, destination: Path, **config: Any) -> Path:
    """A copy of the tokenizer at ``source`` whose tokenizer_config.json has ``config`` merged in."""
    shutil.copytree(source, destination)
    path = destination / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return destination


@pytest.fixture(scope="module")
def demo_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer: the demo's cached one, else rebuilt from a cached GGUF (no download)."""
    from pytest_mtserve.demo.assets import MODEL_MEMBER, default_cache_dir

    cache = default_cache_dir()
    if (cache / "tokenizer" / "tokenizer.json").is_file():
        return cache / "tokenizer"
    gguf_path = cache / MODEL_MEMBER.rsplit("/", 1)[-1]
    if not gguf_path.is_file():
        pytest.skip(f"no demo tokenizer or GGUF in {cache}; run the demo once to cache them")
    pytest.importorskip("gguf")
    from pytest_mtserve.demo.gguf_to_hf import write_tokenizer_from_gguf

    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    write_tokenizer_from_gguf(gguf_path, directory)
    return directory


def test_tiny_tokenizer_matches_transformers(tokenizer_dir: Path) -> None:
    assert_same(*load_both(tokenizer_dir))


def test_smollm2_tokenizer_matches_transformers(demo_tokenizer_dir: Path) -> None:
    reference, ours = load_both(demo_tokenizer_dir)
    assert ours.chat_template is not None  # its template adds a default system prompt: rendering is exercised
    assert_same(reference, ours)


# A template using what transformers' jinja environment adds: raise_exception, tojson (no
# HTML escaping), loop controls, {% generation %}, the special tokens, trim/lstrip blocks.
FEATURE_TEMPLATE = """\
{{ bos_token or '' }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] | tojson }}{% endgeneration %}{{ eos_token }}
    {% else %}
{{ message['role'] }}: {{ message | tojson(indent=1, sort_keys=True) }}
    {% endif %}
    {% if loop.index == 3 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}assistant:{% endif %}"""


def test_chat_template_given_as_a_list_uses_default(tokenizer_dir: Path, tmp_path: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "tools: {{ tools }}"},
        {"name": "default", "template": FEATURE_TEMPLATE},
    ]
    directory = variant(tokenizer_dir, tmp_path / "tokenizer", chat_template=templates, bos_token="<|im_start|>")
    (directory / "special_tokens_map.json").unlink()  # its bos_token (none) would override the config's
    reference, ours = load_both(directory)
    assert ours.chat_template == FEATURE_TEMPLATE
    assert_same(reference, ours)
    rendered = ours.render_chat(CONVERSATION)
    assert rendered.startswith('<|im_start|>\nsystem: {\n "content"') and rendered.endswith(
        '"42"<|im_end|>\nassistant:'
    )
    assert "<a href='x'>&</a>" in ours.render_chat([{"role": "assistant", "content": "<a href='x'>&</a>"}])


def test_raise_exception_in_a_template_refuses_the_chat(tokenizer_dir: Path, tmp_path: Path) -> None:
    directory = variant(tokenizer_dir, tmp_path / "tokenizer", chat_template=FEATURE_TEMPLATE)
    reference, ours = load_both(directory)
    conversation = [{"role": "tool", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role tool") as raised:
        ours.render_chat(conversation)
    with pytest.raises(jinja2.TemplateError) as expected:
        reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert str(raised.value) == str(expected.value)


def test_chat_template_file_takes_priority_over_the_config(tokenizer_dir: Path, tmp_path: Path) -> None:
    directory = variant(tokenizer_dir, tmp_path / "tokenizer")
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    reference, ours = load_both(directory)
    assert ours.render_chat(CONVERSATION).startswith("[system] You are a terse assistant.\n")
    assert_same(reference, ours)


def test_named_templates_without_default_leave_none(tokenizer_dir: Path, tmp_path: Path) -> None:
    directory = variant(tokenizer_dir, tmp_path / "tokenizer", chat_template=[{"name": "rag", "template": "x"}])
    assert load_tokenizer(directory).chat_template is None  # transformers refuses such a chat too


def test_strftime_now_is_available_to_templates(tokenizer_dir: Path, tmp_path: Path) -> None:
    template = "{{ strftime_now('%Y') }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    directory = variant(tokenizer_dir, tmp_path / "tokenizer", chat_template=template)
    reference, ours = load_both(directory)
    assert ours.render_chat(CONVERSATION[:1]) == reference.apply_chat_template(
        CONVERSATION[:1], tokenize=False, add_generation_prompt=True
    )


def write_wordpiece_tokenizer(directory: Path, **config: Any) -> Path:
    """A small BERT-style tokenizer: the kind clean_up_tokenization_spaces was made for."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[SEP]"], show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "sep_token": "[SEP]", **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


def test_clean_up_tokenization_spaces_on_wordpiece(tmp_path: Path) -> None:
    reference, ours = load_both(write_wordpiece_tokenizer(tmp_path / "wordpiece", clean_up_tokenization_spaces=True))
    ids = ours.encode("Don't stop. I'm here, you're there; it's fine!")
    assert ours.decode(ids) == "don't stop. i'm here, you're there ; it's fine!"  # the clean-up ran
    assert ours.eos_token_id is None
    assert_same(reference, ours)


@pytest.mark.parametrize("forced", [False, True])
def test_clean_up_tokenization_spaces_on_bpe(tokenizer_dir: Path, tmp_path: Path, forced: bool) -> None:
    # transformers 5 ignores the setting for BPE unless forced; "a ." must survive unforced.
    directory = variant(
        tokenizer_dir,
        tmp_path / "tokenizer",
        clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=forced,
    )
    reference, ours = load_both(directory)
    assert ours.decode(ours.encode("a . b")) == ("a. b" if forced else "a . b")
    assert_same(reference, ours)


def test_special_tokens_missing_from_tokenizer_json_are_added(tokenizer_dir: Path, tmp_path: Path) -> None:
    directory = variant(
        tokenizer_dir,
        tmp_path / "tokenizer",
        eos_token={"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False,
                   "normalized": False, "single_word": False, "special": True},
        image_token="<image>",  # a model-specific named token (transformers 5)
        additional_special_tokens=["<|im_start|>", "<extra>"],
    )  # fmt: skip
    (directory / "special_tokens_map.json").unlink()  # it would override eos_token
    reference, ours = load_both(directory)
    assert ours.vocab_size == 1003 and ours.eos_token_id == 1000
    assert ours.special_tokens["image_token"] == "<image>"
    assert_same(reference, ours, [*TEXTS, "x</s>y <image> z<extra>"])


def test_special_tokens_map_overrides_the_configs_named_tokens(tokenizer_dir: Path, tmp_path: Path) -> None:
    directory = variant(tokenizer_dir, tmp_path / "tokenizer", eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    legacy = {
        "eos_token": {"content": "<|im_end|>", "lstrip": False},
        "bos_token": "<|im_start|>",
        "additional_special_tokens": ["<not-added>"],  # the config's own list wins
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(legacy))
    reference, ours = load_both(directory)
    assert ours.eos_token_id == 2 and ours.special_tokens["bos_token"] == "<|im_start|>" and ours.vocab_size == 1000
    assert_same(reference, ours)


def test_special_tokens_map_is_ignored_beside_added_tokens_decoder(tokenizer_dir: Path, tmp_path: Path) -> None:
    added = {"2": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True, "__type": "AddedToken"}}  # fmt: skip
    directory = variant(tokenizer_dir, tmp_path / "tokenizer", eos_token="<|endoftext|>", added_tokens_decoder=added)
    reference, ours = load_both(directory)
    assert ours.eos_token_id == 0
    assert_same(reference, ours)


def test_truncation_and_padding_saved_in_tokenizer_json_are_ignored(tokenizer_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    directory = variant(tokenizer_dir, tmp_path / "tokenizer")
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=64, pad_id=0, pad_token="<|endoftext|>")
    backend.save(str(directory / "tokenizer.json"))
    reference, ours = load_both(directory)
    assert len(ours.encode(TEXTS[0])) > 4
    assert_same(reference, ours)


def test_missing_tokenizer_json_names_the_directory_and_the_fix(tokenizer_dir: Path, tmp_path: Path) -> None:
    directory = variant(tokenizer_dir, tmp_path / "tokenizer")
    (directory / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=f"{directory} has no tokenizer.json.*fast tokenizer.*save_pretrained"):
        load_tokenizer(directory)


def test_unreadable_tokenizer_json_names_the_file(tokenizer_dir: Path, tmp_path: Path) -> None:
    directory = variant(tokenizer_dir, tmp_path / "tokenizer")
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json cannot be read by the tokenizers library"):
        load_tokenizer(directory)


def test_server_modules_never_import_transformers(tokenizer_dir: Path) -> None:
    # transformers' tokenizer import pulls in sklearn and scipy, which break under PyTriton's numpy 1.x.
    code = """if True:
        import sys
        from pathlib import Path
        import pytest_mtserve.server.bootstrap, pytest_mtserve.server.main, pytest_mtserve.server.openai_api
        from pytest_mtserve.server.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(Path(sys.argv[1]))
        tokenizer.decode(tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "hi"}])))
        tokenizer.decode_each([0, 1, 2])
        leaked = sorted(name for name in sys.modules if name.split(".")[0] in ("transformers", "sklearn", "scipy"))
        assert not leaked, leaked
    """
    subprocess.run([sys.executable, "-c", code, str(tokenizer_dir)], check=True)
