"""The tokenizer and the train / held-out datasets a run config asks for.

`data.source: builtin` generates the verifiable tasks of `r1jax.data.tasks` (pretraining text or
cold-start SFT chats, by `mode`); otherwise a JSONL or ArrayRecord path whose records are
`data.format` (text, chat, or GSM8K, turned into R1-format chats).

Bad input fails early and clearly: `data_source` checks a file in full when it opens it, so a
path that matches nothing is a ConfigError naming its key, and a malformed record a DataError
"file:line: problem" (the LM loop opens its sources before the tokenizer and any compile). With
`data.skip_bad_lines: true` malformed records are skipped instead, each logged, and counted
(`skipped_lines`).
"""

from __future__ import annotations

import glob
import itertools
import os
from pathlib import Path
from typing import Any

import jax

from r1jax.config import Config, ConfigError
from r1jax.data import pipeline
from r1jax.data.sources import (ArrayRecordJsonSource, JsonlSource, gsm8k_chat, parse_chat, parse_gsm8k,
                                parse_text)
from r1jax.data.tasks import corpus
from r1jax.data.tokenizer import Tokenizer, load_tokenizer, render_chat, save_tokenizer, train_sentencepiece

TOKENIZER_FILE = "tokenizer.model"


def task_options(cfg: Config) -> dict:
    """Keyword arguments of `corpus` generators for this run's built-in tasks."""
    return {"difficulties": tuple(range(1, cfg.data.max_difficulty + 1)), "tasks": tuple(cfg.data.tasks)}


def _builtin_texts(cfg: Config) -> list[str]:
    """What a built-in tokenizer is trained on: both the pretraining text and the chats (all
    difficulties, so one tokenizer serves every stage)."""
    n = min(cfg.data.builtin_docs, 4000)
    texts = list(corpus.pretrain_documents(n, cfg.seed, tagged=cfg.data.tagged_docs))
    texts += [render_chat(r["messages"], add_generation_prompt=False) for r in corpus.sft_records(n, cfg.seed + 1)]
    return texts


def load_or_train_tokenizer(cfg: Config) -> Tokenizer:
    """`data.tokenizer` if set (any path `load_tokenizer` opens: a .model, a tokenizer.json or a
    directory of either); else the tokenizer of `init_from` (its tokenizer.json or tokenizer.model)
    or of this run_dir; else one trained here on the built-in corpus and saved as run_dir/tokenizer.model.
    One found elsewhere is copied into run_dir, so the run's checkpoints carry their tokenizer."""
    if cfg.data.tokenizer:
        if not Path(cfg.data.tokenizer).exists():
            raise ConfigError("data.tokenizer", f"{cfg.data.tokenizer} does not exist")
        try:
            return _kept_in_run_dir(load_tokenizer(cfg.data.tokenizer), cfg)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError("data.tokenizer", str(e)) from None
    directories = [Path(cfg.init_from)] if cfg.init_from else []
    directories.append(Path(cfg.run_dir))
    for directory in directories:
        if (directory / "tokenizer.json").is_file() or (directory / TOKENIZER_FILE).is_file():
            return _kept_in_run_dir(load_tokenizer(directory), cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text_file = run_dir / "tokenizer_corpus.txt"
    text_file.write_text("\n".join(_builtin_texts(cfg)), encoding="utf-8")
    tok = train_sentencepiece([text_file], cfg.data.vocab_size, run_dir / "tokenizer")
    text_file.unlink()
    return tok


def _kept_in_run_dir(tokenizer: Tokenizer, cfg: Config) -> Tokenizer:
    run_dir = Path(cfg.run_dir)
    has_own = (run_dir / "tokenizer.json").is_file() or (run_dir / TOKENIZER_FILE).is_file()
    if not has_own and jax.process_index() == 0:
        save_tokenizer(tokenizer, run_dir)
    return tokenizer


def _gsm8k(obj: Any) -> dict:
    return gsm8k_chat(parse_gsm8k(obj))


def _file_source(pattern: str, fmt: str, *, key: str = "data.source", skip_bad_lines: bool = False):
    """The records of a .jsonl / .array_record path (or glob), every one parsed here once."""
    paths = sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else [])
    if not paths:
        raise ConfigError(key, f"{pattern} does not exist (no file matches)")
    not_files = [p for p in paths if not os.path.isfile(p)]
    if not_files:
        raise ConfigError(key, f"{not_files[0]} is not a file (a .jsonl or .array_record file or glob is expected)")
    parser = {"text": parse_text, "chat": parse_chat, "gsm8k": _gsm8k}[fmt]
    check = dict(validate=True, skip_bad_lines=skip_bad_lines)
    if paths[0].endswith(".array_record"):
        source = ArrayRecordJsonSource(paths, parser=parser, **check)
    elif len(paths) > 1:
        raise ConfigError(key, f"several JSONL files match {pattern!r}; concatenate them or use ArrayRecord")
    else:
        source = JsonlSource(paths[0], parser=parser, **check)
    if not len(source):
        skipped = f" ({len(source.skipped)} malformed, skipped)" if source.skipped else ""
        raise ConfigError(key, f"{pattern} holds no {fmt} records{skipped}")
    return source


def _builtin_source(cfg: Config, split: str) -> list:
    n = cfg.data.builtin_docs if split == "train" else max(cfg.data.builtin_docs // 20, 64)
    if cfg.mode == "pretrain":
        if split == "train":
            return list(corpus.pretrain_documents(n, cfg.seed, tagged=cfg.data.tagged_docs, **task_options(cfg)))
        stream = corpus.samples("eval", cfg.seed, **task_options(cfg))
        return [f"{s.question}\n{s.reasoning}\nAnswer: {s.answer}" for s in itertools.islice(stream, n)]
    if split == "train":
        return list(corpus.sft_records(n, cfg.seed + 1, **task_options(cfg)))
    return [
        {"messages": [{"role": "user", "content": s.question},
                      {"role": "assistant", "content": corpus.assistant_turn(s)}]}
        for s in itertools.islice(corpus.samples("eval", cfg.seed, **task_options(cfg)), n)
    ]


def data_source(cfg: Config, split: str = "train"):
    """The records of `split` (random access), or None when there is no held-out file.

    A file is opened and checked in full here: see the module docstring."""
    if cfg.data.source == "builtin":
        return _builtin_source(cfg, split)
    key = "data.source" if split == "train" else "data.eval_source"
    path = cfg.data.source if split == "train" else cfg.data.eval_source
    if path is None:
        return None
    if cfg.mode != "pretrain" and cfg.data.format == "text":
        raise ConfigError("data.format", f"mode {cfg.mode} trains on chat or gsm8k records, not text")
    return _file_source(path, cfg.data.format, key=key, skip_bad_lines=cfg.data.skip_bad_lines)


def skipped_lines(*sources) -> int:
    """How many malformed records these sources skipped (`data.skip_bad_lines`)."""
    return sum(len(getattr(s, "skipped", ())) for s in sources if s is not None)


def make_dataset(cfg: Config, tokenizer: Tokenizer, split: str = "train", *, seed_offset: int = 0, source=None):
    """Batches of this process's share of the global batch (see `r1jax.data.pipeline`), from
    `source` (default: `data_source(cfg, split)`); None when there is no held-out file."""
    chat = cfg.mode != "pretrain" or cfg.data.format != "text"
    source = data_source(cfg, split) if source is None else source
    if source is None:
        return None
    per_process = cfg.batch_size // jax.process_count()
    build = pipeline.sft_dataset if chat else pipeline.pretrain_dataset
    kwargs = dict(seq_len=cfg.seq_len, batch_size=per_process, seed=cfg.seed + seed_offset,
                  shuffle=cfg.data.shuffle and split == "train")
    if cfg.data.packing:
        kwargs["packing"] = cfg.data.packing
    return build(source, tokenizer, **kwargs)


def eval_batches(cfg: Config, tokenizer: Tokenizer, *, source=None) -> list[dict]:
    """A fixed list of held-out batches (the same every evaluation)."""
    ds = make_dataset(cfg, tokenizer, "eval", source=source)
    if ds is None:
        return []
    return list(itertools.islice(iter(ds), cfg.eval_batches))
