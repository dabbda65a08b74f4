"""GRPO (DeepSeekMath, spec §7) on the training state, mesh and checkpoints of `train.loop`.

One iteration: prompts -> G completions each from the sampling engine with the current policy
(same arrays, no copies) -> rewards -> group advantages -> mu passes over num_minibatches
minibatches of the rollout -> optimizer steps. Log-probs are taken from logits / temperature,
the distribution the rollout sampled from (before top-p, which only truncates it).

Letters: N rollout rows (prompts x G), T padded prompt + completion length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import logging
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from r1jax import checkpoint as ckpt_lib
from r1jax.config import Config, ConfigError, to_dict
from r1jax.data.datasets import load_or_train_tokenizer, task_options
from r1jax.data.tasks import corpus
from r1jax.data.tokenizer import Tokenizer, chat_text
from r1jax.parallel.mesh import initialize_distributed, make_mesh
from r1jax.sampling import BATCH_DECODE_CHUNK, Engine, SamplingParams, Weights, generate
from r1jax.train import advantages as adv_lib
from r1jax.train import rewards as rewards_lib
from r1jax.train.evaluate import evaluate_tasks
from r1jax.train.loop import finish_run, plot_run, start_state, stop_with_checkpoint
from r1jax.train.metrics import MetricsLogger, to_python
from r1jax.train.policy_loss import grpo_loss, token_entropy, token_logprobs
from r1jax.train.preemption import StopRequest
from r1jax.train.reward_sandbox import RewardSandbox
from r1jax.train.state import TrainState
from r1jax.train.step import TrainStep

log = logging.getLogger(__name__)
ROLLOUT_KEYS = ("inputs", "targets", "positions", "segment_ids", "completion_mask", "advantages", "old_logp",
                "ref_logp")
LENGTH_BUCKET = 16  # rollout batches are padded to a multiple of this, not to seq_len (a shorter padded length is a faster update)
CURVES = ("reward", "accuracy", "completion_length", "eval_pass@1", "eval_greedy_accuracy", "kl", "entropy",
          "frac_reward_zero_std")

class GrpoStep(TrainStep):
    """The compiled GRPO update: one minibatch of rollout rows -> one optimizer step."""

    batch_keys = ROLLOUT_KEYS

    def _policy(self, params, extra, batch):
        with self._placement():
            model = nnx.merge(self.graphdef, params, extra)
            out = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        return out, token_logprobs(out.logits, batch["targets"], self.cfg.grpo.temperature)

    def _logprobs_fn(self, params, extra, batch):
        return self._policy(params, extra, batch)[1]

    def _train_step(self, state: TrainState, batch: dict):
        g = self.cfg.grpo
        mask = batch["completion_mask"]
        off_policy = g.mu > 1 or g.num_minibatches > 1

        def loss_fn(params):
            out, logp = self._policy(params, state.extra, batch)
            old_logp = None
            if off_policy:  # NaN rows: this minibatch is the first pass at the sampling policy itself
                old_logp = jnp.where(jnp.isnan(batch["old_logp"]), jax.lax.stop_gradient(logp), batch["old_logp"])
            loss, metrics = grpo_loss(
                logp, old_logp, batch["ref_logp"] if g.beta else None,
                batch["advantages"][:, 0], mask, loss_type=g.loss_type, epsilon_low=g.epsilon_low,
                epsilon_high=g.epsilon_high, beta=g.beta, max_completion_length=g.max_completion_length,
                global_token_count=batch["completion_mask"].sum() * g.num_minibatches,
            )
            entropy = jnp.sum(token_entropy(out.logits, g.temperature) * mask) / jnp.maximum(mask.sum(), 1.0)
            total = loss + out.balance_loss
            return total, (dict(metrics, loss=total, policy_loss=loss, entropy=entropy), out)

        (_, (metrics, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, metrics = self._update(state, grads, metrics, out.expert_loads, None)
        return new_state, metrics, None

    def logprobs(self, params, extra, batch):
        if not hasattr(self, "_logprobs"):
            if self.mesh is None:
                self._logprobs = jax.jit(self._logprobs_fn)
            else:
                self._logprobs = jax.jit(self._logprobs_fn, in_shardings=(
                    self.state_shardings.params, self.state_shardings.extra, self.batch_shardings))
        return self._logprobs(params, extra, batch)


def prompt_records(cfg: Config, tokenizer: Tokenizer, split: str = "train", count: int | None = None) -> list[dict]:
    """Built-in task prompts in the tokenizer's chat template (or bos + `grpo.prompt_template`),
    with what the checkers need."""
    count = count or (cfg.data.builtin_docs if split == "train" else cfg.grpo.eval_prompts)
    samples = corpus.samples(split, cfg.seed + (7 if split == "train" else 0), **task_options(cfg))
    template = cfg.grpo.prompt_template
    out = []
    for s in (next(samples) for _ in range(count)):
        if template is None:
            text = chat_text(tokenizer, [{"role": "user", "content": s.question}], add_generation_prompt=True)
            ids = tokenizer.encode(text)
        else:
            text = template.format(question=s.question)
            ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        out.append({"prompt": text, "prompt_ids": ids, "task": s.task, "question": s.question, "answer": s.answer})
    return out


class NoSignalError(RuntimeError):
    """grpo.max_iterations_without_signal iterations in a row had no group with reward variance."""


@dataclasses.dataclass(frozen=True)
class Signal:
    """What one rollout found: groups sampled, those whose rewards differ, the mean reward."""

    groups: int
    informative: int
    mean_reward: float

    @property
    def share(self) -> float:
        return self.informative / max(self.groups, 1)


@dataclasses.dataclass
class Rollout:
    batch: dict[str, np.ndarray]  # ROLLOUT_KEYS, each [N, T]
    texts: list[str]
    prompts: list[dict]
    rewards: np.ndarray  # [N] weighted total
    per_function: dict[str, np.ndarray]
    group_ids: np.ndarray  # [N]
    lengths: np.ndarray  # [N] completion tokens
    truncated: np.ndarray  # [N] bool
    tokens: int
    seconds: float
    frac_zero_std: float = 0.0  # of all groups sampled, before dynamic sampling drops any
    reward_errors: int = 0  # samples scored 0 for a failed reward (`RewardResult.errors`), all rounds
    reward_timeouts: int = 0


class GrpoTrainer:
    def __init__(self, cfg: Config, devices: list | None = None):
        """devices: the mesh's devices (default: all of them)."""
        if cfg.mode != "grpo":
            raise ConfigError("mode", "GrpoTrainer needs mode: grpo")
        self.cfg, g = cfg, cfg.grpo
        initialize_distributed(cfg.distributed)
        self.mesh = make_mesh(cfg.mesh, devices)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # as train.py's runs: the config beside the run, for eval / serve
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.tokenizer = load_or_train_tokenizer(cfg)
        self.rows = g.prompts_per_step * g.num_generations
        if self.rows % g.num_minibatches:
            raise ConfigError("grpo.num_minibatches", "must divide prompts_per_step * num_generations")
        self.step_fn = GrpoStep(dataclasses.replace(cfg, batch_size=self.rows // g.num_minibatches), self.mesh)
        self.reward_fns = [(rewards_lib.load_reward_fn(name), float(w)) for name, w in g.rewards.items()]
        # Its workers start at the first batch and stop at the end of train().
        self.reward_sandbox = (RewardSandbox(g.reward_workers, g.reward_memory_mb, preload=[f for f, _ in self.reward_fns])
                               if g.reward_sandbox else None)
        self.reward_failures = {"errors": 0, "timeouts": 0}  # of the current rollout
        self.checkpointer = ckpt_lib.Checkpointer(self.run_dir / "checkpoints", every=cfg.checkpoint.every,
                                                  keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        records = prompt_records(cfg, self.tokenizer)
        longest = max(len(r["prompt_ids"]) for r in records)
        if longest + g.max_completion_length > cfg.seq_len:
            raise ConfigError("seq_len", f"{cfg.seq_len} < longest prompt {longest} + max_completion_length")
        dataset = grain.MapDataset.source(records).shuffle(seed=cfg.seed).repeat()
        self.prompts = iter(dataset.to_iter_dataset())
        self.eval_records = prompt_records(cfg, self.tokenizer, "eval")
        self.engine = None
        self.reference = None
        self.last_signal: Signal | None = None

    # ------------------------------------------------------------------ rollout

    def _engine(self, state: TrainState) -> Engine:
        weights = Weights(self.step_fn.graphdef, state.params, state.extra)
        if self.engine is None:
            slots = min(64, max(8, self.rows))
            self.engine = Engine(weights, slots=slots, max_len=self.cfg.seq_len, tokenizer=self.tokenizer,
                                 decode_chunk=BATCH_DECODE_CHUNK)
        self.engine.weights = weights  # the live training arrays: nothing is copied
        return self.engine

    def _sample(self, state: TrainState, prompts: list[dict], seed: int):
        g = self.cfg.grpo
        engine = self._engine(state)
        sampling = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=seed,
                                  max_tokens=g.max_completion_length, stop_token_ids=(self.tokenizer.eos_id,))
        return generate(None, [p["prompt_ids"] for p in prompts], sampling, g.num_generations, engine=engine)

    def _score(self, prompts, completions):
        g = self.cfg.grpo
        flat_prompts = [p for p, cs in zip(prompts, completions) for _ in cs]
        texts = [self.tokenizer.decode([t for t in c.token_ids if t != self.tokenizer.eos_id])
                 for cs in completions for c in cs]
        columns = {k: [p[k] for p in flat_prompts] for k in ("answer", "task", "question")}
        result = rewards_lib.compute_rewards(self.reward_fns, [p["prompt"] for p in flat_prompts], texts, columns,
                                             timeout_s=g.reward_timeout_s, sandbox=self.reward_sandbox)
        self.reward_failures["errors"] += result.errors
        self.reward_failures["timeouts"] += result.timeouts
        lengths = np.array([len(c.token_ids) for cs in completions for c in cs])
        total = result.total.copy()
        if g.overlong_buffer:
            total += np.asarray(adv_lib.soft_overlong_penalty(jnp.asarray(lengths), g.max_completion_length,
                                                              g.overlong_buffer))
        return texts, total, result.per_function, lengths

    def rollout(self, state: TrainState, iteration: int) -> Rollout | None:
        """G completions for prompts_per_step prompts; with dynamic sampling, groups whose rewards
        are all equal are dropped and more prompts are drawn until the batch is full."""
        g = self.cfg.grpo
        t0 = time.perf_counter()
        self.reward_failures = {"errors": 0, "timeouts": 0}
        kept: list[tuple] = []
        tokens = drawn = flat = 0
        reward_sum = 0.0
        for round_ in range(g.max_sampling_rounds if g.dynamic_sampling else 1):
            need = g.prompts_per_step - len(kept)
            prompts = [next(self.prompts) for _ in range(math.ceil(need * g.oversample) if g.dynamic_sampling else need)]
            completions = self._sample(state, prompts, seed=self.cfg.seed * 1_000_003 + iteration * 101 + round_)
            texts, total, per_fn, lengths = self._score(prompts, completions)
            tokens += int(lengths.sum())
            reward_sum += float(total.sum())
            flat_before = flat
            for i, p in enumerate(prompts):
                rows = slice(i * g.num_generations, (i + 1) * g.num_generations)
                group = (p, completions[i], texts[rows], total[rows], {k: v[rows] for k, v in per_fn.items()},
                         lengths[rows])
                drawn += 1
                flat += int(np.ptp(total[rows]) == 0)
                if g.dynamic_sampling and np.ptp(total[rows]) == 0:
                    continue
                kept.append(group)
            if len(kept) >= g.prompts_per_step:
                break
            if flat - flat_before == len(prompts):  # the policy is too weak (or strong) for this round's
                break  # prompts: redrawing from it mostly buys more all-alike groups, at full price
        self.last_signal = Signal(groups=drawn, informative=drawn - flat,
                                  mean_reward=reward_sum / max(drawn * g.num_generations, 1))
        if not kept:
            return None  # every group had equal rewards: nothing to learn from this round
        if len(kept) < g.prompts_per_step:  # keep shapes static: repeat informative groups
            log.warning("dynamic sampling found %d of %d informative groups", len(kept), g.prompts_per_step)
            kept = [kept[i % len(kept)] for i in range(g.prompts_per_step)]
        kept = kept[: g.prompts_per_step]
        return dataclasses.replace(self._assemble(kept, tokens, time.perf_counter() - t0), frac_zero_std=flat / drawn,
                                   reward_errors=self.reward_failures["errors"],
                                   reward_timeouts=self.reward_failures["timeouts"])

    def _assemble(self, groups, tokens: int, seconds: float) -> Rollout:
        """T is the longest prompt + completion rounded up to a multiple of LENGTH_BUCKET (at
        most seq_len): the update never computes the padding past it, and compiles once per bucket."""
        g = self.cfg.grpo
        n = len(groups) * g.num_generations
        longest = max(len(p["prompt_ids"]) + len(c.token_ids) - 1 for p, cs, *_ in groups for c in cs)
        t_len = min(self.cfg.seq_len, -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET)
        batch = {k: np.zeros((n, t_len), np.float32 if k in ("completion_mask", "advantages", "old_logp", "ref_logp")
                             else np.int32) for k in ROLLOUT_KEYS}
        prompts, texts, rewards, lengths, truncated = [], [], [], [], []
        per_fn: dict[str, list] = {}
        for gi, (p, completions, ctexts, total, fn_scores, lens) in enumerate(groups):
            for j, c in enumerate(completions):
                r = gi * g.num_generations + j
                seq = list(p["prompt_ids"]) + list(c.token_ids)
                seq = seq[: t_len + 1]
                length = len(seq) - 1
                batch["inputs"][r, :length] = seq[:-1]
                batch["targets"][r, :length] = seq[1:]
                batch["positions"][r, :length] = np.arange(length)
                batch["segment_ids"][r, :length] = 1
                start = len(p["prompt_ids"]) - 1  # target index of the first completion token
                batch["completion_mask"][r, start:length] = 1.0
                is_truncated = c.finish_reason == "length"
                if is_truncated and g.mask_truncated_completions:
                    batch["completion_mask"][r] = 0.0
                prompts.append(p)
                texts.append(ctexts[j])
                rewards.append(total[j])
                lengths.append(len(c.token_ids))
                truncated.append(is_truncated)
            for k, v in fn_scores.items():
                per_fn.setdefault(k, []).extend(v.tolist())
        rewards = np.asarray(rewards, np.float32)
        group_ids = np.repeat(np.arange(len(groups)), g.num_generations)
        adv = np.asarray(adv_lib.group_advantages(jnp.asarray(rewards), jnp.asarray(group_ids),
                                                  num_groups=len(groups), scale_rewards=g.scale_rewards))
        batch["advantages"][:] = adv[:, None]
        return Rollout(batch, texts, prompts, rewards, {k: np.asarray(v) for k, v in per_fn.items()}, group_ids,
                       np.asarray(lengths), np.asarray(truncated), tokens, seconds)

    # ------------------------------------------------------------------ update

    def _minibatches(self, batch: dict, seed: int) -> list[dict]:
        """Rows reshuffled into num_minibatches; whole rows move, so a row's group id (and its
        advantage, computed per group above) goes with it."""
        g = self.cfg.grpo
        order = np.random.default_rng(seed).permutation(len(batch["inputs"]))
        parts = np.array_split(order, g.num_minibatches)
        return [{k: v[idx] for k, v in batch.items()} for idx in parts]

    def update(self, state: TrainState, rollout: Rollout, iteration: int):
        g = self.cfg.grpo
        metrics_list = []
        minibatches = self._minibatches(rollout.batch, self.cfg.seed + iteration)
        on_policy_first = g.mu == 1 and g.num_minibatches > 1
        if on_policy_first:  # updated at the sampling policy: its own forward gives its old log-probs
            minibatches[0]["old_logp"][:] = np.nan
        minibatches = [self.step_fn.place_batch(mb) for mb in minibatches]
        if g.mu > 1 or g.num_minibatches > 1:  # old policy log-probs, before any update
            minibatches = [mb if i == 0 and on_policy_first else
                           dict(mb, old_logp=self.step_fn.logprobs(state.params, state.extra, mb))
                           for i, mb in enumerate(minibatches)]
        if g.beta:
            ref_params, ref_extra = self.reference
            minibatches = [dict(mb, ref_logp=self.step_fn.logprobs(ref_params, ref_extra, mb)) for mb in minibatches]
        for _ in range(g.mu):
            for mb in minibatches:
                state, metrics = self.step_fn(state, mb)
                metrics_list.append(to_python(metrics))
        merged = {k: float(np.mean([m[k] for m in metrics_list])) for k in metrics_list[0]
                  if isinstance(metrics_list[0][k], float)}
        return state, merged

    # ------------------------------------------------------------------ the loop

    def _reference_dir(self, step: int) -> Path:
        return self.run_dir / "reference" / f"step_{step}"

    def _maybe_reset_reference(self, state: TrainState, step: int) -> None:
        g = self.cfg.grpo
        if not g.beta:
            return
        every = g.ref_reset_every
        anchor = (step // every) * every if every else 0
        if self.reference is None or (every and step % every == 0):
            path = self._reference_dir(anchor)
            abstract = self.step_fn.sharded_abstract()
            if (path / "params").exists():
                self.reference = ckpt_lib.load_params(path, (abstract.params, abstract.extra))
            else:
                self.reference = jax.tree.map(jnp.copy, (state.params, state.extra))
                ckpt_lib.export_params(path, self.reference, {"step": anchor})

    def _start(self):
        state, meta = start_state(self.cfg, self.step_fn, self.checkpointer, self.prompts)
        return state, int(meta.get("iteration", 0)) if meta is not None else 0

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Held-out pass@1 / greedy accuracy / format ({} with grpo.eval_prompts: 0)."""
        g = self.cfg.grpo
        if not self.eval_records:
            return {}
        return evaluate_tasks((self.step_fn.graphdef, state), self.tokenizer, self.eval_records,
                              k=g.eval_samples, max_tokens=g.max_completion_length, seed=self.cfg.seed,
                              max_len=self.cfg.seq_len)

    def train(self) -> dict:
        cfg, g = self.cfg, self.cfg.grpo
        t_start = time.perf_counter()
        state, start = self._start()
        logger = MetricsLogger(self.run_dir, jsonl=cfg.metrics_jsonl, total_steps=cfg.steps, start_step=start)
        samples_path = self.run_dir / "samples.jsonl"
        rollout_s = update_s = 0.0
        rollout_tokens = 0
        first_eval = last_eval = first_signal = stopped_at = None
        without_signal = 0
        stop = StopRequest()
        try:
            stop.__enter__()
            if start == 0 and self.eval_records:
                first_eval = self.evaluate(state)
                logger.log(0, first_eval, prefix="eval_")
            for it in range(start, cfg.steps):
                self._maybe_reset_reference(state, it)
                ro = self.rollout(state, it)
                signal = self.last_signal
                if first_signal is None:
                    first_signal = signal
                    log.info("GRPO iteration %d: %d of %d groups (%.0f%%) have reward variance, mean reward %.3f",
                             it + 1, signal.informative, signal.groups, 100 * signal.share, signal.mean_reward)
                without_signal = 0 if signal.informative else without_signal + 1
                if g.max_iterations_without_signal and without_signal >= g.max_iterations_without_signal:
                    logger.log(it + 1, {"signal_share": 0.0, "skipped_no_signal": 1.0})
                    raise NoSignalError(
                        f"{without_signal} GRPO iterations in a row without reward signal (every group of "
                        f"{g.num_generations} completions scored alike; mean reward {signal.mean_reward:.3f}): the "
                        f"policy is too weak or too strong for these prompts; start from a better SFT checkpoint, "
                        f"sample hotter, or change the task (grpo.max_iterations_without_signal="
                        f"{g.max_iterations_without_signal}; checkpoints in {self.checkpointer.directory} are intact)")
                if ro is None:
                    logger.log(it + 1, {"skipped_no_signal": 1.0, "signal_share": 0.0,
                                        **{f"reward/{k}": v for k, v in self.reward_failures.items()}})
                    continue
                t0 = time.perf_counter()
                state, metrics = self.update(state, ro, it)
                dt = time.perf_counter() - t0
                rollout_s, update_s, rollout_tokens = rollout_s + ro.seconds, update_s + dt, rollout_tokens + ro.tokens
                metrics.update(
                    reward=float(ro.rewards.mean()), reward_std=float(ro.rewards.std()),
                    frac_reward_zero_std=ro.frac_zero_std,  # before dynamic sampling's filter
                    signal_share=signal.share,
                    completion_length=float(ro.lengths.mean()), completion_length_max=int(ro.lengths.max()),
                    truncated_ratio=float(ro.truncated.mean()), rollout_s=ro.seconds, update_s=dt,
                    rollout_tokens_per_s=ro.tokens / max(ro.seconds, 1e-9),
                )
                metrics["reward/errors"], metrics["reward/timeouts"] = ro.reward_errors, ro.reward_timeouts
                for name, values in ro.per_function.items():
                    metrics[f"rewards/{name}/mean"] = float(np.nanmean(values))
                    metrics[f"rewards/{name}/std"] = float(np.nanstd(values))
                if "accuracy_reward" in ro.per_function:
                    metrics["accuracy"] = float(np.nanmean(ro.per_function["accuracy_reward"]))
                logger.log(it + 1, metrics)
                if g.log_samples_every and (it + 1) % g.log_samples_every == 0 and jax.process_index() == 0:
                    with open(samples_path, "a") as f:
                        for r in range(0, len(ro.texts), g.num_generations):
                            f.write(json.dumps({"step": it + 1, "prompt": ro.prompts[r]["question"],
                                                "completion": ro.texts[r], "reward": float(ro.rewards[r]),
                                                "advantage": float(ro.batch["advantages"][r, 0])}) + "\n")
                if g.eval_every and (it + 1) % g.eval_every == 0 and self.eval_records:
                    last_eval = self.evaluate(state)
                    logger.log(it + 1, last_eval, prefix="eval_")
                if self.checkpointer.should_save(it + 1):
                    self.checkpointer.save(it + 1, state, data_state=self.prompts.get_state(),
                                           meta={"iteration": it + 1, "config": to_dict(cfg)})
                if stop.requested() and it + 1 < cfg.steps:
                    stopped_at = stop_with_checkpoint(self.checkpointer, it + 1, state, self.prompts.get_state(),
                                                      {"iteration": it + 1, "config": to_dict(cfg)})
                    break
            if stopped_at is None:
                if self.eval_records and (last_eval is None or (g.eval_every and cfg.steps % g.eval_every)):
                    last_eval = self.evaluate(state)
                    logger.log(cfg.steps, last_eval, prefix="eval_")
                finish_run(self.checkpointer, state, cfg.steps, self.run_dir, data_state=self.prompts.get_state(),
                           meta={"iteration": cfg.steps, "config": to_dict(cfg)}, export_meta={"config": to_dict(cfg)})
        finally:
            stop.__exit__()
            logger.close()
            self.checkpointer.close()
            if self.reward_sandbox is not None:
                self.reward_sandbox.close()
        plot = plot_run(logger, self.run_dir / "curves.png", CURVES, "GRPO")
        return {"first_eval": first_eval, "final_eval": last_eval, "rollout_s": rollout_s, "update_s": update_s,
                "first_signal_share": first_signal and first_signal.share, "stopped_at": stopped_at,
                "rollout_tokens_per_s": rollout_tokens / max(rollout_s, 1e-9), "plot": plot,
                "wall_s": time.perf_counter() - t_start, "state": state}
