"""Tokenizer interface, a SentencePiece implementation, and the R1 chat template.

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
from collections.abc import Iterable, Sequence
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
    """What the rest of r1jax needs from a tokenizer (SentencePiece now, HF json later)."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class SentencePieceTokenizer:
    """`Tokenizer` backed by a SentencePiece model trained by `train_sentencepiece`."""

    def __init__(self, model_file: str | os.PathLike):
        self.model_file = os.fspath(model_file)
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
    """The one R1 chat template (DeepSeek-R1's tokenizer_config), as text.

    `bos system <｜User｜>u1<｜Assistant｜>a1 eos <｜User｜>u2<｜Assistant｜>` — a system
    message, if any, comes first and has no marker; each assistant turn ends with eos;
    `add_generation_prompt` appends `<｜Assistant｜>` for the model to continue.
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


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], int]:
    """Token ids of a conversation ending in an assistant turn, and where that turn starts.

    Returns (ids, completion_start): ids[completion_start:] are the final assistant
    content and its eos, the tokens SFT trains on. Because `<｜Assistant｜>` is atomic,
    ids equals `tokenizer.encode(render_chat(messages, add_generation_prompt=False))`.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's completion")
    prompt = tokenizer.encode(render_chat(messages[:-1], add_generation_prompt=True))
    completion = tokenizer.encode(messages[-1]["content"]) + [tokenizer.eos_id]
    return prompt + completion, len(prompt)


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt of the paper (plain text, no chat markers); the model continues it."""
    return f"{R1_ZERO_SYSTEM_PROMPT} User: {question} Assistant:"


def r1_zero_messages(question: str) -> list[dict]:
    """The same instruction as chat messages, for `render_chat(..., add_generation_prompt=True)`."""
    return [{"role": "system", "content": R1_ZERO_SYSTEM_PROMPT}, {"role": "user", "content": question}]


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
