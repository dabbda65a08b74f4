"""`HFTokenizer`: a Hugging Face `tokenizer.json` (DeepSeek-R1's, Qwen's, ...) as an r1jax `Tokenizer`.

Beside the json it reads, as transformers does: `tokenizer_config.json` (named special tokens,
`chat_template`, `add_bos_token`), `chat_template.jinja` (which wins over the config's template),
and `special_tokens_map.json` (only when the config has no `added_tokens_decoder`).

`render_chat` renders the chat template in the sandboxed jinja2 environment and with the variables
of transformers' `apply_chat_template`, and `encode` adds no special tokens (the template writes
bos), so for a directory `d`

    tok = HFTokenizer(d)
    tok.encode(tok.render_chat(messages, add_generation_prompt=g))
        == AutoTokenizer.from_pretrained(d).apply_chat_template(messages, add_generation_prompt=g)
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_JSON = "tokenizer.json"
CONFIG_JSON = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_JSON = "special_tokens_map.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, first is standard


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    """A config's special token: a string or an AddedToken dict; None for anything else (null, a bool)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_special_tokens(config: dict, directory: Path) -> dict[str, str]:
    """{"bos_token": "<｜begin▁of▁sentence｜>", ...}: what transformers passes the chat template."""
    tokens = {k: t for k, v in config.items() if k.endswith("_token") and (t := _token_text(v)) is not None}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        tokens |= {k: t for k, v in extra.items() if (t := _token_text(v)) is not None}
    if "added_tokens_decoder" not in config:  # transformers reads the legacy map only then
        legacy = _read_json(directory / SPECIAL_TOKENS_MAP_JSON)
        tokens |= {k: t for k, v in legacy.items() if (t := _token_text(v)) is not None}
    return tokens


def _chat_template(config: dict, directory: Path) -> str | None:
    jinja_file = directory / CHAT_TEMPLATE_JINJA
    template = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = {t["name"]: t["template"] for t in template}
    if isinstance(template, dict):
        template = template.get("default")
    return template


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: unlike jinja's own it does not HTML-escape
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _template_message(message: dict) -> dict:
    """As transformers hands a message to the template: keys whose value is None dropped, reasoning
    under each of its aliases."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class HFTokenizer:
    """`Tokenizer` backed by `tokenizers.Tokenizer.from_file(tokenizer.json)`.

    `path`: the json, or the directory holding it. bos / eos / pad are the config's tokens; a config
    without bos uses eos (Qwen's has none), one without pad uses eos. `vocab_size` counts the added
    tokens; a model's padded vocabulary rows above it decode to "".
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.model_file = path / TOKENIZER_JSON if path.is_dir() else path  # what `load_tokenizer` reads back
        directory = self.model_file.parent
        self._tok = tokenizers.Tokenizer.from_file(os.fspath(self.model_file))
        config = _read_json(directory / CONFIG_JSON)
        self.special_tokens = _named_special_tokens(config, directory)
        missing = [t for t in self.special_tokens.values() if self._tok.token_to_id(t) is None]
        if missing:  # transformers adds them too
            self._tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        self.chat_template = _chat_template(config, directory)
        self.add_bos_token = bool(config.get("add_bos_token", False))  # informational: encode never adds bos
        self.files = tuple(f for f in (self.model_file, *(directory / n for n in (
            CONFIG_JSON, SPECIAL_TOKENS_MAP_JSON, CHAT_TEMPLATE_JINJA))) if f.is_file())

        vocab = self._tok.get_vocab(with_added_tokens=True)
        # max(): a vocabulary with holes has ids beyond its count
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), 1 + max(vocab.values(), default=-1))
        if "eos_token" not in self.special_tokens:
            raise ValueError(f"{directory / CONFIG_JSON} names no eos_token")
        self.eos_id = vocab[self.special_tokens["eos_token"]]
        self.bos_id = vocab[self.special_tokens["bos_token"]] if "bos_token" in self.special_tokens else self.eos_id
        self.pad_id = vocab[self.special_tokens["pad_token"]] if "pad_token" in self.special_tokens else self.eos_id
        # Decoded by table, not by the decoder: a Metaspace decoder would turn their "▁" into spaces.
        self._added_text = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self._added_text:
                pieces += [self._tok.decode(run, skip_special_tokens=False), self._added_text[i]]
                run = []
            elif 0 <= i < self.vocab_size:
                run.append(i)
        pieces.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
        """The conversation in this tokenizer's chat template, as transformers renders it.

        Raises ValueError when there is no template or the template rejects the conversation."""
        if self.chat_template is None:
            raise ValueError(f"{self.model_file.parent} has no chat template ({CONFIG_JSON} chat_template "
                             f"or {CHAT_TEMPLATE_JINJA})")
        try:
            return _compiled(self.chat_template).render(
                messages=[_template_message(m) for m in messages], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
