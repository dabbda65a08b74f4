"""Rejection sampling (R1's stage 3, spec §6): k samples per prompt from a checkpoint, keep those
whose rule-based rewards all reach their thresholds, write them as SFT chats.

    python -m r1jax.train.rejection [CONFIG] checkpoint=RUN_DIR out=PATH.jsonl [k=8] [prompts=128]
        [split=train] [temperature=0.6] [top_p=0.95] [top_k=0] [max_tokens=N] [sample_seed=0]
        [min.accuracy=1.0] [min.format=1.0] [min.REWARD=X ...] [max_per_prompt=N] [dedupe=true]
        [keep_truncated=false] [batch_prompts=64] [slots=64] [timeout_s=S] [tokenizer=FILE] [key=value ...]

    python -m r1jax.train.rejection checkpoint=runs/demo/grpo out=runs/demo/rejection.jsonl
    python train.py configs/tiny-sft.yaml data.source=runs/demo/rejection.jsonl data.format=chat

Prompts are the built-in tasks' (`grpo.prompt_records`, the train split GRPO samples from).
`min.NAME=X` keeps a sample only if reward NAME (a built-in reward: accuracy, format,
language_consistency, or a user one as package.module:function) is >= X; without any `min.`,
accuracy and format must be 1 (correct and well formatted). A completion cut off by
max_tokens (default grpo.max_completion_length) is dropped (it never ended); identical
completions of one prompt are kept once. Rewards run under grpo.reward_timeout_s per batch of
batch_prompts prompts unless timeout_s= says otherwise.
CONFIG defaults to the checkpoint's saved config; other key=value pairs override config fields
(as in train.py); the tokenizer is found as serve.py finds it. Output records are
`{"messages": [user, assistant], "task", "answer", "rewards"}`: `data.format=chat` reads them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1jax.sampling.engine import BATCH_DECODE_CHUNK, Completion, Engine, SamplingParams
from r1jax.train import rewards as rewards_lib
from r1jax.train.reward_sandbox import RewardSandbox

log = logging.getLogger("r1jax.train.rejection")  # not __main__ under python -m

# generate_fn(prompt records, k) -> k completions per prompt, each its text or an engine Completion
# (whose finish_reason "length" marks a completion cut off by max_tokens).
GenerateFn = Callable[[list[dict], int], list[list[str | Completion]]]
# A threshold by reward name (resolved by `rewards.load_reward_fn`), or (fn, threshold).
RewardSpec = float | tuple[rewards_lib.RewardFn, float]
DEFAULT_THRESHOLDS = {"accuracy": 1.0, "format": 1.0}
_PROMPT_ONLY = ("prompt", "prompt_ids", "messages")


def _resolve(rewards: Mapping[str, RewardSpec]) -> list[tuple[str, rewards_lib.RewardFn, float]]:
    out = []
    for name, spec in rewards.items():
        fn, threshold = spec if isinstance(spec, tuple) else (rewards_lib.load_reward_fn(name), spec)
        out.append((name, fn, float(threshold)))
    if not out:
        raise ValueError("rejection sampling needs at least one reward threshold")
    return out


def _text(sample: str | Completion) -> tuple[str, bool]:
    """(text, truncated)."""
    if isinstance(sample, str):
        return sample, False
    if sample.text is None:
        raise ValueError("a Completion without text: give the Engine a tokenizer")
    return sample.text, sample.finish_reason == "length"


def _messages(prompt: dict, completion: str) -> list[dict]:
    head = list(prompt["messages"]) if "messages" in prompt else [{"role": "user", "content": prompt["question"]}]
    return head + [{"role": "assistant", "content": completion}]


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def sandbox_for(cfg):
    """The run's reward sandbox (`grpo.reward_sandbox`, workers, memory cap) as a context, or a
    null context when it is off."""
    if not cfg.grpo.reward_sandbox:
        return contextlib.nullcontext()
    return RewardSandbox(cfg.grpo.reward_workers, cfg.grpo.reward_memory_mb)


def rejection_sample(
    generate_fn: GenerateFn,
    prompts: Sequence[dict],
    rewards: Mapping[str, RewardSpec] = DEFAULT_THRESHOLDS,
    k: int = 8,
    *,
    max_per_prompt: int | None = None,
    dedupe: bool = True,
    keep_truncated: bool = False,
    none_passes: bool = False,
    batch_prompts: int = 64,
    timeout_s: float = 10.0,
    out_path: str | os.PathLike | None = None,
    sandbox: RewardSandbox | None = None,
) -> tuple[list[dict], dict]:
    """k samples of every prompt; keep those whose every reward is >= its threshold.

    prompts: records as `grpo.prompt_records` makes them ({"prompt", "task", "question", "answer",
    ...}; "messages" instead of "question" for a multi-turn or system prompt). Every key but
    prompt / prompt_ids / messages shared by all prompts goes to the reward functions as a column.
    rewards: name -> threshold, or name -> (fn, threshold); functions run by `rewards.compute_rewards`
    (concurrently, `timeout_s` per batch of `batch_prompts` prompts, in `sandbox`'s worker processes
    when one is given; one that fails or times out
    rejects the whole batch, whatever its threshold). A reward of None ("does not apply") fails unless
    `none_passes`. Of a prompt's passing samples, identical completions count once (`dedupe`,
    whitespace at the ends ignored), and at most `max_per_prompt` are kept: the highest summed
    rewards first, ties in sample order. Completions cut off by max_tokens are dropped unless
    `keep_truncated`.

    Returns (records, stats). records: SFT chats {"messages", "task", "answer", "rewards"} (task /
    answer where the prompt has them); with `out_path` they are also written there as JSONL,
    batch by batch. stats: counts overall and per task, and mean / pass rate of every reward.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    specs = _resolve(rewards)
    prompts = list(prompts)
    columns_keys = [c for c in (set.intersection(*(set(p) for p in prompts)) if prompts else set())
                    if c not in _PROMPT_ONLY]
    names = [name for name, _, _ in specs]
    totals = collections.Counter()
    per_task: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    sums = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    passes = {n: 0 for n in names}
    failed: set[str] = set()
    kept: list[dict] = []
    t0 = time.perf_counter()
    with open(out_path, "w", encoding="utf-8") if out_path is not None else contextlib.nullcontext() as sink:
        for start in range(0, len(prompts), batch_prompts):
            batch = prompts[start: start + batch_prompts]
            samples = generate_fn(batch, k)
            if len(samples) != len(batch) or any(len(s) != k for s in samples):
                raise ValueError(f"generate_fn must return {k} completions for each of {len(batch)} prompts")
            texts, truncated = zip(*(_text(s) for ss in samples for s in ss))
            flat = [p for p in batch for _ in range(k)]
            columns = {c: [p[c] for p in flat] for c in columns_keys}
            result = rewards_lib.compute_rewards([(fn, 1.0) for _, fn, _ in specs], [p["prompt"] for p in flat],
                                                 list(texts), columns, timeout_s=timeout_s, sandbox=sandbox)
            scores = np.stack(list(result.per_function.values()), axis=1)  # [N, R], in specs' order
            broken = np.array([key in result.failed for key in result.per_function])
            failed.update(name for name, b in zip(names, broken) if b)
            thresholds = np.array([t for _, _, t in specs])
            # A function that failed or timed out verified nothing: its batch is rejected.
            ok = (np.where(np.isnan(scores), none_passes, scores >= thresholds) & ~broken).all(axis=1)
            for r, name in enumerate(names):
                valid = ~np.isnan(scores[:, r])
                sums[name] += float(scores[valid, r].sum())
                counts[name] += int(valid.sum())
                passes[name] += int(np.where(valid, scores[:, r] >= thresholds[r], none_passes).sum())
            batch_kept = []
            for i, prompt in enumerate(batch):
                rows = range(i * k, (i + 1) * k)
                task = prompt.get("task", "")
                stat = per_task[task]
                stat["prompts"] += 1
                stat["samples"] += k
                stat["truncated"] += sum(truncated[j] for j in rows)
                candidates = [j for j in rows if ok[j] and (keep_truncated or not truncated[j])]
                stat["passed"] += len(candidates)
                if dedupe:
                    seen, unique = set(), []
                    for j in candidates:
                        if texts[j].strip() not in seen:
                            seen.add(texts[j].strip())
                            unique.append(j)
                    stat["duplicates"] += len(candidates) - len(unique)
                    candidates = unique
                candidates.sort(key=lambda j: -np.nansum(scores[j]))  # stable: ties stay in sample order
                candidates = candidates[:max_per_prompt] if max_per_prompt is not None else candidates
                stat["kept"] += len(candidates)
                stat["prompts_with_kept"] += bool(candidates)
                for j in candidates:
                    record = {"messages": _messages(prompt, texts[j])}
                    record.update({key: prompt[key] for key in ("task", "answer") if key in prompt})
                    record["rewards"] = {name: _json_float(scores[j, r]) for r, name in enumerate(names)}
                    batch_kept.append(record)
            kept += batch_kept
            if sink is not None:
                sink.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in batch_kept)
                sink.flush()
            done = start + len(batch)
            log.info("rejection sampling: %d/%d prompts, kept %d of %d samples (%.0f s)", done, len(prompts),
                     len(kept), done * k, time.perf_counter() - t0)
    for stat in per_task.values():
        totals.update(stat)
    keys = ("prompts", "samples", "truncated", "passed", "duplicates", "kept", "prompts_with_kept")
    stats = {key: int(totals[key]) for key in keys}
    stats["kept_fraction"] = stats["kept"] / max(stats["samples"], 1)
    stats["per_task"] = {task: {**{key: int(s[key]) for key in keys}, "kept_fraction": s["kept"] / max(s["samples"], 1)}
                         for task, s in sorted(per_task.items())}
    stats["rewards"] = {name: {"threshold": t, "mean": sums[name] / max(counts[name], 1),
                               "pass_rate": passes[name] / max(stats["samples"], 1)} for name, _, t in specs}
    stats["failed_rewards"] = sorted(failed)
    stats["seconds"] = time.perf_counter() - t0
    return kept, stats


def engine_generate_fn(engine: Engine, tokenizer, *, temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0,
                       max_tokens: int = 64, seed: int = 0) -> GenerateFn:
    """A `GenerateFn` on the sampling engine (the calls of `GrpoTrainer._sample`). Sample j of a
    prompt uses sample index j and a seed from `seed` and the prompt text, so what a prompt gets
    does not depend on the other prompts or the batching. The engine needs the tokenizer (texts)."""
    if engine.tokenizer is None:
        engine.tokenizer = tokenizer

    def generate_fn(prompts: list[dict], k: int) -> list[list[Completion]]:
        for i, p in enumerate(prompts):
            prompt_seed = (seed * 1_000_003 + zlib.crc32(p["prompt"].encode("utf-8"))) % 2**31
            sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=prompt_seed,
                                      max_tokens=max_tokens, stop_token_ids=(tokenizer.eos_id,))
            for j in range(k):
                engine.add_request(("rejection", i, j), p["prompt_ids"], sampling, sample_index=j)
        while engine.has_work():
            engine.step()
        return [[engine.pop_result(("rejection", i, j)) for j in range(k)] for i in range(len(prompts))]

    return generate_fn


def format_stats(stats: dict) -> str:
    lines = [(f"prompts {stats['prompts']}, samples {stats['samples']}, passed {stats['passed']}, "
              f"kept {stats['kept']} ({100 * stats['kept_fraction']:.1f}%; {stats['duplicates']} duplicates, "
              f"{stats['truncated']} truncated), prompts with a kept sample {stats['prompts_with_kept']}, "
              f"{stats['seconds']:.0f} s"),
             f"  {'task':<12}{'prompts':>9}{'samples':>9}{'kept':>7}{'kept %':>8}{'prompts w/ kept':>17}"]
    for task, s in stats["per_task"].items():
        lines.append(f"  {task:<12}{s['prompts']:>9}{s['samples']:>9}{s['kept']:>7}{100 * s['kept_fraction']:>8.1f}"
                     f"{s['prompts_with_kept']:>17}")
    lines.append(f"  {'reward':<24}{'min':>6}{'mean':>8}{'pass %':>8}")
    for name, r in stats["rewards"].items():
        lines.append(f"  {name:<24}{r['threshold']:>6.2f}{r['mean']:>8.3f}{100 * r['pass_rate']:>8.1f}")
    if stats["failed_rewards"]:
        lines.append(f"  reward functions that failed or timed out (scored 0): {', '.join(stats['failed_rewards'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


OPTIONS: dict[str, Callable[[str], Any]] = {
    "checkpoint": str, "out": str, "k": int, "prompts": int, "split": str, "temperature": float, "top_p": float,
    "top_k": int, "max_tokens": int, "sample_seed": int, "max_per_prompt": int, "dedupe": bool,
    "keep_truncated": bool, "batch_prompts": int, "slots": int, "tokenizer": str, "timeout_s": float,
}


@dataclasses.dataclass
class Args:
    config: str | None
    options: dict
    thresholds: dict[str, float]
    overrides: list[str]


def parse(argv: Sequence[str]) -> Args:
    from r1jax.config import ConfigError, parse_options, parse_value, require_positive

    positionals, options, rest = parse_options(argv, OPTIONS, positional=("[CONFIG]",))
    thresholds, overrides = {}, []
    for item in rest:
        key, _, value = item.partition("=")
        if key.startswith("min."):
            thresholds[key[len("min."):]] = parse_value(key, value, float)
        else:
            overrides.append(item)
    for key in ("checkpoint", "out"):
        if key not in options:
            raise ConfigError(key, f"{key}=... is required")
    require_positive(options, "k", "prompts", "max_tokens", "batch_prompts", "slots", "max_per_prompt")
    if options.get("split", "train") not in ("train", "eval"):
        raise ConfigError("split", f"must be train or eval, not {options['split']!r}")
    return Args(positionals[0] if positionals else None, options, thresholds or dict(DEFAULT_THRESHOLDS), overrides)


def load_run(checkpoint: str | os.PathLike, config_path: str | None, overrides: Sequence[str],
             tokenizer_file: str | None = None):
    """(config, tokenizer, meta) of a checkpoint, found as serve.py finds them: CONFIG or the
    checkpoint's saved config (plus overrides); the tokenizer named on the command line, in the
    checkpoint's meta, next to it, in data.tokenizer, or in init_from."""
    from r1jax import checkpoint as ckpt_lib
    from r1jax import config as config_lib
    from r1jax.data.tokenizer import find_tokenizer

    checkpoint = Path(checkpoint)
    meta = ckpt_lib.read_meta(checkpoint)
    if config_path:
        cfg = config_lib.load(config_path, *overrides)
    else:
        if "config" not in meta:
            raise config_lib.ConfigError("", f"{checkpoint} has no saved config: pass CONFIG")
        cfg = config_lib.build(config_lib.Config, config_lib.merge(meta["config"], config_lib.load_dict(None, *overrides)))
    candidates = [tokenizer_file, meta.get("tokenizer"), checkpoint, checkpoint.parent, cfg.data.tokenizer,
                  cfg.init_from]
    tokenizer = find_tokenizer(candidates)
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer found next to {checkpoint}; pass tokenizer=FILE (.model, "
                                "tokenizer.json or a directory)")
    return cfg, tokenizer, meta


COLLECT_OPTIONS = ("k", "prompts", "split", "temperature", "top_p", "top_k", "max_tokens", "sample_seed",
                   "max_per_prompt", "dedupe", "keep_truncated", "batch_prompts", "slots", "timeout_s")


def collect(checkpoint: str | os.PathLike, out: str | os.PathLike, *, cfg=None, tokenizer=None,
            thresholds: Mapping[str, float] | None = None, k: int = 8, prompts: int = 128, split: str = "train",
            temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0, max_tokens: int | None = None,
            sample_seed: int = 0, max_per_prompt: int | None = None, dedupe: bool = True,
            keep_truncated: bool = False, batch_prompts: int = 64, slots: int | None = None,
            timeout_s: float | None = None) -> dict:
    """Rejection sampling from a checkpoint into `out` (SFT chats): the command's work as a
    function. cfg / tokenizer default to the checkpoint's (`load_run`). Returns the stats."""
    from r1jax import checkpoint as ckpt_lib
    from r1jax.model.decoder import abstract_decoder
    from r1jax.sampling.engine import Weights
    from r1jax.train.grpo import prompt_records

    if cfg is None or tokenizer is None:
        loaded_cfg, loaded_tokenizer, _ = load_run(checkpoint, None, ())
        cfg, tokenizer = cfg or loaded_cfg, tokenizer or loaded_tokenizer
    max_tokens = max_tokens or cfg.grpo.max_completion_length
    records = prompt_records(cfg, tokenizer, split, prompts)
    graphdef, abstract_params, abstract_extra = abstract_decoder(cfg.model)
    params, extra = ckpt_lib.load_params(checkpoint, (abstract_params, abstract_extra))
    longest = max(len(r["prompt_ids"]) for r in records)
    max_len = min(cfg.model.max_position_embeddings, 1 << math.ceil(math.log2(max(longest + max_tokens, 64))))
    slots = slots or min(64, 1 << math.ceil(math.log2(max(batch_prompts * k, 8))))
    engine = Engine(Weights(graphdef, params, extra), slots=slots, max_len=max_len, tokenizer=tokenizer,
                    decode_chunk=BATCH_DECODE_CHUNK)
    generate_fn = engine_generate_fn(engine, tokenizer, temperature=temperature, top_p=top_p, top_k=top_k,
                                     max_tokens=max_tokens, seed=sample_seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with sandbox_for(cfg) as sandbox:
        _, stats = rejection_sample(
            generate_fn, records, dict(thresholds or DEFAULT_THRESHOLDS), k, max_per_prompt=max_per_prompt,
            dedupe=dedupe, keep_truncated=keep_truncated, batch_prompts=batch_prompts,
            timeout_s=cfg.grpo.reward_timeout_s if timeout_s is None else timeout_s, out_path=out, sandbox=sandbox)
    return stats


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from r1jax import config as config_lib

    try:
        args = parse(argv)
        if args.config:
            config_lib.load(args.config, *args.overrides)  # a bad override fails before any loading
        for name in args.thresholds:
            rewards_lib.load_reward_fn(name)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, ImportError, AttributeError, TypeError) as e:
        print(f"reward: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("r1jax").setLevel(logging.INFO)  # progress, as train.py shows it
    o = args.options
    try:
        cfg, tokenizer, _ = load_run(o["checkpoint"], args.config, args.overrides, o.get("tokenizer"))
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, OSError) as e:
        print(f"checkpoint: {e}", file=sys.stderr)
        return 1

    print(f"rejection sampling {o.get('prompts', 128)} {o.get('split', 'train')} prompts x {o.get('k', 8)} samples "
          f"from {o['checkpoint']}; keep " + ", ".join(f"{n} >= {t:g}" for n, t in args.thresholds.items()), flush=True)
    out = Path(o["out"])
    stats = collect(o["checkpoint"], out, cfg=cfg, tokenizer=tokenizer, thresholds=args.thresholds,
                    **{key: o[key] for key in COLLECT_OPTIONS if key in o})
    print(format_stats(stats))
    print(f"wrote {stats['kept']} SFT chats to {out}; train on them with: python train.py configs/tiny-sft.yaml "
          f"data.source={out} data.format=chat [init_from=...]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
