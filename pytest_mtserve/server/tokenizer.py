"""The server's tokenizer: a Hugging Face tokenizer directory read with ``tokenizers`` and ``jinja2``.

transformers is deliberately not imported: its tokenizer import pulls in scikit-learn and
scipy, which fail to import under the numpy 1.x that PyTriton pins. What the server needs
from ``AutoTokenizer`` (encode without special tokens, decode, the vocabulary size, the EOS
id, the chat template) is mirrored here from transformers 5's ``TokenizersBackend`` and
``apply_chat_template``; the tests compare the two on real tokenizer directories.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (the order missing tokens get ids in).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 writes the template here, not in the config

Message = Mapping[str, str]  # {"role": ..., "content": ...}
TokenValue = str | dict[str, Any]  # a token as the configs write it: "<s>" or {"content": "<s>", ...}


class TokenizerError(ValueError):
    """The tokenizer directory cannot be used; the message names the file and the fix."""


class ServerTokenizer:
    """A fast tokenizer that encodes, decodes and renders chats exactly as ``AutoTokenizer`` does."""

    def __init__(
        self,
        backend: Tokenizer,
        *,
        special_tokens: Mapping[str, str],
        chat_template: str | None,
        clean_up_tokenization_spaces: bool,
    ) -> None:
        self._backend = backend
        self.special_tokens = dict(special_tokens)  # "eos_token" -> "<|im_end|>"; chat templates read them
        self.chat_template = chat_template
        self._clean_up_spaces = clean_up_tokenization_spaces
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id: int | None = None if eos is None else backend.token_to_id(eos)

    @property
    def vocab_size(self) -> int:
        """The whole vocabulary, added tokens included (``len(AutoTokenizer)``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone: no BOS/EOS added, as lm-eval's ``add_special_tokens=False``."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._clean_up(self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def decode_each(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's text on its own (what log-probs report per token)."""
        pieces = self._backend.decode_batch([[token_id] for token_id in token_ids], skip_special_tokens=False)
        return [self._clean_up(piece) for piece in pieces]

    def render_chat(self, messages: Sequence[Message]) -> str:
        """The prompt for ``messages`` followed by the assistant's turn (``add_generation_prompt=True``)."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template; add `chat_template` to tokenizer_config.json")
        return _compile_chat_template(self.chat_template).render(
            messages=[dict(message) for message in messages],
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **self.special_tokens,
        )

    def _clean_up(self, text: str) -> str:
        if not self._clean_up_spaces:
            return text
        # transformers' clean_up_tokenization, meant for WordPiece-style "word ." output.
        for spaced, joined in _CLEAN_UP_REPLACEMENTS:
            text = text.replace(spaced, joined)
        return text


_CLEAN_UP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


def missing_fast_tokenizer(directory: Path) -> str:
    """The error for a tokenizer folder without ``tokenizer.json``, naming the fix."""
    return (
        f"{directory} has no tokenizer.json; the server needs a Hugging Face fast tokenizer. Write one with "
        f"transformers.AutoTokenizer.from_pretrained(MODEL).save_pretrained('{directory}')"
    )


def load_tokenizer(directory: Path) -> ServerTokenizer:
    """Read a Hugging Face tokenizer directory (``tokenizer.json`` plus its optional configs)."""
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(missing_fast_tokenizer(directory))
    try:
        backend = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # noqa: BLE001 - the Rust parser raises bare Exception, naming no file
        raise TokenizerError(f"{tokenizer_file} cannot be read by the tokenizers library: {error}") from None
    config = _read_json(directory / "tokenizer_config.json")
    # transformers drops tokenizer.json's truncation and padding on every call it makes here.
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    named, extra = _special_tokens(config, directory)
    _add_missing_special_tokens(backend, [*named.values(), *extra])
    return ServerTokenizer(
        backend,
        special_tokens={key: _token_text(value) for key, value in named.items()},
        chat_template=_chat_template(config, directory),
        clean_up_tokenization_spaces=_cleans_up_spaces(config, backend),
    )


def _special_tokens(config: dict[str, Any], directory: Path) -> tuple[dict[str, TokenValue], list[TokenValue]]:
    """The named special tokens (bos_token, ..., model-specific ones like image_token) and the extra ones."""
    # transformers reads the legacy special_tokens_map.json only when the config has no
    # added_tokens_decoder; its named tokens then override the config's, its extra ones do not.
    legacy = {} if "added_tokens_decoder" in config else _read_json(directory / "special_tokens_map.json")
    settings = {**config, **legacy}
    extra = _extra_tokens(config) or _extra_tokens(legacy)
    named = {key: settings[key] for key in NAMED_SPECIAL_TOKENS if settings.get(key) is not None}
    # Any other "*_token" string names a model-specific token (transformers 5), as does a dict of extra tokens.
    named.update(
        (key, value)
        for key, value in settings.items()
        if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and isinstance(value, str)
    )
    if isinstance(extra, dict):
        named.update(extra)
        extra = []
    return named, list(extra)


def _extra_tokens(settings: dict[str, Any]) -> list[TokenValue] | dict[str, TokenValue]:
    return settings.get("extra_special_tokens") or settings.get("additional_special_tokens") or []


def _add_missing_special_tokens(backend: Tokenizer, tokens: list[TokenValue]) -> None:
    # transformers adds each configured special token that tokenizer.json lacks (new ids at the end).
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = {_token_text(value): value for value in tokens if _token_text(value) not in present}
    if missing:
        backend.add_tokens([_added_token(value) for value in missing.values()])


def _chat_template(config: dict[str, Any], directory: Path) -> str | None:
    template_file = directory / CHAT_TEMPLATE_FILE
    if template_file.is_file():  # it takes priority over the config's entry, as in transformers
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates; a chat without tools uses "default"
        return {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


def _cleans_up_spaces(config: dict[str, Any], backend: Tokenizer) -> bool:
    if not config.get("clean_up_tokenization_spaces", False):
        return False
    # transformers 5 ignores the setting for BPE models, where it would delete real spaces
    # before punctuation, unless this flag insists.
    return not isinstance(backend.model, BPE) or bool(
        config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    )


def _token_text(value: TokenValue) -> str:
    return value if isinstance(value, str) else value["content"]


def _added_token(value: TokenValue) -> AddedToken:
    if isinstance(value, str):
        return AddedToken(value, special=True)
    options = {key: value[key] for key in ("single_word", "lstrip", "rstrip", "normalized") if key in value}
    return AddedToken(value["content"], special=True, **options)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{path} is not valid JSON: {error}") from None


# --- chat templates: transformers' jinja environment --------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}`` marks the assistant's text for transformers' masks; rendered as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache
def _compile_chat_template(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)
