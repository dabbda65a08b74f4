"""Rejection sampling: scripted completions of built-in-task prompts are kept exactly when correct,
well formed, finished and new; the JSONL written goes back through the SFT pipeline; one small
run on the real engine is independent of the batching."""

import json
import re

import numpy as np
import pytest

from r1jax import config as config_lib
from r1jax.data import pipeline
from r1jax.data.datasets import make_dataset
from r1jax.data.sources import JsonlSource, parse_chat
from r1jax.data.tasks import check_record
from r1jax.data.tokenizer import SPECIAL_TOKENS, encode_chat
from r1jax.sampling.engine import Completion
from r1jax.train import rejection
from r1jax.train.grpo import prompt_records

K = 6


class CharTokenizer:
    """One id per character (code point), the R1 markers 1000..1007: independent of SentencePiece."""

    pad_id, vocab_size = 0, 1024

    def __init__(self):
        self.ids = {t: 1000 + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.tokens = {i: t for t, i in self.ids.items()}
        self.bos_id, self.eos_id = self.ids[SPECIAL_TOKENS[0]], self.ids[SPECIAL_TOKENS[1]]
        self._markers = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")

    def encode(self, text):
        return [i for p in self._markers.split(text) for i in ([self.ids[p]] if p in self.ids else map(ord, p))]

    def decode(self, ids):
        return "".join(self.tokens.get(i, chr(i)) for i in ids)

    def token_to_id(self, token):
        return self.ids.get(token)


TOK = CharTokenizer()
CFG = config_lib.load("configs/tiny-grpo.yaml", "data.max_difficulty=1")


@pytest.fixture(scope="module")
def prompts():
    return prompt_records(CFG, TOK, "train", 9)


def well_formed(text):
    """R1's format, written out here: one think block, then one answer block, nothing else."""
    return re.fullmatch(r"\s*<think>[^<>]*</think>\s*<answer>[^<>]*</answer>\s*", text) is not None


def scripted(prompt, i):
    """K completions of prompt i: right ones, a duplicate, a wrong one, an unformatted right one,
    a cut-off right one. Every third prompt gets only wrong or unformatted ones."""
    right, wrong = prompt["answer"], "-12345"
    if i % 3 == 2:
        return [f"<think>guess</think> <answer>{wrong}</answer>", f"<answer>{right}</answer>",
                f"<think>a</think><think>b</think> <answer>{right}</answer>", f"{right}",
                "<think>no answer</think>", Completion([], [], "length", f"<think>x</think> <answer>{right}</answer>")]
    first = f"<think>Überlegung: Schritt für Schritt.</think> <answer>{right}</answer>"
    return [first, f"<think>guess</think> <answer>{wrong}</answer>", first,
            f"<answer>{right}</answer>", f"<think>Work it out step by step.</think>\n<answer>{right}</answer>",
            Completion([1, 2], [0.0, 0.0], "length", f"<think>cut</think> <answer>{right}</answer>")]


def scripted_generate(calls):
    def generate_fn(batch, k):
        assert k == K
        calls.append(len(batch))
        return [scripted(p, int(p["_i"])) for p in batch]
    return generate_fn


def expected_kept(prompts):
    """What must be kept, from the task checkers and the format written above: correct, well
    formed, finished, first of identical texts."""
    out = []
    for i, p in enumerate(prompts):
        seen = set()
        for c in scripted(p, i):
            text, cut = (c, False) if isinstance(c, str) else (c.text, True)
            if check_record(text, p) and well_formed(text) and not cut and text not in seen:
                seen.add(text)
                out.append((i, text))
    return out


def indexed(prompts):
    return [{**p, "_i": i} for i, p in enumerate(prompts)]


def test_keeps_exactly_the_correct_well_formed_unique_finished_samples(prompts, tmp_path):
    calls = []
    out = tmp_path / "kept.jsonl"
    kept, stats = rejection.rejection_sample(scripted_generate(calls), indexed(prompts), k=K, batch_prompts=4,
                                             out_path=out)
    want = expected_kept(prompts)
    assert len(want) == 2 * 6  # two distinct good samples for each of the 6 "good" prompts
    assert calls == [4, 4, 1]
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in kept] == \
        [(prompts[i]["question"], text) for i, text in want]
    for r, (i, _) in zip(kept, want):
        assert r["task"] == prompts[i]["task"] and r["answer"] == prompts[i]["answer"]
        assert r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"
        assert r["rewards"] == {"accuracy": 1.0, "format": 1.0}
        assert "_i" not in r
    assert [json.loads(line) for line in out.read_text().splitlines()] == kept
    assert stats["prompts"] == 9 and stats["samples"] == 9 * K and stats["kept"] == 12
    assert stats["duplicates"] == 6 and stats["truncated"] == 9 and stats["prompts_with_kept"] == 6
    assert sum(s["kept"] for s in stats["per_task"].values()) == 12
    assert set(stats["per_task"]) == {p["task"] for p in prompts}
    texts = [(c if isinstance(c, str) else c.text, p) for i, p in enumerate(prompts) for c in scripted(p, i)]
    # accuracy_reward grades only a tagged (or boxed) answer; a bare one scores 0
    accuracy = [check_record(t, p) and "<answer>" in t for t, p in texts]
    assert stats["rewards"]["accuracy"]["mean"] == pytest.approx(np.mean(accuracy))
    assert stats["rewards"]["format"]["mean"] == pytest.approx(np.mean([well_formed(t) for t, _ in texts]))
    assert stats["failed_rewards"] == []
    assert "kept 12" in rejection.format_stats(stats)


def test_output_reads_back_through_the_sft_pipeline(prompts, tmp_path):
    out = tmp_path / "kept.jsonl"
    kept, _ = rejection.rejection_sample(scripted_generate([]), indexed(prompts), k=K, out_path=out)
    source = JsonlSource(out, parse_chat)
    assert len(source) == len(kept) and [source[i] for i in range(len(source))] == kept
    # The prompt SFT trains under is exactly the one sampled from.
    by_question = {p["question"]: p for p in prompts}
    for r in kept:
        ids, start = encode_chat(TOK, r["messages"])
        assert ids[:start] == by_question[r["messages"][0]["content"]]["prompt_ids"]
    ds = pipeline.sft_dataset(source, TOK, seq_len=512, batch_size=1, seed=0, shuffle=False, num_epochs=1)
    trained = []
    for batch in ds:
        trained += batch["targets"][0][batch["loss_mask"][0] > 0].tolist()
    completions = TOK.decode(trained).split(SPECIAL_TOKENS[1])  # eos ends every trained completion
    assert completions[-1] == "" and sorted(completions[:-1]) == sorted(r["messages"][1]["content"] for r in kept)
    # ...and as a run config names it.
    cfg = config_lib.load("configs/tiny-sft.yaml", f"data.source={out}", "data.format=chat", "batch_size=2",
                          "seq_len=256", "mesh.data=1")
    batch = next(iter(make_dataset(cfg, TOK)))
    assert batch["inputs"].shape == (2, 256) and batch["loss_mask"].sum() > 0


def test_thresholds_cap_and_order(prompts):
    good = indexed(prompts[:2])
    # The first right answer reasons half in German: language consistency 0.5 < 0.9.
    kept, stats = rejection.rejection_sample(scripted_generate([]), good, {"accuracy": 1.0, "format": 1.0,
                                             "language_consistency": 0.9}, k=K)
    assert [r["messages"][1]["content"].startswith("<think>Work it out") for r in kept] == [True, True]
    assert stats["rewards"]["language_consistency"]["threshold"] == 0.9
    # At most one per prompt: the highest summed rewards win (the English one), not sample order.
    kept, _ = rejection.rejection_sample(scripted_generate([]), good, {"accuracy": 1.0, "language_consistency": 0.0},
                                         k=K, max_per_prompt=1)
    assert len(kept) == 2 and all(r["messages"][1]["content"].startswith("<think>Work it out") for r in kept)
    # Without dedupe the duplicate stays; keep_truncated keeps the cut-off one too.
    kept, stats = rejection.rejection_sample(scripted_generate([]), good, k=K, dedupe=False, keep_truncated=True)
    assert len(kept) == 2 * 4 and stats["duplicates"] == 0


def test_none_and_failing_rewards(prompts):
    good = indexed(prompts[:2])

    def maybe(prompts_, completions, **columns):
        return [None if "guess" in c else 1.0 for c in completions]

    def broken(prompts_, completions, **columns):
        raise RuntimeError("boom")

    kept, _ = rejection.rejection_sample(scripted_generate([]), good, {"maybe": (maybe, 1.0)}, k=K)
    assert len(kept) == 2 * 3  # the two distinct well-formed ones + the unformatted right one; not the guess
    kept, _ = rejection.rejection_sample(scripted_generate([]), good, {"maybe": (maybe, 1.0)}, k=K, none_passes=True)
    assert len(kept) == 2 * 4 and any(r["rewards"]["maybe"] is None for r in kept)
    kept, stats = rejection.rejection_sample(scripted_generate([]), good, {"accuracy": 1.0, "broken": (broken, 0.0)},
                                             k=K)
    assert kept == [] and stats["failed_rewards"] == ["broken"]
    with pytest.raises(ValueError, match="neither built-in"):
        rejection.rejection_sample(scripted_generate([]), good, {"nonsense": 1.0}, k=K)


def test_rewards_run_in_the_sandbox_and_a_crash_rejects_only_its_batch(prompts):
    """With a sandbox, the reward runs in a worker process (its pid is not ours) and a segfault
    there rejects the batch instead of killing the caller."""
    import os

    from r1jax.train.reward_sandbox import RewardSandbox
    from tests.train import reward_fixtures as fx

    good = indexed(prompts[:2])
    with RewardSandbox(workers=1, memory_mb=1024) as sandbox:
        kept, _ = rejection.rejection_sample(scripted_generate([]), good, {"pid": (fx.worker_pid, 0.0)}, k=K,
                                             sandbox=sandbox)
        assert kept and all(r["rewards"]["pid"] != float(os.getpid()) for r in kept)
        kept, stats = rejection.rejection_sample(scripted_generate([]), good, {"accuracy": 1.0, "crash": (fx.segfault, 0.0)},
                                                 k=K, sandbox=sandbox, timeout_s=20)
        assert kept == [] and stats["failed_rewards"] == ["crash"]


def test_cli_arguments():
    args = rejection.parse(["cfg.yaml", "checkpoint=runs/x", "out=o.jsonl", "k=4", "min.format=0.5",
                            "min.my.pkg:fn=0.25", "seq_len=64", "data.max_difficulty=2", "dedupe=false"])
    assert args.config == "cfg.yaml" and args.options == {"checkpoint": "runs/x", "out": "o.jsonl", "k": 4,
                                                          "dedupe": False}
    assert args.thresholds == {"format": 0.5, "my.pkg:fn": 0.25}
    assert args.overrides == ["seq_len=64", "data.max_difficulty=2"]
    assert rejection.parse(["checkpoint=a", "out=b"]).thresholds == {"accuracy": 1.0, "format": 1.0}
    for bad in (["checkpoint=a"], ["checkpoint=a", "out=b", "k=0"], ["checkpoint=a", "out=b", "k=x"],
                ["checkpoint=a", "out=b", "min.format=hi"], ["checkpoint=a", "out=b", "split=test"]):
        with pytest.raises(config_lib.ConfigError):
            rejection.parse(bad)
    assert rejection.main(["checkpoint=a", "out=b", "k=x"]) == 2


def test_engine_samples_do_not_depend_on_batching():
    """The real engine on a tiny random model: every sample of a prompt comes from its own seed."""
    import jax.numpy as jnp

    from r1jax.sampling.engine import Engine
    from tests.sampling import tiny_moe

    # Short prompts (one prefill bucket) and the engine tests' model and cache: few, shared compiles.
    batch = prompt_records(config_lib.load("configs/tiny-grpo.yaml", "data.tasks=[arithmetic]"), TOK, "train", 3)
    engine = Engine(tiny_moe(), slots=8, max_len=64, tokenizer=TOK, cache_dtype=jnp.float32)
    generate_fn = rejection.engine_generate_fn(engine, TOK, temperature=1.0, top_p=1.0, max_tokens=6, seed=3)
    always = {"any": (lambda p, c, **_: [1.0] * len(c), 1.0)}
    together, stats = rejection.rejection_sample(generate_fn, batch, always, k=2, dedupe=False, keep_truncated=True)
    alone, _ = rejection.rejection_sample(generate_fn, batch[::-1], always, k=2, dedupe=False, keep_truncated=True,
                                          batch_prompts=1)
    assert stats["samples"] == 6 and len(together) == 6
    def key(r):
        return r["messages"][0]["content"], r["messages"][1]["content"]

    assert sorted(map(key, together)) == sorted(map(key, alone))
    assert len({key(r) for r in together}) > 3  # sampled: the two samples of a prompt differ
