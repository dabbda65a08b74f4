"""The tokenizer and the train / held-out datasets a run config asks for.

`data.source: builtin` generates the verifiable tasks of `r1jax.data.tasks` (pretraining text or
cold-start SFT chats, by `mode`); otherwise a JSONL or ArrayRecord path whose records are
`data.format` (text, chat, or GSM8K, turned into R1-format chats).
"""

from __future__ import annotations

import glob
import itertools
from pathlib import Path

import jax

from r1jax.config import Config
from r1jax.data import pipeline
from r1jax.data.sources import ArrayRecordJsonSource, JsonlSource, gsm8k_chat, parse_chat, parse_gsm8k
from r1jax.data.tasks import corpus
from r1jax.data.tokenizer import SentencePieceTokenizer, Tokenizer, render_chat, train_sentencepiece

TOKENIZER_FILE = "tokenizer.model"


def task_options(cfg: Config) -> dict:
    """Keyword arguments of `corpus` generators for this run's built-in tasks."""
    return {"difficulties": tuple(range(1, cfg.data.max_difficulty + 1)), "tasks": tuple(cfg.data.tasks)}


def _builtin_texts(cfg: Config) -> list[str]:
    """What a built-in tokenizer is trained on: both the pretraining text and the chats (all
    difficulties, so one tokenizer serves every stage)."""
    n = min(cfg.data.builtin_docs, 4000)
    texts = list(corpus.pretrain_documents(n, cfg.seed))
    texts += [render_chat(r["messages"], add_generation_prompt=False) for r in corpus.sft_records(n, cfg.seed + 1)]
    return texts


def load_or_train_tokenizer(cfg: Config) -> Tokenizer:
    """`data.tokenizer` if set; else the tokenizer of `init_from` or of this run_dir; else one
    trained here on the built-in corpus and saved as run_dir/tokenizer.model."""
    candidates = [cfg.data.tokenizer] if cfg.data.tokenizer else []
    if cfg.init_from:
        candidates.append(str(Path(cfg.init_from) / TOKENIZER_FILE))
    candidates.append(str(Path(cfg.run_dir) / TOKENIZER_FILE))
    for path in candidates:
        if Path(path).is_file():
            return SentencePieceTokenizer(path)
    if cfg.data.tokenizer:
        raise FileNotFoundError(f"data.tokenizer: {cfg.data.tokenizer} does not exist")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text_file = run_dir / "tokenizer_corpus.txt"
    text_file.write_text("\n".join(_builtin_texts(cfg)), encoding="utf-8")
    tok = train_sentencepiece([text_file], cfg.data.vocab_size, run_dir / "tokenizer")
    text_file.unlink()
    return tok


def _file_source(pattern: str, fmt: str):
    paths = sorted(glob.glob(pattern)) or [pattern]
    parser = {"text": None, "chat": parse_chat, "gsm8k": lambda o: gsm8k_chat(parse_gsm8k(o))}[fmt]
    if paths[0].endswith(".array_record"):
        return ArrayRecordJsonSource(paths, parser=parser)
    if len(paths) > 1:
        raise ValueError(f"data.source: several JSONL files match {pattern!r}; concatenate them or use ArrayRecord")
    return JsonlSource(paths[0], parser=parser)


def _builtin_source(cfg: Config, split: str) -> list:
    n = cfg.data.builtin_docs if split == "train" else max(cfg.data.builtin_docs // 20, 64)
    if cfg.mode == "pretrain":
        if split == "train":
            return list(corpus.pretrain_documents(n, cfg.seed, **task_options(cfg)))
        stream = corpus.samples("eval", cfg.seed, **task_options(cfg))
        return [f"{s.question}\n{s.reasoning}\nAnswer: {s.answer}" for s in itertools.islice(stream, n)]
    if split == "train":
        return list(corpus.sft_records(n, cfg.seed + 1, **task_options(cfg)))
    return [
        {"messages": [{"role": "user", "content": s.question},
                      {"role": "assistant", "content": corpus.assistant_turn(s)}]}
        for s in itertools.islice(corpus.samples("eval", cfg.seed, **task_options(cfg)), n)
    ]


def make_dataset(cfg: Config, tokenizer: Tokenizer, split: str = "train", *, seed_offset: int = 0):
    """Batches of this process's share of the global batch (see `r1jax.data.pipeline`)."""
    chat = cfg.mode != "pretrain" or cfg.data.format != "text"
    if cfg.data.source == "builtin":
        source = _builtin_source(cfg, split)
    else:
        path = cfg.data.source if split == "train" else cfg.data.eval_source
        if path is None:
            return None
        source = _file_source(path, cfg.data.format)
    per_process = cfg.batch_size // jax.process_count()
    build = pipeline.sft_dataset if chat else pipeline.pretrain_dataset
    kwargs = dict(seq_len=cfg.seq_len, batch_size=per_process, seed=cfg.seed + seed_offset,
                  shuffle=cfg.data.shuffle and split == "train")
    if cfg.data.packing:
        kwargs["packing"] = cfg.data.packing
    return build(source, tokenizer, **kwargs)


def eval_batches(cfg: Config, tokenizer: Tokenizer) -> list[dict]:
    """A fixed list of held-out batches (the same every evaluation)."""
    ds = make_dataset(cfg, tokenizer, "eval")
    if ds is None:
        return []
    return list(itertools.islice(iter(ds), cfg.eval_batches))
