"""Train state and the optimizer (their shardings: `r1jax.parallel.sharding`).

The model is split once: `graphdef` (static structure), `params` (every `nnx.Param`, what the
optimizer updates) and `extra` (the rest: the MoE routing biases, updated by their own rule).
Steps are pure functions of these states, merged back into a module only inside the trace.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from r1jax.config import Config, OptimConfig
from r1jax.model.decoder import Decoder
from r1jax.parallel.sharding import batch_shardings, shardings  # noqa: F401  (re-exported: sampling/engine.py, interop/hf_dir.py)

_BIASES = {"bq", "bk", "bv", "bo"}


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: nnx.State
    extra: nnx.State  # non-Param model state: RoutingBias
    opt_state: Any


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine down to min_lr_ratio · peak over decay_steps."""
    peak = cfg.learning_rate
    if cfg.decay_steps:
        return optax.warmup_cosine_decay_schedule(
            0.0 if cfg.warmup_steps else peak, peak, cfg.warmup_steps, cfg.warmup_steps + cfg.decay_steps,
            end_value=peak * cfg.min_lr_ratio,
        )
    if cfg.warmup_steps:
        return optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.constant_schedule(peak)


def _decay_mask(params: nnx.State) -> nnx.State:
    """True where weight decay applies: not on norms and biases."""

    def decays(path, leaf):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        return name not in _BIASES and "norm" not in getattr(leaf, "axes", ())

    return jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace(decays(path, v)) if isinstance(v, nnx.Variable) else True,
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def _moments_stored_as(dtype, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with every Adam moment (mu and nu) stored in `dtype`, its update math in float32:
    gradients are upcast before `inner` sees them, the moments upcast as they combine with them
    (promotion), and only the stored moments are rounded. optax's `mu_dtype` covers mu only, and
    nu follows the params' dtype. The state's tree is `inner`'s, so checkpoint paths are unchanged."""
    dtype = jnp.dtype(dtype)

    def store(state):
        def cast(s):
            if isinstance(s, optax.ScaleByAdamState):
                return s._replace(mu=optax.tree.cast(s.mu, dtype), nu=optax.tree.cast(s.nu, dtype))
            return s

        return jax.tree.map(cast, state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))

    def init(params):
        return store(inner.init(params))

    def update(grads, state, params=None):
        updates, state = inner.update(optax.tree.cast(grads, jnp.float32), state, params)
        return updates, store(state)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, none on norms and biases) after global-norm clipping, in
    float32, its moments stored as `cfg.moment_dtype`."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=_decay_mask)
    )
    return _moments_stored_as(cfg.moment_dtype, optax.chain(*parts))


def init_key(seed: int) -> jax.Array:
    """The key parameters are drawn from. RBG, not threefry: XLA:CPU compiles a threefry sampler
    per parameter shape (minutes for a MoE decoder on 2 cores), RBG in seconds. Its values are
    fixed by seed and sharding; a checkpoint, not the seed, moves a run between meshes."""
    return jax.random.key(seed, impl="rbg")


def init_state(cfg: Config, key: jax.Array, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    model = Decoder(cfg.model, rngs=nnx.Rngs(params=key))
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, extra, optimizer.init(params))
    return graphdef, state


def abstract_state(cfg: Config, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Shapes, dtypes and axis metadata of the state; nothing allocated."""
    out = {}

    def build(key):
        graphdef, state = init_state(cfg, key, optimizer)
        out["graphdef"] = graphdef
        return state

    state = jax.eval_shape(build, init_key(0))
    return out["graphdef"], state
