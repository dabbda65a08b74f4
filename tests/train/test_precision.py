"""AdamW's numerics: the float32 optimizer against a NumPy AdamW written from the formulas,
bfloat16 moments within bf16 rounding of it, bf16 master weights, and a checkpoint round trip of
bf16 moments."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import checkpoint as ckpt_lib
from r1jax import config as config_lib
from r1jax.config import OptimConfig
from r1jax.train.step import TrainStep, synthetic_batch

# A Qwen2-shaped student (q/k/v biases, norms) so the decay mask has both kinds of exemption.
BASE = ("configs/model/tiny-dense.yaml", "model.vocab_size=64", "model.num_hidden_layers=1", "batch_size=2", "seq_len=8",
        "optim.learning_rate=1e-2", "optim.weight_decay=0.1", "optim.grad_clip=0.5")
STEPS = 3
BF16_EPS = 2.0**-7  # spacing of bfloat16 numbers just above 1 (8 significand bits)


def named(tree) -> dict[str, np.ndarray]:
    """Leaves by their pytree path, as float64 host arrays."""
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def decays(name: str) -> bool:
    """Decoupled weight decay on the matrices only: not on norm scales, not on q/k/v/o biases."""
    return "norm" not in name and not re.search(r"\['b[qkvo]'\]", name)


class NumpyAdamW:
    """AdamW after global-norm clipping, float64 (Loshchilov & Hutter: decay decoupled from the
    Adam direction, both scaled by the learning rate)."""

    def __init__(self, o: OptimConfig, params: dict[str, np.ndarray]):
        self.o, self.p, self.t = o, dict(params), 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Updates the parameters; returns the update applied to each."""
        o = self.o
        norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
        scale = min(1.0, o.grad_clip / norm)
        self.t += 1
        deltas = {}
        for k, g in grads.items():
            g = g * scale
            self.m[k] = o.b1 * self.m[k] + (1 - o.b1) * g
            self.v[k] = o.b2 * self.v[k] + (1 - o.b2) * g * g
            m_hat, v_hat = self.m[k] / (1 - o.b1**self.t), self.v[k] / (1 - o.b2**self.t)
            direction = m_hat / (np.sqrt(v_hat) + o.eps) + o.weight_decay * decays(k) * self.p[k]
            deltas[k] = -o.learning_rate * direction
            self.p[k] = self.p[k] + deltas[k]
        return deltas


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """|a - b| / |b| in L2 (0 when both are 0): robust where single entries cancel."""
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale else float(np.linalg.norm(a))


def adam_moments(opt_state) -> tuple:
    """(mu, nu) of the one Adam state inside the optimizer's."""
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    return adam.mu, adam.nu


@pytest.fixture(scope="module")
def start():
    """One fresh state on the host; every run starts from it, cast to its own dtypes (one init
    compile instead of one a run: compiles are most of this file's time)."""
    return jax.device_get(TrainStep(config_lib.load(*BASE)).init(0))


def run(start, *overrides: str, keep_grads: bool = True):
    """STEPS train steps from `start`: the step, the final state and per step (params before,
    grads, params after) as float64."""
    cfg = config_lib.load(*BASE, *overrides)
    step = TrainStep(cfg, keep_grads=keep_grads)
    state = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), start, step.abstract)
    history = []
    for i in range(STEPS):
        before = named(state.params)
        state, metrics = step(state, step.place_batch(synthetic_batch(cfg, jax.random.key(i))))
        assert np.isfinite(float(metrics["loss"]))
        history.append((before, named(metrics.get("grads", {})), named(state.params)))
    return types.SimpleNamespace(cfg=cfg, step=step, state=state, history=history)


@pytest.fixture(scope="module")
def f32(start):
    return run(start)


@pytest.fixture(scope="module")
def bf16(start):
    return run(start, "optim.moment_dtype=bfloat16")


def test_float32_adamw_matches_numpy(f32):
    ref = NumpyAdamW(f32.cfg.optim, f32.history[0][0])
    assert {k for k in ref.p if not decays(k)} >= {"['dense_layers']['attn']['bq'].value", "['norm']['weight'].value"}
    for before, grads, after in f32.history:
        ref.step(grads)
        for k in after:
            np.testing.assert_allclose(after[k], ref.p[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_bfloat16_moments_are_stored_in_bf16_and_round_only_that(f32, bf16):
    mu, nu = adam_moments(bf16.state.opt_state)
    assert {x.dtype for x in jax.tree.leaves((mu, nu))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(bf16.state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(adam_moments(f32.state.opt_state))} == {jnp.dtype(jnp.float32)}

    ref = NumpyAdamW(bf16.cfg.optim, bf16.history[0][0])
    worst = 0.0
    for before, grads, after in bf16.history:
        deltas = ref.step(grads)  # the f32 (here f64) optimizer on the same gradients
        for k in after:
            worst = max(worst, rel_err(after[k] - before[k], deltas[k]))
    assert 1e-5 < worst < BF16_EPS, worst  # rounded (f32 moments are ~1e-7 off), by less than bf16's spacing
    for stored, exact in ((named(mu), ref.m), (named(nu), ref.v)):
        for k in exact:
            assert rel_err(stored[k], exact[k]) < BF16_EPS, k


def test_bf16_master_weights_with_bf16_moments_step(start):
    bf16_all = run(start, "model.param_dtype=bfloat16", "optim.moment_dtype=bfloat16", keep_grads=False)
    abstract = bf16_all.step.abstract
    assert {x.dtype for x in jax.tree.leaves((*adam_moments(abstract.opt_state), abstract.params))} == \
        {jnp.dtype(jnp.bfloat16)}
    assert [x.dtype for x in jax.tree.leaves(bf16_all.state)] == [x.dtype for x in jax.tree.leaves(abstract)]
    for before, _, after in bf16_all.history:
        assert any(not np.array_equal(before[k], v) for k, v in after.items())


def test_float32_math_under_bf16_gradients():
    """bf16 params and gradients: clipping and the Adam direction in f32, f32 updates out."""
    from r1jax.train.state import make_optimizer

    o = OptimConfig(learning_rate=1e-2, weight_decay=0.0, grad_clip=0.5, moment_dtype="bfloat16")
    opt = make_optimizer(o)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.bfloat16)}
    grads = {"w": jnp.asarray(rng.normal(size=(64, 64)) * 1e-3, jnp.bfloat16)}
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    assert updates["w"].dtype == jnp.float32
    ref = NumpyAdamW(o, named(params)).step(named(grads))
    assert rel_err(np.asarray(updates["w"], np.float64), ref["['w']"]) < 1e-6  # nothing rounded to bf16 on the way


def test_checkpoint_round_trip_keeps_bf16_moments(bf16, tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    assert ckpt.save(STEPS, bf16.state, force=True)
    restored, _, _ = ckpt.restore(bf16.step.abstract)
    ckpt.close()
    assert jax.tree.structure(restored) == jax.tree.structure(bf16.state)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(bf16.state)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    mu, _ = adam_moments(restored.opt_state)
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
