"""R1's distillation (`mode: distill`): a DeepSeek-V3-architecture teacher's verified traces train a
(dense, Qwen2 / Llama-shaped) student; teacher and student share a tokenizer.

    summary = distill(config.load("configs/tiny-distill.yaml"))     # or: python train.py configs/tiny-distill.yaml

One config drives every step; each is resumable and skipped when done (re-running a finished run
only re-exports the student's params):

1. traces: the teacher samples `distill.samples` completions of `distill.prompts` built-in
   train-split prompts (the sampling engine, `rejection.engine_generate_fn`); `rejection_sample`
   keeps the finished ones whose rewards reach `distill.min` (default: correct and well formed).
   -> run_dir/traces.jsonl, SFT chats (written as traces.jsonl.tmp and renamed: a file there is
   complete). With `distill.eval_prompts`, traces of built-in eval-split prompts are held out
   in run_dir/traces_eval.jsonl (the held-out loss).
2. the student (`model:`, from `init_from` or fresh), checkpoints and params in run_dir:
   - `kind: sequence`: SFT on the traces (`loop.train` with data.source=traces.jsonl, data.format=chat).
   - `kind: logit`: the teacher's token distributions over the traces (`distill_losses`), by
     `DistillStep` in the same loop. Stored top-k (default): the teacher runs once over every
     trace and its top-k is kept in run_dir/trace_arrays/ (below), so the student trains
     without the teacher in memory. `live_teacher: true`: the teacher's params are held (frozen,
     outside the optimizer) and its forward runs inside the compiled student step (full vocabulary).
     `ce_weight` adds the next-token CE on the trace tokens.

run_dir/trace_arrays/ (logit-level; a `.tmp` directory renamed when complete), for split in
{train, eval}: `{split}_{key}.npy`, row i = line i of traces.jsonl / traces_eval.jsonl, the
chat tokenized as SFT does (`pipeline.tokenize_chat`), cut to seq_len, padded with pad_id:

    inputs, targets   [N, T] int32    targets[i, t] is the token after inputs[i, t]
    loss_mask         [N, T] float32  1 on completion targets (the assistant turn), 0 elsewhere
    lengths           [N]    int32    real tokens of the row (segment 1; the rest is padding)
    teacher_ids       [N, T, K] int32    the teacher's top-k next tokens at position t, best first
    teacher_logp      [N, T, K] float32  their log-probs, log_softmax over the teacher's full vocabulary at τ = 1

(teacher_* only with stored top-k; every position is stored, the loss takes the completion's.)

Teacher: `distill.teacher` is a run dir, params export or HF directory; its model config and
tokenizer come from there (`rejection.load_run`). Trace generation and the top-k pass run in this
process (one host: a multi-host run would need a sharded engine). Prompts come from the built-in
tasks only (a prompt file as data.source is not read yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import shutil
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from r1jax import checkpoint as ckpt_lib
from r1jax.config import Config, ConfigError, to_dict
from r1jax.data import pipeline
from r1jax.data.sources import read_chat
from r1jax.data.tokenizer import Tokenizer, chat_text, find_tokenizer, save_tokenizer
from r1jax.model.decoder import abstract_decoder
from r1jax.parallel import rules as rules_lib
from r1jax.parallel.mesh import check_model_fits
from r1jax.parallel.sharding import batch_shardings, shardings
from r1jax.sampling.engine import BATCH_DECODE_CHUNK, Engine, Weights
from r1jax.train.distill_losses import distill_loss, full_vocab_divergence, topk_divergence
from r1jax.train.grpo import prompt_records
from r1jax.train.loop import RunData, TrainSummary, train
from r1jax.train.losses import lm_loss
from r1jax.train.rejection import engine_generate_fn, format_stats, load_run, rejection_sample, sandbox_for
from r1jax.train.step import BATCH_KEYS, TrainStep, forward, with_experts

log = logging.getLogger(__name__)

TRACES, EVAL_TRACES, STATS, ARRAYS = "traces.jsonl", "traces_eval.jsonl", "traces_stats.json", "trace_arrays"
TOKEN_KEYS = ("inputs", "targets", "loss_mask", "lengths")
TOPK_KEYS = ("teacher_ids", "teacher_logp")
KEY = "distill.teacher"


# ----------------------------------------------------------------------------- the teacher


@dataclasses.dataclass
class Teacher:
    path: str
    cfg: Config  # the teacher's run config: its `model` is the teacher
    tokenizer: Tokenizer

    @classmethod
    def open(cls, cfg: Config) -> Teacher:
        """The teacher's config and tokenizer (no weights yet); a ConfigError naming distill.teacher."""
        path = cfg.distill.teacher
        try:
            teacher_cfg, tokenizer, _ = load_run(path, None, [])
        except (ConfigError, OSError) as e:  # OSError: FileNotFoundError (no checkpoint, no tokenizer), ...
            raise ConfigError(KEY, str(e) if str(path) in str(e) else f"{path}: {e}") from None
        return cls(str(path), teacher_cfg, tokenizer)

    def weights(self, mesh=None, rules=None, parallel=None) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
        """(graphdef, params, extra), restored straight into `mesh`'s shardings when given. With
        `parallel` (the student run's), the graphdef runs its MoE layers as `TrainStep`'s does:
        `parallel.expert_kernel`, expert-parallel over the mesh."""
        graphdef, params, extra = abstract_decoder(self.cfg.model)
        target = (params, extra)
        if mesh is not None:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target,
                                  shardings(target, mesh, rules))
        if parallel is not None:
            graphdef = with_experts(graphdef, params, extra, parallel, mesh, rules)
        params, extra = ckpt_lib.load_params(self.path, target)
        return graphdef, params, extra


def teacher_logits(graphdef, params, extra, batch: dict) -> jax.Array:
    """The teacher's logits [B, T, V] over a batch, in f32 and out of any gradient."""
    model = nnx.merge(graphdef, params, extra)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"]).logits
    return jax.lax.stop_gradient(logits.astype(jnp.float32))


def _same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    if a.vocab_size != b.vocab_size or (a.bos_id, a.eos_id, a.pad_id) != (b.bos_id, b.eos_id, b.pad_id):
        return False
    probe = chat_text(a, [{"role": "user", "content": "What is 12 + 30? Janet has 7 ducks."}],
                      add_generation_prompt=True) + "<think>\nFirst add the ones.\n</think>\n\n<answer>42</answer>"
    return a.encode(probe) == b.encode(probe)


def check_vocabularies(cfg: Config, teacher: Teacher) -> Tokenizer | None:
    """Teacher and student ids must line up: the student's own tokenizer (data.tokenizer, init_from's
    or run_dir's, as `loop` finds it), if it has one, must be the teacher's; the student's
    model.vocab_size must hold the teacher's tokenizer, and equal the teacher's for logit-level
    distillation. A one-line ConfigError naming distill.teacher; nothing is written. Returns the
    student's own tokenizer (None: it takes the teacher's)."""
    d, t = cfg.distill, teacher.tokenizer
    own = find_tokenizer([cfg.data.tokenizer, cfg.init_from, cfg.run_dir])
    if own is not None and not _same_vocabulary(own, t):
        raise ConfigError(KEY, f"the teacher's tokenizer ({t.vocab_size} ids) is not the student's ({own.vocab_size} "
                               f"ids, from data.tokenizer / init_from / run_dir): token ids would not line up")
    if t.vocab_size > cfg.model.vocab_size:
        raise ConfigError(KEY, f"the teacher's tokenizer has {t.vocab_size} ids, more than the student's "
                               f"model.vocab_size={cfg.model.vocab_size}")
    if d.kind == "logit" and teacher.cfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(KEY, f"logit-level distillation needs one vocabulary: the teacher's vocab_size is "
                               f"{teacher.cfg.model.vocab_size}, the student's model.vocab_size {cfg.model.vocab_size}")
    if d.kind == "logit" and not d.live_teacher and d.top_k > cfg.model.vocab_size:
        raise ConfigError("distill.top_k", f"{d.top_k} > the vocabulary ({cfg.model.vocab_size})")
    return own


# ----------------------------------------------------------------------------- 1. traces


def generate_traces(cfg: Config, teacher: Teacher, run_dir: Path) -> dict | None:
    """Writes run_dir/traces.jsonl (and traces_eval.jsonl) unless traces.jsonl is there; returns
    the rejection statistics by split, or None when skipped."""
    d = cfg.distill
    traces = run_dir / TRACES
    if traces.is_file():
        log.info("%s is there: trace generation skipped", traces)
        return None
    tok = teacher.tokenizer
    splits = [("eval", prompt_records(cfg, tok, "eval", d.eval_prompts), run_dir / EVAL_TRACES)] if d.eval_prompts else []
    splits.append(("train", prompt_records(cfg, tok, "train", d.prompts), traces))
    longest = max(len(r["prompt_ids"]) for _, records, _ in splits for r in records)
    max_len = min(teacher.cfg.model.max_position_embeddings,
                  1 << math.ceil(math.log2(max(longest + d.max_tokens, 64))))
    slots = min(64, 1 << math.ceil(math.log2(max(d.batch_prompts * d.samples, 8))))
    engine = Engine(Weights(*teacher.weights()), slots=slots, max_len=max_len, tokenizer=tok,
                    decode_chunk=BATCH_DECODE_CHUNK)
    generate = engine_generate_fn(engine, tok, temperature=d.temperature, top_p=d.top_p, max_tokens=d.max_tokens,
                                  seed=d.sample_seed)
    stats = {}
    with sandbox_for(cfg) as sandbox:  # the rewards' worker processes, for all splits
        for split, records, path in splits:
            tmp = path.with_name(path.name + ".tmp")
            kept, stats[split] = rejection_sample(generate, records, dict(d.min), d.samples, batch_prompts=d.batch_prompts,
                                                  keep_truncated=d.keep_truncated, timeout_s=cfg.grpo.reward_timeout_s,
                                                  out_path=tmp, sandbox=sandbox)
            log.info("teacher traces (%s):\n%s", split, format_stats(stats[split]))
            if not kept and split == "train":
                raise ConfigError("distill.min", f"none of the teacher's {stats[split]['samples']} completions passed "
                                                 f"{dict(d.min)}: a stronger teacher, more samples, or lower thresholds")
            if split == "train":
                (run_dir / STATS).write_text(json.dumps(stats, indent=1))
            os.replace(tmp, path)
    del engine
    return stats


def sequence_config(cfg: Config, run_dir: Path) -> Config:
    """The SFT run of sequence-level distillation: the student on the traces."""
    held_out = run_dir / EVAL_TRACES
    data = dataclasses.replace(cfg.data, source=str(run_dir / TRACES), format="chat",
                               eval_source=str(held_out) if held_out.is_file() else None)
    return dataclasses.replace(cfg, mode="sft", data=data)


# ----------------------------------------------------------------------------- 2. logit-level data


def tokenize_traces(path: Path, tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """The TOKEN_KEYS arrays of a traces file (the layout in the module docstring)."""
    records = read_chat(path)
    n = len(records)
    out = {"inputs": np.full((n, seq_len), tokenizer.pad_id, np.int32),
           "targets": np.full((n, seq_len), tokenizer.pad_id, np.int32),
           "loss_mask": np.zeros((n, seq_len), np.float32), "lengths": np.zeros(n, np.int32)}
    for i, record in enumerate(records):
        row = pipeline.tokenize_chat(record, tokenizer)
        length = min(len(row["inputs"]), seq_len)
        for key in ("inputs", "targets", "loss_mask"):
            out[key][i, :length] = row[key][:length]
        out["lengths"][i] = length
    return out


def _row_batch(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """segment_ids and positions of padded single-trace rows."""
    t = arrays["inputs"].shape[-1]
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), arrays["inputs"].shape)
    segment_ids = (positions < arrays["lengths"][..., None]).astype(np.int32)
    return {**{k: v for k, v in arrays.items() if k != "lengths"}, "segment_ids": segment_ids,
            "positions": np.ascontiguousarray(positions)}


def teacher_topk(cfg: Config, teacher: Teacher, tokens: dict[str, np.ndarray], mesh, rules) -> dict[str, np.ndarray]:
    """The teacher's top-k (`distill.top_k`) ids and log-probs at every position of every row."""
    k, b = cfg.distill.top_k, cfg.batch_size
    graphdef, params, extra = teacher.weights(mesh, rules, cfg.parallel)
    keys = ("inputs", "segment_ids", "positions")

    @jax.jit
    def topk(params, extra, batch):
        with rules_lib.use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
            logp = jax.nn.log_softmax(teacher_logits(graphdef, params, extra, batch), axis=-1)
        values, ids = jax.lax.top_k(logp, k)
        return ids.astype(jnp.int32), values

    n, t = tokens["inputs"].shape
    ids, logp = np.zeros((n, t, k), np.int32), np.zeros((n, t, k), np.float32)
    sharding = batch_shardings(keys, mesh, rules) if mesh is not None else None
    for start in range(0, n, b):
        chunk = {key: v[start: start + b] for key, v in tokens.items()}
        rows = len(chunk["inputs"])
        chunk = {key: np.concatenate([v, np.zeros((b - rows, *v.shape[1:]), v.dtype)]) for key, v in chunk.items()}
        batch = {key: v for key, v in _row_batch(chunk).items() if key in keys}
        batch = jax.device_put(batch, sharding) if sharding is not None else batch
        got_ids, got_logp = topk(params, extra, batch)
        ids[start: start + rows], logp[start: start + rows] = np.asarray(got_ids)[:rows], np.asarray(got_logp)[:rows]
    return {"teacher_ids": ids, "teacher_logp": logp}


def write_trace_arrays(cfg: Config, teacher: Teacher, run_dir: Path, mesh=None, rules=None) -> bool:
    """run_dir/trace_arrays/ for the traces there, unless complete already. True when written."""
    d = cfg.distill
    out = run_dir / ARRAYS
    splits = ["train"] + (["eval"] if (run_dir / EVAL_TRACES).is_file() else [])
    keys = TOKEN_KEYS + (() if d.live_teacher else TOPK_KEYS)
    if all((out / f"{s}_{k}.npy").is_file() for s in splits for k in keys):
        shapes = np.load(out / "train_inputs.npy", mmap_mode="r").shape[1:]
        topk = d.live_teacher or np.load(out / "train_teacher_ids.npy", mmap_mode="r").shape[-1] == d.top_k
        if shapes == (cfg.seq_len,) and topk:
            log.info("%s is there: the teacher's pass over the traces is skipped", out)
            return False
    tmp = run_dir / (ARRAYS + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for split in splits:
        arrays = tokenize_traces(run_dir / (TRACES if split == "train" else EVAL_TRACES), teacher.tokenizer, cfg.seq_len)
        if not d.live_teacher:
            arrays.update(teacher_topk(cfg, teacher, arrays, mesh, rules))
        for key, value in arrays.items():
            np.save(tmp / f"{split}_{key}.npy", value)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return True


class TraceRows:
    """Random access over one split's trace arrays (memory-mapped): item i is trace i's padded row."""

    def __init__(self, directory: Path, split: str, keys: tuple[str, ...]):
        self.arrays = {k: np.load(directory / f"{split}_{k}.npy", mmap_mode="r") for k in keys}

    def __len__(self) -> int:
        return len(self.arrays["inputs"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return _row_batch({k: np.asarray(v[i]) for k, v in self.arrays.items()})


def trace_dataset(rows: TraceRows, cfg: Config, *, train: bool):
    """Batches of this process's share: one trace a row (no packing), shuffled and repeated when training."""
    per_process = cfg.batch_size // jax.process_count()
    ds = grain.MapDataset.source(rows)
    ds = ds[: len(ds) // jax.process_count() * jax.process_count()][jax.process_index():: jax.process_count()]
    if train:
        ds = ds.shuffle(seed=cfg.seed).repeat(None)
    return ds.to_iter_dataset().batch(per_process, drop_remainder=True)


def logit_data(cfg: Config, mesh, *, teacher: Teacher, run_dir: Path) -> RunData:
    """`loop.train`'s data for logit-level distillation (writes the trace arrays first)."""
    rules = rules_lib.rules_for(cfg.mesh.fsdp)
    if mesh is not None:
        check_model_fits(mesh, teacher.cfg.model, cfg.batch_size)
    write_trace_arrays(cfg, teacher, run_dir, mesh, rules)
    keys = TOKEN_KEYS + (() if cfg.distill.live_teacher else TOPK_KEYS)
    train_rows = TraceRows(run_dir / ARRAYS, "train", keys)
    if len(train_rows) < cfg.batch_size:
        raise ConfigError("batch_size", f"{len(train_rows)} traces do not fill one batch of {cfg.batch_size}")
    held_out = []
    if (run_dir / ARRAYS / "eval_inputs.npy").is_file():
        held_out = list(itertools.islice(iter(trace_dataset(TraceRows(run_dir / ARRAYS, "eval", keys), cfg, train=False)),
                                         cfg.eval_batches))
    return RunData(teacher.tokenizer, trace_dataset(train_rows, cfg, train=True), held_out)


# ----------------------------------------------------------------------------- 2. logit-level step


class DistillStep(TrainStep):
    """The student's compiled step of logit-level distillation: `TrainStep` with its `_loss`
    replaced (sharding, grad accumulation, the non-finite guard and routing-bias updates stay
    shared). Stored top-k: the batch carries teacher_ids / teacher_logp [B, T, K] (sharded as
    [B, T] keys are: batch, length, the k axis whole). Live teacher: the teacher's (graphdef,
    params, extra) are held frozen and its logits [B, T, V] are added to the batch inside the
    same compiled function, before the (accumulated) student gradients."""

    def __init__(self, cfg: Config, mesh=None, *, teacher: Teacher | None = None, keep_grads: bool = False):
        self.live = cfg.distill.live_teacher
        self.batch_keys = BATCH_KEYS if self.live else BATCH_KEYS + TOPK_KEYS
        super().__init__(cfg, mesh, keep_grads=keep_grads)
        if not self.live:
            return
        if teacher is None:
            raise ValueError("distill.live_teacher needs the teacher")
        if mesh is not None:
            check_model_fits(mesh, teacher.cfg.model, cfg.batch_size)
        self.teacher_graphdef, *weights = teacher.weights(mesh, self.rules, cfg.parallel)
        self.teacher_weights = tuple(weights)
        if mesh is None:
            step, evaluate = jax.jit(self._live_step, donate_argnums=0), jax.jit(self._live_eval)
        else:
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            t_shardings = jax.tree.map(lambda x: x.sharding, self.teacher_weights)
            step = jax.jit(self._live_step, in_shardings=(self.state_shardings, self.batch_shardings, t_shardings),
                           out_shardings=(self.state_shardings, replicated,
                                          self.state_shardings.params if keep_grads else None),
                           donate_argnums=0)
            evaluate = jax.jit(self._live_eval, in_shardings=(self.state_shardings.params, self.state_shardings.extra,
                                                              self.batch_shardings, t_shardings))
        self._step = lambda state, batch: step(state, batch, self.teacher_weights)
        self._eval = lambda params, extra, batch: evaluate(params, extra, batch, self.teacher_weights)

    def _with_teacher(self, batch: dict, weights) -> dict:
        with self._placement():
            return dict(batch, teacher_logits=teacher_logits(self.teacher_graphdef, *weights, batch))

    def _live_step(self, state, batch, weights):
        return self._train_step(state, self._with_teacher(batch, weights))

    def _live_eval(self, params, extra, batch, weights):
        return self._eval_fn(params, extra, self._with_teacher(batch, weights))

    def _loss(self, params, extra, batch):
        d = self.cfg.distill
        with self._placement():
            out = forward(self.graphdef, params, extra, batch)
            lm, metrics = lm_loss(out, batch, self.cfg.loss.mtp_weight)  # CE + MTP + balance
        if "teacher_logits" in batch:
            per_token = full_vocab_divergence(out.logits, batch["teacher_logits"], d.loss, d.jsd_beta, d.kd_temperature)
        else:
            per_token = topk_divergence(out.logits, batch["teacher_ids"], batch["teacher_logp"], d.loss, d.jsd_beta,
                                        d.kd_temperature)
        kd = distill_loss(per_token, batch["loss_mask"])
        loss = kd + d.ce_weight * metrics["ce"] + (lm - metrics["ce"])
        return loss, (dict(metrics, loss=loss, kd=kd), out)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class DistillSummary:
    run_dir: str
    kind: str
    traces: int  # train traces the student learns from
    eval_traces: int
    generated: bool  # False: the traces were there (a resumed or finished run)
    trace_stats: dict | None  # rejection statistics by split (from traces_stats.json when skipped)
    student: TrainSummary
    params_dir: str  # the student's exported params (serving, evaluation, init_from)
    final_loss: float | None
    final_eval_loss: float | None  # held-out loss on the eval traces (None without distill.eval_prompts)

    def table(self) -> str:
        stats = (self.trace_stats or {}).get("train")
        kept = f" ({100 * stats['kept_fraction']:.1f}% of {stats['samples']} samples)" if stats else ""
        rows = [("kind", self.kind),
                ("teacher traces", f"{self.traces}{kept}, {self.eval_traces} held out"
                                   + ("" if self.generated else "; generated before, reused"))]
        return "\n".join(f"  {k:<22}{v}" for k, v in rows) + "\n" + self.student.table()


def _count_lines(path: Path) -> int:
    return sum(1 for _ in path.open(encoding="utf-8")) if path.is_file() else 0


def distill(cfg: Config) -> DistillSummary:
    """The whole of `mode: distill` (module docstring): traces, then the student. Checks that
    teacher and student share a vocabulary before anything is written."""
    if cfg.mode != "distill":
        raise ConfigError("mode", f"distill() runs mode: distill, not {cfg.mode!r}")
    if cfg.data.source != "builtin":
        raise ConfigError("data.source", "distillation prompts are the built-in tasks' (data.source: builtin)")
    teacher = Teacher.open(cfg)
    own_tokenizer = check_vocabularies(cfg, teacher)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (run_dir / "distill.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if own_tokenizer is None:  # the student's checkpoints carry the teacher's tokenizer
            save_tokenizer(teacher.tokenizer, run_dir)
    stats = generate_traces(cfg, teacher, run_dir)
    generated = stats is not None
    if stats is None and (run_dir / STATS).is_file():
        stats = json.loads((run_dir / STATS).read_text())
    if cfg.distill.kind == "sequence":
        student = train(sequence_config(cfg, run_dir))
    else:
        student = train(cfg, data=functools.partial(logit_data, teacher=teacher, run_dir=run_dir),
                        make_step=functools.partial(DistillStep, teacher=teacher))
    return DistillSummary(str(run_dir), cfg.distill.kind, _count_lines(run_dir / TRACES),
                          _count_lines(run_dir / EVAL_TRACES), generated, stats, student, student.params_dir,
                          student.final_loss, student.final_eval_loss)


__all__ = ["DistillStep", "DistillSummary", "Teacher", "check_vocabularies", "distill", "generate_traces",
           "sequence_config", "teacher_topk", "tokenize_traces", "write_trace_arrays"]
