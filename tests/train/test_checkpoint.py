"""Checkpoints round-trip exactly, move between meshes, rotate, and survive crashes and corruption."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import checkpoint as ckpt_lib
from r1jax import config as config_lib
from r1jax.config import MeshConfig
from r1jax.parallel.mesh import make_mesh
from r1jax.train.state import TrainState
from r1jax.train.step import TrainStep, synthetic_batch

ROOT = Path(__file__).resolve().parents[2]
DATA_STATE = {"next_index": 17, "parents": [{"epoch": 1, "seed": 3}]}
META = {"seed": 0, "config": {"model": {"vocab_size": 256}, "steps": 4}}


def _target(step: TrainStep):
    return ckpt_lib.abstract_target(step.abstract, step.state_shardings)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps on mesh (2,2,2), an async save at step 2, two more steps that donate the state
    being saved (the save must already hold its own host copy)."""
    cfg = config_lib.load("configs/model/tiny-moe.yaml", "model.num_hidden_layers=2", "model.vocab_size=256",
                          "batch_size=8", "seq_len=16", "optim.learning_rate=3e-3")
    step = TrainStep(cfg, make_mesh(MeshConfig(data=2, expert=2, model=2), jax.devices()[:8]))
    batches = [synthetic_batch(cfg, jax.random.key(i)) for i in range(4)]
    state = step.init(0)
    for b in batches[:2]:
        state, _ = step(state, step.place_batch(b))
    host = jax.tree.map(np.asarray, state)
    run_dir = tmp_path_factory.mktemp("run")
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(run_dir), every=2, keep=3, async_save=True)
    assert ckpt.save(2, state, data_state=DATA_STATE, meta=META)
    losses = []
    for b in batches[2:]:
        state, metrics = step(state, step.place_batch(b))
        losses.append(float(metrics["loss"]))
    ckpt.close()
    return types.SimpleNamespace(cfg=cfg, step=step, batches=batches, host=host, run_dir=run_dir,
                                 dir=ckpt_lib.checkpoint_dir(run_dir), losses=losses)


def test_round_trip_is_bitwise_and_does_not_recompile(run):
    ckpt = ckpt_lib.Checkpointer(run.dir, every=2, keep=3)
    assert ckpt.latest_step() == 2
    state, data_state, meta = ckpt.restore(_target(run.step))
    _assert_trees_equal(state, run.host)
    assert int(state.step) == 2
    assert data_state == DATA_STATE
    assert meta["step"] == 2 and meta["seed"] == META["seed"] and meta["config"] == META["config"]
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(run.step.state_shardings)):
        assert x.sharding == s
    compiled = run.step._step._cache_size()
    state, _ = run.step(state, run.step.place_batch(run.batches[2]))
    assert run.step._step._cache_size() == compiled
    ckpt.close()


def test_restore_onto_another_mesh_continues_the_run(run):
    step = TrainStep(run.cfg, make_mesh(MeshConfig(data=8, expert=1, model=1), jax.devices()[:8]))
    ckpt = ckpt_lib.Checkpointer(run.dir, every=2, keep=3)
    state, _, _ = ckpt.restore(_target(step))
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(step.state_shardings)):
        assert x.sharding == s
    _assert_trees_equal(state, run.host)
    losses = []
    for b in run.batches[2:]:
        state, metrics = step(state, step.place_batch(b))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, run.losses, atol=1e-5, rtol=0)
    ckpt.close()


def test_export_load_and_resolve(run, tmp_path):
    target = _target(run.step)
    weights = {"params": target.params, "extra": target.extra}
    ckpt = ckpt_lib.Checkpointer(run.dir, every=2, keep=3)
    state, _, _ = ckpt.restore(target)
    ckpt.close()
    export = ckpt_lib.export_params(tmp_path / "export", state, meta={"config": META["config"]})
    assert not (export / "optimizer").exists()
    loaded = ckpt_lib.load_params(export, weights)
    _assert_trees_equal(loaded["params"], run.host.params)
    _assert_trees_equal(loaded["extra"], run.host.extra)
    for x, s in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(run.step.state_shardings.params)):
        assert x.sharding == s
    assert ckpt_lib.read_meta(export)["config"] == META["config"]
    # A run dir resolves to its newest finished step; an export to itself.
    assert ckpt_lib.resolve(run.run_dir) == run.dir / "2"
    assert ckpt_lib.resolve(export) == export
    params, extra = ckpt_lib.load_params(run.run_dir, target)  # a TrainState target: params + extra only
    _assert_trees_equal(params, run.host.params)
    _assert_trees_equal(extra, run.host.extra)
    # Exporting again replaces the export; a bare params target gives bare params.
    ckpt_lib.export_params(export, {"params": state.params}, meta={"v": 2})
    assert ckpt_lib.read_meta(export)["v"] == 2 and not (export / "extra").exists()
    _assert_trees_equal(ckpt_lib.load_params(export, target.params), run.host.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ----------------------------------------------------------------------------- on a small state


def _small_state(value: float, n: int = 1 << 18) -> TrainState:
    """`b` holds `value`; `w` is incompressible, so its data file is the largest one."""
    w = jax.random.normal(jax.random.key(int(value)), (n,), jnp.float32)
    params = nnx.State({"w": nnx.Param(w), "b": nnx.Param(jnp.full((4,), value, jnp.float32))})
    extra = nnx.State({"bias": nnx.Variable(jnp.full((4,), value))})
    opt_state = (jnp.asarray(3, jnp.int32), jax.tree.map(jnp.zeros_like, params))
    return TrainState(jnp.asarray(int(value), jnp.int32), params, extra, opt_state)


def _small_target():
    return jax.eval_shape(lambda: _small_state(0.0))


def test_keep_and_should_save(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path, every=3, keep=2, async_save=False)
    assert [s for s in range(10) if ckpt.should_save(s)] == [3, 6, 9]
    assert not ckpt.save(4, _small_state(4.0))  # not a save step
    for s in (3, 6, 9):
        assert ckpt.save(s, _small_state(float(s)))
    assert ckpt.save(10, _small_state(10.0), force=True)  # end of run
    assert not ckpt.save(10, _small_state(10.0), force=True)  # already there
    ckpt.wait()
    assert ckpt.all_steps() == [9, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "9"]
    state, data_state, meta = ckpt.restore(_small_target(), step=9)
    assert float(state.params["b"][0]) == 9.0 and data_state is None and meta["step"] == 9
    assert ckpt_lib.Checkpointer(tmp_path, every=0, keep=2).should_save(100) is False
    ckpt.close()


def test_leftover_tmp_and_partial_step_dirs_are_ignored(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=5, async_save=False)
    ckpt.save(1, _small_state(1.0))
    ckpt.close()
    # What a crash leaves: an unrenamed Orbax tmp dir, and a step dir copied half-way.
    tmp = tmp_path / "2.orbax-checkpoint-tmp"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "manifest.ocdbt").write_bytes(b"\0" * 100)
    (tmp_path / "3" / "params").mkdir(parents=True)
    ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=5)
    assert ckpt.latest_step() == 1
    state, _, _ = ckpt.restore(_small_target())
    assert float(state.params["b"][0]) == 1.0
    ckpt.close()


_KILLED_SAVE = textwrap.dedent("""
    import asyncio, sys, time
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from r1jax import checkpoint as ckpt_lib
    from tests.train.test_checkpoint import _small_state

    ckpt = ckpt_lib.Checkpointer(sys.argv[1], every=1, keep=5, async_save=True)
    ckpt.save(1, _small_state(1.0)); ckpt.wait()
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def slow_finalize(self, *a, **k):  # hold the commit open so the kill lands inside the save
        await asyncio.sleep(60)
        return await finalize(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
    ckpt.save(2, _small_state(2.0, n=1 << 23))  # 32 MiB, written in the background
    print("SAVING", flush=True)
    time.sleep(60)
""")


def test_save_killed_midway_keeps_the_previous_checkpoint(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "SAVING"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(p.name.startswith("2.orbax-checkpoint-tmp") for p in tmp_path.iterdir())  # really mid-save
    ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=5)
    assert ckpt.latest_step() == 1
    state, _, meta = ckpt.restore(_small_target())
    assert meta["step"] == 1 and float(state.params["b"][0]) == 1.0
    ckpt.close()


# A failed Orbax read leaves the reads of other shards un-awaited; their GeneratorExit is noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_corrupt_latest_falls_back_with_a_warning(tmp_path, caplog, damage):
    ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=5, async_save=False)
    ckpt.save(1, _small_state(1.0), data_state={"i": 1})
    ckpt.save(2, _small_state(2.0), data_state={"i": 2})
    ckpt.close()
    files = [p for p in (tmp_path / "2" / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(files, key=lambda p: p.stat().st_size)
    size = biggest.stat().st_size
    if damage == "truncate":
        biggest.write_bytes(biggest.read_bytes()[: size // 2])
    else:
        biggest.write_bytes(np.random.default_rng(0).bytes(size))
    ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=5)
    assert ckpt.latest_step() == 2
    with caplog.at_level(logging.WARNING, logger="r1jax.checkpoint"):
        state, data_state, meta = ckpt.restore(_small_target())
    assert meta["step"] == 1 and data_state == {"i": 1} and float(state.params["b"][0]) == 1.0
    assert any(str(tmp_path / "2") in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "2").is_dir()  # left for inspection
    with pytest.raises(Exception):
        ckpt.restore(_small_target(), step=2)
    # Saving step 2 again moves the broken one aside instead of failing or deleting it.
    ckpt.restore(_small_target())
    assert ckpt.save(2, _small_state(2.0), force=True)
    ckpt.wait()
    assert float(ckpt.restore(_small_target())[0].params["b"][0]) == 2.0
    assert any(p.name.startswith("2.unreadable-") for p in tmp_path.iterdir())
    ckpt.close()
