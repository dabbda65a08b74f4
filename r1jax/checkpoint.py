"""Training checkpoints (Orbax), and params-only exports for serving.

    ckpt = Checkpointer(checkpoint_dir(cfg.run_dir), every=100, keep=3)
    if ckpt.should_save(step):
        ckpt.save(step, state, data_state=it.get_state(), meta={"seed": cfg.seed, "config": to_dict(cfg)})
    state, data_state, meta = ckpt.restore(abstract_target(train_step.abstract, train_step.state_shardings))

A step directory holds one Orbax item per concern, so a reader takes only what it needs:

    <dir>/<step>/params/      nnx.Param arrays               (Orbax PyTree, OCDBT)
    <dir>/<step>/extra/       MoE routing biases             (absent for dense models)
    <dir>/<step>/optimizer/   {"step", "opt_state"}
    <dir>/<step>/data/        data-iterator state, one JSON file a process (absent if none)
    <dir>/<step>/meta/        JSON: step, time, the caller's seed / config / ...

An export (`export_params`) is the same layout less `optimizer` and `data`, so serving code
reads a run's checkpoint and an export the same way (`load_params`, `resolve`).

Arrays are stored as nested dicts keyed by their pytree path ("opt_state/1/0/mu/embed"), not
as nnx / optax objects: the files do not depend on how those libraries flatten, and a restore
rebuilds the caller's own tree (its treedef, dtypes and shardings), so the jitted step sees
exactly the arrays it was compiled for. Restores read into `jax.ShapeDtypeStruct`s with a
`sharding`, so each host reads only its shards and a checkpoint moves between meshes.

Safety. Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete;
`latest_step` counts only renamed directories with Orbax's commit metadata, so a save killed
half-way never shadows the previous one. A finalized checkpoint that no longer reads
(truncated or overwritten files) is skipped by `restore()` with a warning naming it; it is left
on disk for inspection (and moved aside to `<step>.unreadable-<time>` only if the run saves
that step again).

A save that fails on the filesystem (disk full, quota, permissions; Orbax's writer threads report
it at the next save or wait) raises `CheckpointError`, one line naming the directory, the step and
the newest checkpoint still intact, and removes the partial step directory. Orbax's own logs of
that failure (a traceback a thread) and TensorStore's callbacks into the failed save's closed event
loop ("Event loop is closed", one a pending write) are not printed: the error says it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from grain._src.python.checkpoint.handler import CheckpointRestore as _GrainRestore
from grain._src.python.checkpoint.handler import CheckpointSave as _GrainSave

from r1jax.interop.safetensors_files import is_hf_dir

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # under a run_dir
_ITEMS = ("params", "extra", "optimizer", "data", "meta")
_COMMIT_FILE = "_CHECKPOINT_METADATA"  # written by Orbax before the final rename
_TMP = ".orbax-checkpoint-tmp"  # Orbax writes step N into N.orbax-checkpoint-tmp, then renames it


class CheckpointError(RuntimeError):
    """A save failed on the filesystem (no space left, quota exceeded, no permission). The message
    is one line: the cause, the step, the directory and the newest checkpoint still intact."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def abstract_target(abstract: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves carrying `sharding=`: the restore target of a state whose
    shapes are `abstract` (e.g. `TrainStep.abstract`) and layout `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ----------------------------------------------------------------------------- tree <-> named dict


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _names(tree) -> list[tuple[str, ...]]:
    """One path of strings a leaf; an nnx.Variable is named by where it sits, not by its
    internal `.value` field. Each Variable holds one array, so these line up with
    `jax.tree.leaves(tree)`."""
    paths = [tuple(_key_name(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]]
    if len(paths) != len(jax.tree.leaves(tree)):
        raise TypeError("checkpoint: a leaf of the state holds more than one array")
    if len(set(paths)) != len(paths):
        raise TypeError("checkpoint: two leaves of the state have the same path name")
    return paths


def _to_nested(tree) -> dict:
    out: dict = {}
    for path, leaf in zip(_names(tree), jax.tree.leaves(tree)):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _from_nested(nested: Mapping, target):
    """`target`'s tree (treedef, Variable metadata) holding the arrays of `nested`."""
    leaves = []
    for path in _names(target):
        node = nested
        for k in path:
            node = node[k]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(target), leaves)


def _with_default_sharding(target):
    """Leaves without a sharding (a host-side abstract state) restore onto the first local device."""
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        if getattr(x, "sharding", None) is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)
        return x

    return jax.tree.map(one, target)


# ----------------------------------------------------------------------------- directories


def _finished_steps(directory: Path) -> list[int]:
    """Steps whose save completed: a plain-integer directory (renamed from Orbax's tmp name)
    holding Orbax's commit metadata. Leftover tmp directories and half-copied ones do not count."""
    if not directory.is_dir():
        return []
    steps = []
    for p in directory.iterdir():
        if p.name.isdigit() and p.is_dir() and (p / _COMMIT_FILE).is_file():
            steps.append(int(p.name))
    return sorted(steps)


class _DataBox:
    """grain's per-process JSON handler wants an object with get_state/set_state."""

    def __init__(self, state=None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:
        pass


def _brief(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:160]}"


def _os_error(e: BaseException | None) -> int | None:
    """The errno behind a failed write: an OSError in `e`'s chain, or TensorStore's
    "[os_error_code='28']" in the ValueError that Orbax re-raises from its writer threads."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os_error_code='(\d+)'", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def _cause(code: int) -> str:
    return {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(
        code, os.strerror(code).lower())


class _FailedWriteNoise(logging.Filter):
    """Drops the error logs of a write that failed on the filesystem (Orbax's threads, asyncio's
    unretrieved tasks: one traceback each, the same error): it reaches the caller as a
    CheckpointError."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return _os_error(exc) is None and "os_error_code=" not in record.getMessage()


def _closed_loop_noise(previous):
    def hook(unraisable) -> None:
        # A failed save's other pending TensorStore writes complete into the event loop Orbax
        # already closed; nothing is lost (the save failed as a whole) and each one would print
        # a traceback.
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and unraisable.object is None:
            return
        previous(unraisable)

    hook.r1jax_quiet = True
    return hook


def _quiet_failed_writes() -> None:
    for name in ("absl", "asyncio"):  # Orbax's threads; "Task exception was never retrieved"
        logger = logging.getLogger(name)
        if not any(isinstance(f, _FailedWriteNoise) for f in logger.filters):
            logger.addFilter(_FailedWriteNoise())
    if not getattr(sys.unraisablehook, "r1jax_quiet", False):
        sys.unraisablehook = _closed_loop_noise(sys.unraisablehook)


def _data_file(step_dir: Path) -> Path:
    return step_dir / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


# ----------------------------------------------------------------------------- training checkpoints


class Checkpointer:
    """Periodic, asynchronous, rotating checkpoints of a TrainState and its run's host state."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        """every: steps between `should_save` hits (0: only forced saves); keep: newest kept."""
        self.directory = Path(directory).absolute()
        self.every = every
        self.keep = keep
        self._broken: set[int] = set()
        self._in_flight: int | None = None  # the step of a background save not yet waited for
        self._failed = False
        _quiet_failed_writes()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a killed save; never a finished step
        )
        self._mgr = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)

    # -- saving

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, step: int, state: Any, *, data_state: Any = None, meta: Mapping | None = None,
             force: bool = False) -> bool:
        """Starts saving `state` as `step` (in the background when async). The device arrays are
        copied to host before this returns, so the state may be donated to the next step.
        Returns False when nothing was saved: not a save step (and not `force`), or `step` is
        already saved."""
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        self._settle()  # the previous save's failure is reported as that step's, not this one's
        if step in self._mgr.all_steps():
            if step not in self._broken:
                return False
            self._move_aside(step)
        nested = _to_nested(state)
        items = {"params": ocp.args.StandardSave(nested["params"]),
                 "optimizer": ocp.args.StandardSave({k: nested[k] for k in ("step", "opt_state") if k in nested}),
                 "meta": ocp.args.JsonSave({"step": step, "time": time.time(), **(meta or {})})}
        if nested.get("extra"):
            items["extra"] = ocp.args.StandardSave(nested["extra"])
        if data_state is not None:
            items["data"] = _GrainSave(_DataBox(data_state))
        with self._reporting(step):
            saved = bool(self._mgr.save(step, args=ocp.args.Composite(**items), force=True))
        self._in_flight = step if saved else None
        return saved

    def _settle(self) -> None:
        """Waits for the save in flight, if any; raises its failure."""
        step, self._in_flight = self._in_flight, None
        with self._reporting(step):
            self._mgr.wait_until_finished()

    @contextlib.contextmanager
    def _reporting(self, step: int | None):
        """A filesystem failure while saving `step` as a one-line CheckpointError, its partial
        directory removed (a later start would remove it too; the space is wanted now)."""
        try:
            yield
        except Exception as e:
            code = _os_error(e)
            if code is None:
                raise
            self._failed = True
            if jax.process_index() == 0:
                for partial in self.directory.glob(f"{step}{_TMP}*"):
                    shutil.rmtree(partial, ignore_errors=True)
            newest = self.latest_step()
            intact = (f"the previous checkpoint, step {newest}, is intact (resume: auto continues from it)"
                      if newest is not None else "no earlier checkpoint")
            raise CheckpointError(f"{_cause(code)} while saving step {step} to {self.directory}; {intact}") from e

    def _move_aside(self, step: int) -> None:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.unreadable-{int(time.time())}"
        log.warning("checkpoint %s could not be read earlier; moving it to %s to save step %d again", src, dst, step)
        if jax.process_index() == 0:
            src.rename(dst)
        ocp.multihost.sync_global_processes(f"r1jax_checkpoint_move_aside_{step}")
        self._broken.discard(step)
        self._mgr.reload()

    def wait(self) -> None:
        """Blocks until a background save has been committed; raises its failure."""
        self._settle()

    def close(self) -> None:
        """Waits for the save in flight, then releases Orbax's threads. After a reported failure it
        only releases them (the failure is not raised twice)."""
        if not self._failed:
            self._settle()
            self._mgr.close()
            return
        with contextlib.suppress(Exception):
            self._mgr.close()

    # -- reading

    def all_steps(self) -> list[int]:
        """Finished saves on disk, oldest first (a save still in flight is not among them)."""
        return _finished_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of `step`, or of the newest checkpoint that reads.

        target: the state as `jax.ShapeDtypeStruct`s with `sharding=` (`abstract_target`); the
        restored state has its exact tree, dtypes and shardings. With step=None an unreadable
        checkpoint is skipped with a warning and the next older one tried."""
        self._settle()
        if step is not None:
            return self._restore_step(target, int(step))
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        error: Exception | None = None
        for s in reversed(steps):
            try:
                out = self._restore_step(target, s)
            except Exception as e:  # any read failure: truncated, overwritten, missing files
                log.warning("checkpoint %s is unreadable (%s); falling back to an older one. "
                            "It is left in place for inspection.", self.directory / str(s), _brief(e))
                self._broken.add(s)
                error = e
                continue
            if s != steps[-1]:
                log.warning("restored checkpoint step %d, not the newest (%d)", s, steps[-1])
            return out
        raise RuntimeError(f"no checkpoint in {self.directory} could be read (steps {steps})") from error

    def _restore_step(self, target: Any, step: int) -> tuple[Any, Any, dict]:
        step_dir = self.directory / str(step)
        nested_target = _to_nested(_with_default_sharding(target))
        items = {"params": ocp.args.StandardRestore(nested_target["params"]),
                 "optimizer": ocp.args.StandardRestore({k: nested_target[k] for k in ("step", "opt_state")
                                                        if k in nested_target}),
                 "meta": ocp.args.JsonRestore()}
        if nested_target.get("extra"):
            items["extra"] = ocp.args.StandardRestore(nested_target["extra"])
        has_data = (step_dir / "data").is_dir()
        if has_data and _data_file(step_dir).is_file():
            items["data"] = _GrainRestore(_DataBox())
        elif has_data:
            log.warning("checkpoint %s has no data-iterator state for process %d of %d (saved by another "
                        "process count): the data iterator starts afresh", step_dir, jax.process_index(),
                        jax.process_count())
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        nested = dict(out["optimizer"], params=out["params"])
        if "extra" in items:
            nested["extra"] = out["extra"]
        state = _from_nested(nested, target)
        data_state = out["data"].state if "data" in items else None
        return state, data_state, dict(out["meta"])


# ----------------------------------------------------------------------------- params for serving


def _is_train_state(tree) -> bool:
    """A TrainState (`r1jax.train.state`), by its fields: this module sits below `train`."""
    return all(hasattr(tree, a) for a in ("step", "params", "extra", "opt_state"))


def _weights(tree) -> dict:
    """{"params", "extra"} of a TrainState, a (params, extra) pair, a mapping, or bare params."""
    if _is_train_state(tree):
        return {"params": tree.params, "extra": tree.extra}
    if isinstance(tree, tuple) and len(tree) == 2 and not hasattr(tree, "_fields"):
        return {"params": tree[0], "extra": tree[1]}
    if isinstance(tree, Mapping) and "params" in tree:
        return {k: tree[k] for k in ("params", "extra") if k in tree}
    return {"params": tree}


def export_params(directory: str | Path, state_or_params, meta: Mapping | None = None) -> Path:
    """Writes params (+ routing biases) without the optimizer, for serving or a later run's
    `init_from`. `state_or_params`: a TrainState, (params, extra), {"params", "extra"}, or a
    params State. The directory appears only once complete; an existing export there is
    replaced after the new one is written. Returns its path."""
    directory = Path(directory).absolute()
    _quiet_failed_writes()
    weights = _weights(state_or_params)
    items = {"params": ocp.args.PyTreeSave(_to_nested(weights["params"])),
             "meta": ocp.args.JsonSave({"time": time.time(), **(meta or {})})}
    handlers = {"params": ocp.PyTreeCheckpointHandler(use_compression=False), "meta": ocp.JsonCheckpointHandler()}
    if "extra" in weights and jax.tree.leaves(weights["extra"]):
        items["extra"] = ocp.args.PyTreeSave(_to_nested(weights["extra"]))
        handlers["extra"] = ocp.PyTreeCheckpointHandler(use_compression=False)
    stamp = int(time.time() * 1000)
    fresh = directory.with_name(f"{directory.name}.new-{stamp}")
    # Uncompressed: zstd over every array at once held ~the parameters' size again in host memory
    # and took 4x longer (benchmarks/convert.py); the files are ~20% larger.
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers)) as ckptr:
            ckptr.save(fresh, args=ocp.args.Composite(**items))
    except Exception as e:
        code = _os_error(e)
        if code is None:
            raise
        if jax.process_index() == 0:
            for partial in fresh.parent.glob(f"{fresh.name}*"):
                shutil.rmtree(partial, ignore_errors=True)
        before = "the previous export there is intact" if directory.exists() else "nothing was exported"
        raise CheckpointError(f"{_cause(code)} while exporting params to {directory}; {before}") from e
    if jax.process_index() == 0:
        old = directory.with_name(f"{directory.name}.old-{stamp}")
        if directory.exists():
            directory.rename(old)
        fresh.rename(directory)
        if old.exists():
            shutil.rmtree(old)
    ocp.multihost.sync_global_processes(f"r1jax_export_params_{stamp}")
    return directory


def _is_weights_dir(path: Path) -> bool:
    return (path / "params").is_dir() and (path / _COMMIT_FILE).is_file()


def _candidates(path: str | Path) -> list[Path]:
    """Directories holding a `params` item, best first: an export or step dir itself, or the
    finished steps of a checkpoints dir / run dir, newest first."""
    path = Path(path).absolute()
    if _is_weights_dir(path):
        return [path]
    for d in (path / CHECKPOINTS, path):
        steps = _finished_steps(d)
        if steps:
            return [d / str(s) for s in reversed(steps)]
    raise FileNotFoundError(f"{path}: neither exported params nor a run/checkpoint directory with a finished step")


def resolve(path: str | Path) -> Path:
    """The directory whose params `path` names: an export (or one step directory) as is, a run
    dir or checkpoints dir as its newest finished step. `load_params` on the run dir itself
    also skips a newest step that does not read."""
    return _candidates(path)[0]


def load_params(directory: str | Path, target):
    """Params and routing biases from an export, a step dir, a run dir (its newest checkpoint
    that reads), or a Hugging Face model directory (streamed); the optimizer state is never read.

    target, as `jax.ShapeDtypeStruct`s with `sharding=`: (params, extra) or a TrainState ->
    (params, extra); {"params", "extra"} -> the same dict; bare params -> params."""
    if is_hf_dir(directory):
        from r1jax.interop.hf_dir import load_weights

        return load_weights(directory, (target.params, target.extra) if _is_train_state(target) else target)
    want = _weights(target)
    errors = []
    for d in _candidates(directory):
        try:
            got = _load_weights(d, want)
            if isinstance(target, tuple) or _is_train_state(target):
                return got["params"], got["extra"]
            return got if isinstance(target, Mapping) and "params" in target else got["params"]
        except Exception as e:
            log.warning("params in %s are unreadable (%s); trying an older checkpoint", d, _brief(e))
            errors.append(e)
    raise RuntimeError(f"no readable params under {directory}") from errors[-1]


def _load_weights(d: Path, want: dict) -> dict:
    items = {}
    for name, tree in want.items():
        if jax.tree.leaves(tree):
            items[name] = ocp.args.StandardRestore(_to_nested(_with_default_sharding(tree)))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(d, args=ocp.args.Composite(**items))
    return {name: _from_nested(out[name], tree) if name in items else tree for name, tree in want.items()}


def read_meta(directory: str | Path) -> dict:
    """The JSON metadata of an export or of a run's newest finished checkpoint. An HF model
    directory's: its model config (as a run config's `model`) and itself as the tokenizer."""
    if is_hf_dir(directory):
        from r1jax.interop.hf_dir import model_config

        return {"config": {"model": dataclasses.asdict(model_config(directory))}, "tokenizer": str(directory)}
    return json.loads((resolve(directory) / "meta" / "metadata").read_text())
