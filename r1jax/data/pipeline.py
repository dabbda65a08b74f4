"""grain input pipeline: records -> per-process shard -> shuffle -> tokenize -> pack -> batch.

Each document is shifted *before* packing (inputs = ids[:-1], targets = ids[1:]), so every
target belongs to the same document as its input and no loss is ever taken across a
document boundary. A per-process batch is a dict of numpy arrays:

    inputs       [B, T] int32    token ids
    targets      [B, T] int32    the next token of the same document
    segment_ids  [B, T] int32    1, 2, 3, ... per document in the row; 0 on padding
    positions    [B, T] int32    position within the document, from 0
    loss_mask    [B, T] float32  1 where targets are trained on: 0 on padding and on
                                 SFT prompt tokens

Packing: "concat_split" (pretraining default) fills every row and splits long documents
across rows, positions restarting at 0 in the continuation; "first_fit" (SFT default)
never splits a conversation, truncates it to T tokens and pads rows instead.

`iter(dataset)` is a grain `DatasetIterator`: `get_state()` / `set_state()` resume it
exactly. Everything is deterministic given the seed.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import grain
import jax
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from r1jax.data.tokenizer import Tokenizer, encode_chat

FEATURES = ("inputs", "targets", "loss_mask")
Packing = Literal["concat_split", "first_fit"]


def _shift(ids: list[int], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Per-document next-token pairs; loss_mask[t] weighs predicting ids[t + 1]."""
    ids = np.asarray(ids, np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": weights[1:].astype(np.float32)}


def tokenize_text(record: str | Mapping, tokenizer: Tokenizer, *, text_key: str = "text") -> dict[str, np.ndarray]:
    """bos + text + eos; every target is trained on. `record` is a string or has `text_key`."""
    text = record if isinstance(record, str) else record[text_key]
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    return _shift(ids, np.ones(len(ids)))


def tokenize_chat(record: Mapping, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """`record["messages"]` through the chat template; only the final assistant turn is trained on."""
    ids, completion_start = encode_chat(tokenizer, record["messages"])
    return _shift(ids, np.arange(len(ids)) >= completion_start)


def _truncate(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    return {k: v[:seq_len] for k, v in example.items()}


def _finish_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = row["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs": row["inputs"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": row["inputs_positions"].astype(np.int32),
        "loss_mask": (row["loss_mask"] * (segment_ids > 0)).astype(np.float32),
    }


def packed_dataset(
    source: Any,
    tokenize: Callable[[Any], dict[str, np.ndarray]],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    packing: Packing = "concat_split",
    num_packing_bins: int = 16,
    pad_id: int = 0,
    shard: grain.sharding.ShardOptions | None = None,
) -> grain.IterDataset:
    """Batches of packed rows from a random-access `source` (see the module docstring).

    batch_size is per process; `shard` defaults to this JAX process's equal share
    (`ShardByJaxProcess`, dropping the remainder). num_epochs=None repeats forever,
    reshuffling each epoch. shuffle=False keeps source order (for tests and debugging).
    """
    shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    ds = grain.MapDataset.source(source)
    if shard.drop_remainder:
        ds = ds[: len(ds) // shard.shard_count * shard.shard_count]
    ds = ds[shard.shard_index :: shard.shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(tokenize)
    if packing == "first_fit":
        ds = ds.map(functools.partial(_truncate, seq_len=seq_len))
    it = ds.to_iter_dataset()
    lengths = {k: seq_len for k in FEATURES}
    if packing == "concat_split":
        it = ConcatThenSplitIterDataset(it, length_struct=lengths)
    elif packing == "first_fit":
        it = FirstFitPackIterDataset(
            it,
            length_struct=lengths,
            num_packing_bins=num_packing_bins,
            seed=seed,
            padding_struct={"inputs": pad_id, "targets": pad_id, "loss_mask": 0},
        )
    else:
        raise ValueError(f"unknown packing {packing!r}")
    return it.map(_finish_row).batch(batch_size, drop_remainder=True)


def pretrain_dataset(source: Any, tokenizer: Tokenizer, **kwargs) -> grain.IterDataset:
    """Text records (strings or {"text"}) packed for next-token pretraining."""
    kwargs.setdefault("packing", "concat_split")
    return packed_dataset(source, functools.partial(tokenize_text, tokenizer=tokenizer), pad_id=tokenizer.pad_id, **kwargs)


def sft_dataset(source: Any, tokenizer: Tokenizer, **kwargs) -> grain.IterDataset:
    """Chat records ({"messages"}) packed for SFT, loss on the final assistant turn only."""
    kwargs.setdefault("packing", "first_fit")
    return packed_dataset(source, functools.partial(tokenize_chat, tokenizer=tokenizer), pad_id=tokenizer.pad_id, **kwargs)


def to_global_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Lays this process's batch [B, T] onto `sharding`; the global batch is [B * processes, T]."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
