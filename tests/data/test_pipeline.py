"""grain pipeline: packing layout, loss masks, determinism, resume, global batches."""
import json
import re

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from r1jax.data import pipeline
from r1jax.data.sources import JsonlSource
from r1jax.data.tokenizer import SPECIAL_TOKENS

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class CharTokenizer:
    """Toy tokenizer independent of SentencePiece: markers -> 3..10, other chars -> code points."""

    pad_id, vocab_size = 0, 0x110000

    def __init__(self):
        self.ids = {t: 3 + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.bos_id, self.eos_id = self.ids[SPECIAL_TOKENS[0]], self.ids[SPECIAL_TOKENS[1]]
        self._markers = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")

    def encode(self, text):
        parts = self._markers.split(text)
        return [i for p in parts for i in ([self.ids[p]] if p in self.ids else map(ord, p))]

    def decode(self, ids):
        raise NotImplementedError

    def token_to_id(self, token):
        return self.ids.get(token)


TOK = CharTokenizer()
B, E, U, A = TOK.bos_id, TOK.eos_id, TOK.ids["<｜User｜>"], TOK.ids["<｜Assistant｜>"]


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def as_lists(batch):
    return {k: batch[k].tolist() for k in KEYS}


def test_pretrain_rows_match_hand_packing():
    ds = pipeline.pretrain_dataset(["ab", "cde", "f"], TOK, seq_len=4, batch_size=1, seed=0, shuffle=False, num_epochs=1)
    a, b, c, d, e, f = map(ord, "abcdef")
    # documents: [B a b E], [B c d e E], [B f E]; each shifted before packing, split across rows
    expected = [
        dict(inputs=[B, a, b, B], targets=[a, b, E, c], segment_ids=[1, 1, 1, 2], positions=[0, 1, 2, 0], loss_mask=[1, 1, 1, 1]),
        dict(inputs=[c, d, e, B], targets=[d, e, E, f], segment_ids=[1, 1, 1, 2], positions=[0, 1, 2, 0], loss_mask=[1, 1, 1, 1]),
        dict(inputs=[f, 0, 0, 0], targets=[E, 0, 0, 0], segment_ids=[1, 0, 0, 0], positions=[0, 0, 0, 0], loss_mask=[1, 0, 0, 0]),
    ]
    rows = [as_lists(batch) for batch in ds]
    assert rows == [{k: [v] for k, v in row.items()} for row in expected]


def test_sft_rows_match_hand_packing():
    ds = pipeline.sft_dataset(
        [chat("hi", "ok"), chat("yo", "k")], TOK, seq_len=16, batch_size=1, seed=0,
        shuffle=False, num_epochs=1, num_packing_bins=1,
    )
    h, i, o, k, y = map(ord, "hioky")
    # [B U h i A o k E]: the completion "o k E" starts at index 5, so targets 4..6 are trained
    # [B U y o A k E]:   completion "k E" starts at index 5, targets 4..5 trained
    expected = dict(
        inputs=[B, U, h, i, A, o, k, B, U, y, o, A, k, 0, 0, 0],
        targets=[U, h, i, A, o, k, E, U, y, o, A, k, E, 0, 0, 0],
        segment_ids=[1] * 7 + [2] * 6 + [0] * 3,
        positions=list(range(7)) + list(range(6)) + [0] * 3,
        loss_mask=[0, 0, 0, 0, 1, 1, 1] + [0, 0, 0, 0, 1, 1] + [0, 0, 0],
    )
    rows = [as_lists(batch) for batch in ds]
    assert rows == [{k: [v] for k, v in expected.items()}]


def test_sft_truncates_to_seq_len():
    ds = pipeline.sft_dataset([chat("q", "x" * 50)], TOK, seq_len=8, batch_size=1, seed=0, num_epochs=1)
    (batch,) = list(ds)
    assert batch["segment_ids"].tolist() == [[1] * 8]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]  # [B U q A x x x x], completion from index 4


def documents(n):
    rng = np.random.default_rng(0)
    return ["".join(chr(97 + j) for j in rng.integers(0, 26, rng.integers(1, 30))) for _ in range(n)]


def chats(n):
    return [chat(q, q[::-1] + "!") for q in documents(n)]


def check_invariants(batch, seq_len):
    for key in KEYS:
        assert batch[key].shape[1] == seq_len
    assert batch["loss_mask"].dtype == np.float32 and batch["inputs"].dtype == np.int32
    padding = batch["segment_ids"] == 0
    assert (batch["loss_mask"][padding] == 0).all()
    # within a segment positions count up from 0, and a new segment starts at 0
    seg, pos = batch["segment_ids"], batch["positions"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    assert (pos[:, 1:][same] == pos[:, :-1][same] + 1).all()
    assert (pos[:, 1:][(seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)] == 0).all()


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_same_seed_same_batches_and_resume(kind):
    def build(seed):
        if kind == "pretrain":
            return pipeline.pretrain_dataset(documents(40), TOK, seq_len=32, batch_size=4, seed=seed)
        return pipeline.sft_dataset(chats(40), TOK, seq_len=48, batch_size=4, seed=seed, num_packing_bins=4)

    def take(it, n):
        return [next(it) for _ in range(n)]

    first = take(iter(build(7)), 12)  # 12 batches run past the end of the first epoch
    again = take(iter(build(7)), 12)
    other = take(iter(build(8)), 12)
    for x, y in zip(first, again):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(first, other))
    for batch in first:
        check_invariants(batch, batch["inputs"].shape[1])

    it = iter(build(7))
    take(it, 5)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON
    resumed = iter(build(7))
    resumed.set_state(state)
    for x, y in zip(first[5:], take(resumed, 7)):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])


def test_process_shards_are_disjoint_and_cover_the_data():
    docs = [chr(0x400 + i) for i in range(30)]  # one distinct token per document

    def tokens(shard_index):
        shard = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=3, drop_remainder=True)
        ds = pipeline.pretrain_dataset(docs, TOK, seq_len=8, batch_size=1, seed=0, num_epochs=1, shard=shard)
        return {chr(t) for batch in ds for t in batch["inputs"].ravel() if t >= 0x400}

    shards = [tokens(i) for i in range(3)]
    assert [len(s) for s in shards] == [10, 10, 10]
    assert set().union(*shards) == set(docs)


def test_jsonl_source_feeds_the_pipeline(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(20)))
    ds = pipeline.pretrain_dataset(JsonlSource(path), TOK, seq_len=16, batch_size=2, seed=0, num_epochs=1)
    batches = list(ds)
    assert batches and all(b["inputs"].shape == (2, 16) for b in batches)


def test_to_global_batch_on_a_device_mesh():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    ds = pipeline.pretrain_dataset(documents(40), TOK, seq_len=16, batch_size=8, seed=0)
    batch = next(iter(ds))
    global_batch = pipeline.to_global_batch(batch, sharding)
    for key in KEYS:
        array = global_batch[key]
        assert array.shape == (8 * jax.process_count(), 16) and array.dtype == batch[key].dtype
        assert array.sharding == sharding
        assert len(array.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(array), batch[key])
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), batch[key][shard.index])
