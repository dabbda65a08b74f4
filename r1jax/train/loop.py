"""The training loop shared by every mode: data -> compiled step -> metrics -> checkpoints.

    summary = train(config.load("configs/tiny-pretrain.yaml", "steps=50"))

Resuming (`resume: auto`) restores params, optimizer, step, routing biases and the data
iterator from the newest good checkpoint, so a killed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from r1jax import checkpoint as ckpt_lib
from r1jax.config import Config, ConfigError, to_dict
from r1jax.data.datasets import data_source, eval_batches, load_or_train_tokenizer, make_dataset, skipped_lines
from r1jax.data.pipeline import to_global_batch
from r1jax.data.tokenizer import Tokenizer
from r1jax.model.summary import train_flops_per_token
from r1jax.parallel.backend import on_cpu
from r1jax.parallel.mesh import initialize_distributed, make_mesh
from r1jax.train.metrics import MetricsLogger, measure_peak_flops, plot_curves, to_python
from r1jax.train.preemption import StopRequest
from r1jax.train.state import learning_rate_schedule
from r1jax.train.step import TrainStep

log = logging.getLogger(__name__)
CURVES = ("loss", "eval_loss", "mtp_ce", "balance_loss", "grad_norm", "lr", "tokens_per_s")


@dataclasses.dataclass
class TrainSummary:
    run_dir: str
    steps: int
    first_loss: float | None
    final_loss: float | None
    final_eval_loss: float | None
    tokens_per_s: float | None  # mean over steps after the first (compile) step
    mfu: float | None
    peak_flops: float
    checkpoint_dir: str
    params_dir: str
    plot: str | None
    wall_s: float
    resumed_from: int | None = None
    skipped_lines: int = 0  # malformed data records skipped (data.skip_bad_lines)
    stopped_at: int | None = None  # the step a SIGTERM / SIGINT stopped the run after (checkpointed)

    def table(self) -> str:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        rows = [
            ("run dir", self.run_dir), ("steps", str(self.steps)),
            ("loss first -> final", f"{fmt(self.first_loss, '.3f')} -> {fmt(self.final_loss, '.3f')}"),
            ("held-out loss", fmt(self.final_eval_loss, ".3f")),
            ("tokens/s", fmt(self.tokens_per_s, ",.0f")),
            ("MFU", f"{fmt(self.mfu and self.mfu * 100, '.1f')}% of {self.peak_flops / 1e9:.0f} GFLOP/s (measured GEMM peak)"),
            ("checkpoints", self.checkpoint_dir), ("params for serving", self.params_dir),
            ("curves", self.plot or "-"), ("wall time", f"{self.wall_s:.0f} s"),
        ]
        if self.resumed_from is not None:
            rows.insert(2, ("resumed from step", str(self.resumed_from)))
        if self.stopped_at is not None:
            rows.insert(2, ("stopped at step", f"{self.stopped_at} of {self.steps} (signal; checkpointed, resume=auto "
                                               "continues)"))
        if self.skipped_lines:
            rows.insert(2, ("skipped data lines", f"{self.skipped_lines} (malformed; see the warnings)"))
        return "\n".join(f"  {k:<22}{v}" for k, v in rows)


@dataclasses.dataclass
class RunData:
    """What a run trains on: its tokenizer, the train batches (iter() gives a grain
    DatasetIterator, whose state checkpoints carry) and a fixed list of held-out batches."""

    tokenizer: Tokenizer
    train: Any
    held_out: list[dict]
    skipped: int = 0  # malformed records skipped (data.skip_bad_lines)


def lm_data(cfg: Config, mesh=None) -> RunData:
    """Pretrain / SFT data as the config asks for it (`r1jax.data.datasets`). Data first: a
    missing path or a malformed record stops the run before the tokenizer and any compile."""
    train_source, eval_source = data_source(cfg, "train"), data_source(cfg, "eval")
    skipped = skipped_lines(train_source, eval_source)
    tokenizer = load_or_train_tokenizer(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} < tokenizer vocabulary {tokenizer.vocab_size}")
    held_out = eval_batches(cfg, tokenizer, source=eval_source) if eval_source is not None else []
    return RunData(tokenizer, make_dataset(cfg, tokenizer, source=train_source), held_out, skipped)


def _evaluate(step_fn: TrainStep, state, batches: list[dict]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in batches:
        metrics, _ = step_fn.evaluate(state, to_global_batch(batch, step_fn.batch_shardings["inputs"]))
        for k, v in to_python(metrics).items():
            totals[k] = totals.get(k, 0.0) + v / len(batches)
    return totals


def start_state(cfg: Config, step_fn: TrainStep, checkpointer: ckpt_lib.Checkpointer, iterator):
    """(state, checkpoint meta or None): restored with the data iterator from the newest good
    checkpoint, or fresh (with the params and routing biases of `init_from`, if set)."""
    if cfg.resume == "auto" and checkpointer.latest_step() is not None:
        state, data_state, meta = checkpointer.restore(step_fn.sharded_abstract())
        if data_state is not None:
            iterator.set_state(data_state)
        log.info("resumed %s at step %d", cfg.run_dir, int(state.step))
        return state, meta
    state = step_fn.init(cfg.seed)
    if cfg.init_from:
        abstract = step_fn.sharded_abstract()
        params, extra = ckpt_lib.load_params(cfg.init_from, (abstract.params, abstract.extra))
        state = step_fn.place(state.replace(params=params, extra=extra, opt_state=step_fn.optimizer.init(params)))
        log.info("initialised from %s", cfg.init_from)
    return state, None


def finish_run(checkpointer: ckpt_lib.Checkpointer, state, steps: int, run_dir: Path, *, data_state, meta: dict,
               export_meta: dict) -> Path:
    """The end of a run (pretrain / SFT and GRPO): the last step checkpointed unless it just was,
    the saves awaited, and the params exported to `run_dir/params` (serving, `init_from`)."""
    if checkpointer.latest_step() != steps:
        checkpointer.save(steps, state, data_state=data_state, meta=meta, force=True)
    checkpointer.wait()
    return ckpt_lib.export_params(run_dir / "params", state, export_meta)


def stop_with_checkpoint(checkpointer: ckpt_lib.Checkpointer, step: int, state, data_state, meta: dict,
                         nonfinite: float = 0.0) -> int:
    """After a stop request: `step` checkpointed (unless it just was, or followed a non-finite
    step: then the newest good checkpoint stands) and every save awaited. Returns `step`."""
    if checkpointer.latest_step() != step and not nonfinite:
        checkpointer.save(step, state, data_state=data_state, meta=meta, force=True)
    checkpointer.wait()
    log.warning("stopped after step %d on a signal; checkpoints in %s (resume: auto continues)", step,
                checkpointer.directory)
    return step


def plot_run(logger: MetricsLogger, path: Path, curves: tuple[str, ...], title: str) -> str | None:
    """The run's curves as a PNG (the first process only), or None."""
    if jax.process_index() == 0 and logger.history:
        return str(plot_curves(logger.history, path, curves, title=title))
    return None


def train(cfg: Config, *, data: Callable[[Config, Any], RunData] | None = None,
          make_step: Callable[[Config, Any], TrainStep] | None = None) -> TrainSummary:
    """Runs `cfg.steps` optimizer steps of `cfg.mode` and returns a summary. pretrain and sft
    as they are (`lm_data`, `TrainStep`); another mode (logit-level distillation) brings its own
    `data(cfg, mesh)` and step `make_step(cfg, mesh)` (a `TrainStep` subclass): one loop."""
    if cfg.mode not in ("pretrain", "sft") and data is None:
        raise ConfigError("mode", f"train() runs pretrain and sft; {cfg.mode!r} has its own entry point")
    t_start = time.perf_counter()
    initialize_distributed(cfg.distributed)
    mesh = make_mesh(cfg.mesh)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    run_data = (data or lm_data)(cfg, mesh)
    tokenizer, skipped, held_out = run_data.tokenizer, run_data.skipped, run_data.held_out
    step_fn = (make_step or TrainStep)(cfg, mesh)
    checkpointer = ckpt_lib.Checkpointer(run_dir / "checkpoints", every=cfg.checkpoint.every,
                                         keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    iterator = iter(run_data.train)
    state, restored = start_state(cfg, step_fn, checkpointer, iterator)
    start = int(state.step) if restored is not None else 0

    # Emulated CPU devices share one machine's cores: its peak is the peak of all of them.
    peak = measure_peak_flops() * (1 if on_cpu() else jax.device_count())
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_step = train_flops_per_token(cfg.model, cfg.seq_len) * tokens_per_step
    schedule = learning_rate_schedule(cfg.optim)
    logger = MetricsLogger(run_dir, jsonl=cfg.metrics_jsonl, total_steps=cfg.steps, start_step=start)
    first_loss = last_loss = eval_loss = None
    speeds = []
    bad_in_a_row = 0
    meta = {"config": to_dict(cfg), "tokenizer": str(getattr(tokenizer, "model_file", ""))}
    if cfg.data.skip_bad_lines:
        logger.log(start, {"skipped_lines": skipped}, prefix="data/")
    stopped_at = None
    stop = StopRequest()
    try:
        stop.__enter__()
        for step in range(start, cfg.steps):
            batch = to_global_batch(next(iterator), step_fn.batch_shardings["inputs"])
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = to_python(metrics)
            dt = time.perf_counter() - t0
            if step > start:
                speeds.append(tokens_per_step / dt)
            metrics.update(lr=float(schedule(step)), step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                           mfu=flops_per_step / dt / peak)
            bad_in_a_row = bad_in_a_row + 1 if metrics["nonfinite"] else 0
            if metrics["nonfinite"]:
                log.warning("step %d: non-finite loss %s or grad norm %s; update skipped", step + 1,
                            metrics["loss"], metrics["grad_norm"])
            if bad_in_a_row >= cfg.max_nonfinite_steps:
                logger.log(step + 1, metrics)
                raise FloatingPointError(
                    f"{bad_in_a_row} non-finite losses in a row at step {step + 1}: stopping; the last good "
                    f"checkpoint in {checkpointer.directory} is intact"
                )
            first_loss = metrics["loss"] if first_loss is None else first_loss
            last_loss = metrics["loss"]
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or metrics["nonfinite"]:
                logger.log(step + 1, metrics)
            if held_out and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                eval_loss = _evaluate(step_fn, state, held_out)["loss"]
                logger.log(step + 1, {"loss": eval_loss}, prefix="eval_")
            if checkpointer.should_save(step + 1):
                if metrics["nonfinite"]:  # the newest checkpoint always follows a finite step
                    log.warning("step %d: no checkpoint after a non-finite step", step + 1)
                else:
                    checkpointer.save(step + 1, state, data_state=iterator.get_state(), meta=meta)
            if stop.requested() and step + 1 < cfg.steps:
                stopped_at = stop_with_checkpoint(checkpointer, step + 1, state, iterator.get_state(), meta,
                                                  metrics["nonfinite"])
                break
        if stopped_at is None:
            if held_out and (not cfg.eval_every or cfg.steps % cfg.eval_every):
                eval_loss = _evaluate(step_fn, state, held_out)["loss"]
                logger.log(cfg.steps, {"loss": eval_loss}, prefix="eval_")
            finish_run(checkpointer, state, cfg.steps, run_dir, data_state=iterator.get_state(), meta=meta,
                       export_meta=meta)
        params_dir = run_dir / "params"
    finally:
        stop.__exit__()
        logger.close()
        checkpointer.close()
    plot = plot_run(logger, run_dir / "curves.png", CURVES, f"{cfg.mode}: {run_dir.name}")
    mean_speed = float(np.mean(speeds)) if speeds else None
    return TrainSummary(
        run_dir=str(run_dir), steps=cfg.steps, first_loss=first_loss, final_loss=last_loss,
        final_eval_loss=eval_loss, tokens_per_s=mean_speed,
        mfu=mean_speed and mean_speed * flops_per_step / tokens_per_step / peak,
        peak_flops=peak, checkpoint_dir=str(run_dir / "checkpoints"), params_dir=str(params_dir), plot=plot,
        wall_s=time.perf_counter() - t_start, resumed_from=start or None, skipped_lines=skipped,
        stopped_at=stopped_at,
    )
