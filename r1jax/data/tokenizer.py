"""Tokenizer interface, a SentencePiece implementation, and the R1 chat template.

`load_tokenizer(path)` opens either kind: a SentencePiece `.model` trained here, or a Hugging Face
`tokenizer.json` with its `tokenizer_config.json` (`r1jax.data.hf_tokenizer.HFTokenizer`). Each
renders conversations in its own chat template (`Tokenizer.render_chat`): r1jax's `render_chat`
below for SentencePiece, the config's jinja template (DeepSeek-R1's, say) for Hugging Face.

The R1 markers (bos, eos, turn markers, think/answer tags) are SentencePiece
user-defined symbols, so they are single ids wherever they appear in text, including
text rendered by `render_chat`. Byte fallback makes every string encodable.

Train from text files:

    python -m r1jax.data.tokenizer train --input corpus.txt --vocab-size 4096 --output tok

writes `tok.model`; load it with `SentencePieceTokenizer("tok.model")`.

Known lossy case: SentencePiece uses U+2581 ("▁") as its whitespace symbol, so a literal
"▁" in plain text decodes as a space. The markers containing "▁" are decoded exactly.
"""
from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<pad>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
# Order fixes their ids: pad 0, unk 1, then these from 2 on.
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, ANSWER_START, ANSWER_END)

# DeepSeek-R1 paper, Table 1 (spec §6).
R1_ZERO_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of r1jax needs from a tokenizer: `SentencePieceTokenizer` or `HFTokenizer`.

    `encode` adds no special tokens; `decode` writes special tokens' text and drops ids at or above
    `vocab_size` (a model's padded vocabulary); `render_chat` is the tokenizer's chat template.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool) -> str: ...


class SentencePieceTokenizer:
    """`Tokenizer` backed by a SentencePiece model trained by `train_sentencepiece`."""

    def __init__(self, model_file: str | os.PathLike):
        self.model_file = os.fspath(model_file)
        self.files = (Path(self.model_file),)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.vocab_size = self._sp.vocab_size()
        self.pad_id = self._sp.pad_id()
        self.bos_id = self._required_id(BOS)
        self.eos_id = self._required_id(EOS)
        # Decoded by table: SentencePiece would turn the "▁" inside bos/eos into spaces.
        self._special_text = {self._required_id(t): t for t in SPECIAL_TOKENS}

    def _required_id(self, token: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.model_file} has no {token!r} token; train it with r1jax")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._special_text:
                pieces += [self._sp.decode(run), self._special_text[i]]
                run = []
            elif i != self.pad_id and 0 <= i < self.vocab_size:  # a model's padded vocab rows decode to ""
                run.append(i)
        pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)  # unknown pieces map to unk
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
        return render_chat(messages, add_generation_prompt=add_generation_prompt)

    def __getstate__(self):  # the SWIG processor does not pickle; grain workers may need to
        return {"model_file": self.model_file}

    def __setstate__(self, state):
        self.__init__(state["model_file"])


def train_sentencepiece(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    output_prefix: str | os.PathLike,
    *,
    model_type: str = "bpe",
) -> SentencePieceTokenizer:
    """Trains a byte-fallback SentencePiece model on text files; writes `{prefix}.model`."""
    spm.SentencePieceTrainer.train(
        input=[os.fspath(p) for p in inputs],
        model_prefix=os.fspath(output_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        user_defined_symbols=list(SPECIAL_TOKENS),
        pad_id=0,
        unk_id=1,
        bos_id=-1,  # bos/eos are user-defined symbols instead, so they are atomic in text
        eos_id=-1,
        pad_piece=PAD,
        # Identity normalisation and kept whitespace so decode(encode(s)) == s.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return SentencePieceTokenizer(f"{os.fspath(output_prefix)}.model")


def render_chat(
    messages: Sequence[dict], *, add_generation_prompt: bool, add_bos: bool = True
) -> str:
    """r1jax's R1 chat template (the SentencePiece tokenizer's), as text.

    `bos system <｜User｜>u1<｜Assistant｜>a1 eos <｜User｜>u2<｜Assistant｜>` — a system
    message, if any, comes first and has no marker; each assistant turn ends with eos;
    `add_generation_prompt` appends `<｜Assistant｜>` for the model to continue. Unlike
    DeepSeek-R1's own template it keeps earlier turns' reasoning and does not open `<think>`.
    """
    parts = [BOS] if add_bos else []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            if i != 0:
                raise ValueError("a system message may only come first")
            parts.append(content)
        elif role == "user":
            parts += [USER, content]
        elif role == "assistant":
            parts += [ASSISTANT, content, EOS]
        else:
            raise ValueError(f"unknown role {role!r}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def chat_text(tokenizer: Tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
    """`tokenizer.render_chat(messages, ...)`; a duck-typed stand-in without `render_chat` (the
    tests' character tokenizers) gets r1jax's `render_chat`."""
    render = getattr(tokenizer, "render_chat", None)
    if render is None:
        return render_chat(messages, add_generation_prompt=add_generation_prompt)
    return render(messages, add_generation_prompt=add_generation_prompt)


_FINAL_TURN = "\x00r1jax final turn\x00"  # a placeholder no template rewrites


def _keeps_reasoning(content: str, rendered: str) -> bool:
    """Whether the rendering of an assistant turn kept the turn's reasoning, if it has any."""
    if THINK_END not in content:
        return True
    reasoning = content.split(THINK_END)[0].split(THINK_START)[-1].strip()
    return THINK_END in rendered and reasoning in rendered


def chat_prompt_and_completion(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[str, str]:
    """(prompt, completion) texts of a conversation ending in an assistant turn.

    The prompt is `messages[:-1]` with the generation prompt, as at inference; the completion is
    what follows it in the rendering of the whole conversation (as TRL does), with two departures
    so that SFT trains on the final turn's reasoning as the model has to write it:
    - a template that rewrites the final assistant turn's reasoning (DeepSeek-R1's keeps only what
      follows `</think>`, so that earlier turns' reasoning leaves the context) gets that turn's
      content back verbatim: the turn is rendered around a placeholder, then the content put in;
    - a generation prompt that ends in whitespace the content lacks (R1's `<｜Assistant｜><think>\\n`
      before content `<think>reasoning…`) is matched without it; the completion then starts at the
      first non-space after the opening tag.
    Raises ValueError when the final turn does not continue the generation prompt (R1's template and
    content that does not open with `<think>`).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's completion")
    prompt = chat_text(tokenizer, messages[:-1], add_generation_prompt=True)
    content = messages[-1]["content"]
    full = chat_text(tokenizer, messages, add_generation_prompt=False)
    if not (full.startswith(prompt) and _keeps_reasoning(content, full[len(prompt):])):
        marked = chat_text(tokenizer, [*messages[:-1], {**messages[-1], "content": _FINAL_TURN}],
                           add_generation_prompt=False)
        if marked.count(_FINAL_TURN) == 1:
            full = marked.replace(_FINAL_TURN, content)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    opened = prompt.rstrip()
    if opened != prompt and full.startswith(opened):
        return prompt, full[len(opened):].lstrip()
    raise ValueError(f"the final assistant turn does not continue the chat template's generation prompt "
                     f"(...{prompt[-20:]!r}): it renders as {full[len(os.path.commonprefix([prompt, full])):][:40]!r}")


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], int]:
    """Token ids of a conversation ending in an assistant turn, and where that turn starts.

    Returns (ids, completion_start): ids[:completion_start] encode the prompt exactly as inference
    does, ids[completion_start:] the completion (the final assistant turn and its end-of-turn
    tokens, `chat_prompt_and_completion`), the tokens SFT trains on. ids is the encoding of
    prompt + completion in one piece unless that merges tokens across the boundary; then the two
    are encoded apart. With r1jax's template and `<｜Assistant｜>` atomic, ids equals
    `tokenizer.encode(render_chat(messages, add_generation_prompt=False))`.
    """
    prompt, completion = chat_prompt_and_completion(tokenizer, messages)
    prompt_ids = tokenizer.encode(prompt)
    ids = tokenizer.encode(prompt + completion)
    if ids[:len(prompt_ids)] != prompt_ids:
        ids = prompt_ids + tokenizer.encode(completion)
    return ids, len(prompt_ids)


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt of the paper (plain text, no chat markers); the model continues it."""
    return f"{R1_ZERO_SYSTEM_PROMPT} User: {question} Assistant:"


def r1_zero_messages(question: str) -> list[dict]:
    """The same instruction as chat messages, for `render_chat(..., add_generation_prompt=True)`."""
    return [{"role": "system", "content": R1_ZERO_SYSTEM_PROMPT}, {"role": "user", "content": question}]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at `path`: a SentencePiece `.model` file; a `tokenizer.json` file (its
    `tokenizer_config.json` beside it); or a directory holding `tokenizer.json` (preferred) or a
    SentencePiece `tokenizer.model`."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        else:
            raise FileNotFoundError(f"{path} holds neither tokenizer.json nor tokenizer.model")
    elif not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        from r1jax.data.hf_tokenizer import HFTokenizer  # tokenizers and jinja2 only when needed

        return HFTokenizer(path)
    raise ValueError(f"{path} is not a tokenizer (a SentencePiece .model or a tokenizer.json is expected)")


def find_tokenizer(candidates: Iterable[str | os.PathLike | None]) -> Tokenizer | None:
    """The tokenizer of the first candidate that holds one (a file, or a directory with
    tokenizer.json or tokenizer.model); None and empty entries are skipped. None if none does."""
    for candidate in candidates:
        if candidate:
            try:
                return load_tokenizer(candidate)
            except FileNotFoundError:
                continue
    return None


def tokenizer_files(tokenizer: Tokenizer) -> list[Path]:
    """The files that define `tokenizer` (the .model; or tokenizer.json, tokenizer_config.json and
    what else of the Hugging Face set exists), to copy beside a checkpoint."""
    files = getattr(tokenizer, "files", None)
    if files is None:
        raise TypeError(f"{type(tokenizer).__name__} is not loaded from files")
    return list(files)


def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike) -> list[Path]:
    """Copies `tokenizer_files(tokenizer)` into `directory` so that `load_tokenizer(directory)` opens
    it (the model file is written as tokenizer.model or tokenizer.json). Returns the written paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    files = tokenizer_files(tokenizer)
    for f in files:  # the first is the model: a .model or a tokenizer.json under any name
        target = directory / ({".model": "tokenizer.model", ".json": "tokenizer.json"}[f.suffix] if f == files[0]
                              else f.name)
        if not (target.exists() and target.samefile(f)):
            shutil.copyfile(f, target)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m r1jax.data.tokenizer")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SentencePiece model on text files")
    train.add_argument("--input", action="append", required=True, help="text file (repeatable)")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, help="writes OUTPUT.model and OUTPUT.vocab")
    train.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    args = parser.parse_args(argv)
    tokenizer = train_sentencepiece(args.input, args.vocab_size, args.output, model_type=args.model_type)
    print(f"wrote {tokenizer.model_file} (vocab {tokenizer.vocab_size})")


if __name__ == "__main__":
    main()
