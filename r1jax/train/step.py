"""The compiled language-model train step and forward pass, sharded by the rules table.

    step = TrainStep(cfg, mesh)                     # shardings, optimizer, compiled once
    state = step.init(jax.random.key(0))            # created directly in its sharded layout
    state, metrics = step(state, batch)             # donated state, one optimizer step

Under a mesh the loss is traced inside `use_rules` (activation constraints), and the step's
graphdef carries the expert-parallel dispatch as its MoE layers' `expert_fn`, and
`parallel.expert_kernel` as their `expert_kernel` (`with_experts`, set once when the step is
built), so the model code itself never sees the mesh.
"""

from __future__ import annotations

import contextlib
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.config import Config, ConfigError, ParallelConfig
from r1jax.model.decoder import ModelOutput
from r1jax.model.moe import dropless_experts, routing_bias_update, set_expert_fn
from r1jax.parallel import rules as rules_lib
from r1jax.parallel.mesh import check_model_fits
from r1jax.train.losses import lm_loss
from r1jax.parallel.sharding import batch_shardings, shardings
from r1jax.train.state import TrainState, abstract_state, init_key, init_state, make_optimizer

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def forward(graphdef, params, extra, batch: dict) -> ModelOutput:
    model = nnx.merge(graphdef, params, extra)
    return model(batch["inputs"], batch["positions"], batch["segment_ids"], mtp_inputs=batch["targets"])


def with_experts(graphdef, params, extra, parallel: ParallelConfig, mesh: Mesh | None = None,
                 rules: dict | None = None) -> nnx.GraphDef:
    """`graphdef` (with abstract or real params / extra) with every MoE layer running
    `parallel.expert_kernel`, expert-parallel over `mesh` (`parallel.expert_dispatch`) if given."""
    fn = dropless_experts
    if mesh is not None:
        from r1jax.parallel.expert import make_expert_fn

        fn = make_expert_fn(mesh, rules, mode=parallel.expert_dispatch, capacity_factor=parallel.capacity_factor)
    model = nnx.merge(graphdef, params, extra)
    return nnx.graphdef(set_expert_fn(model, fn, kernel=parallel.expert_kernel))


def update_routing_biases(extra: nnx.State, loads, mtp_loads, gamma: float) -> nnx.State:
    """Aux-loss-free balancing after a step. loads [L_moe, E] and mtp_loads [M, E] are sums over
    the global batch (the arrays are global under jit), so every replica applies the same update."""
    extra = jax.tree.map(lambda x: x, extra)  # new Variable objects: the caller's state is not touched
    if loads is not None:
        v = extra["moe_layers"]["ffn"]["bias"]
        v.value = routing_bias_update(v.value, loads, gamma)
    if mtp_loads is not None:
        for k in range(mtp_loads.shape[0]):
            v = extra["mtp"][k]["block"]["ffn"]["bias"]
            v.value = routing_bias_update(v.value, mtp_loads[k], gamma)
    return extra


def guard_nonfinite(old: TrainState, new: TrainState, metrics: dict, grad_norm: jax.Array) -> TrainState:
    """A NaN/inf loss or gradient is never applied: parameters, optimizer and routing biases stay
    as they were (the step counter still moves on, past the batch). Sets metrics["nonfinite"]."""
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)  # noqa: E731
    return TrainState(new.step, keep(new.params, old.params), keep(new.extra, old.extra),
                      keep(new.opt_state, old.opt_state))


def load_metrics(loads: jax.Array) -> dict[str, jax.Array]:
    """max/mean expert load per MoE layer [L] and its worst layer."""
    ratio = loads.max(-1) / jnp.maximum(loads.mean(-1), 1e-9)
    return {"expert_load_max_over_mean": ratio, "expert_load_max_over_mean_worst": ratio.max()}


class TrainStep:
    """Owns the mesh-dependent pieces of a run: optimizer, shardings, compiled functions.
    Subclasses (GRPO) replace `_train_step` and `batch_keys`; the rest is shared."""

    batch_keys: tuple[str, ...] = BATCH_KEYS

    def __init__(self, cfg: Config, mesh: Mesh | None = None, *, keep_grads: bool = False):
        """keep_grads: the step also returns the gradients, as `metrics["grads"]` (for tests)."""
        # Every mode trains (GRPO too): fp8 experts are not Params, so they would silently stay frozen.
        if cfg.model.expert_dtype != "param":
            raise ConfigError("model.expert_dtype", f"fp8 experts are for sampling; train ({cfg.mode}) from "
                                                    "dequantized weights (model.expert_dtype=param)")
        self.cfg = cfg
        self.keep_grads = keep_grads
        self.mesh = mesh
        self.rules = rules_lib.rules_for(cfg.mesh.fsdp)
        self.optimizer = make_optimizer(cfg.optim)
        self.graphdef, abstract = abstract_state(cfg, self.optimizer)
        self.abstract = abstract
        if mesh is not None:
            check_model_fits(mesh, cfg.model, cfg.batch_size)
        self.graphdef = with_experts(self.graphdef, abstract.params, abstract.extra, cfg.parallel, mesh, self.rules)
        if mesh is not None:
            self.state_shardings = shardings(abstract, mesh, self.rules)
            self.batch_shardings = batch_shardings(self.batch_keys, mesh, self.rules)
            replicated = NamedSharding(mesh, PartitionSpec())
            grad_shardings = self.state_shardings.params if keep_grads else None
            self._step = jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, self.batch_shardings),
                out_shardings=(self.state_shardings, replicated, grad_shardings),
                donate_argnums=0,
            )
            logits_sharding = NamedSharding(mesh, rules_lib.to_pspec(("batch", "length", "vocab"), self.rules, mesh.axis_names))
            self._eval = jax.jit(
                self._eval_fn,
                in_shardings=(self.state_shardings.params, self.state_shardings.extra, self.batch_shardings),
                out_shardings=(replicated, logits_sharding),
            )
            self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        else:
            self._step = jax.jit(self._train_step, donate_argnums=0)
            self._eval = jax.jit(self._eval_fn)
            self._init = jax.jit(self._init_fn)

    # ------------------------------------------------------------------ traced functions

    @contextlib.contextmanager
    def _placement(self):
        """The activation sharding rules of the mesh (none without one)."""
        if self.mesh is None:
            yield
            return
        with rules_lib.use_rules(self.mesh, self.rules):
            yield

    def _init_fn(self, key):
        return init_state(self.cfg, key, self.optimizer)[1]

    def _loss(self, params, extra, batch):
        with self._placement():
            out = forward(self.graphdef, params, extra, batch)
            loss, metrics = lm_loss(out, batch, self.cfg.loss.mtp_weight)
        return loss, (metrics, out)

    def _eval_fn(self, params, extra, batch) -> tuple[dict, jax.Array]:
        _, (metrics, out) = self._loss(params, extra, batch)
        return metrics, out.logits

    def _grads(self, params, extra, batch):
        """One micro-batch: (grads, loss metrics, aux) with aux the expert loads and dispatch metrics."""
        (_, (metrics, out)), grads = jax.value_and_grad(self._loss, has_aux=True)(params, extra, batch)
        aux = {name: value.mean() for name, value in out.moe_metrics.items()}
        aux["loads"] = out.expert_loads
        aux["mtp_loads"] = out.mtp_expert_loads
        return grads, metrics, aux

    def _accumulated_grads(self, params, extra, batch):
        """grad_accum micro-batches under `lax.scan`: gradients and metrics averaged, loads summed.
        Micro-batch i takes rows i, i+A, i+2A, ... so every device keeps its share of each."""
        a = self.cfg.grad_accum
        if a == 1:
            return self._grads(params, extra, batch)

        def split(x):
            return jnp.swapaxes(x.reshape(x.shape[0] // a, a, *x.shape[1:]), 0, 1)

        def body(total, micro):
            micro = {k: rules_lib.constrain(v, ("batch", "length")) for k, v in micro.items()}
            with self._placement():
                part = self._grads(params, extra, micro)
            return jax.tree.map(jnp.add, total, part), None

        micro_batches = jax.tree.map(split, batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(self._grads, params, extra, first))
        (grads, metrics, aux), _ = jax.lax.scan(body, zeros, micro_batches)
        mean = lambda t: jax.tree.map(lambda x: x / a, t)  # noqa: E731
        aux = {k: (v if k in ("loads", "mtp_loads") else v / a) for k, v in aux.items()}
        return mean(grads), mean(metrics), aux

    def _train_step(self, state: TrainState, batch: dict):
        grads, metrics, aux = self._accumulated_grads(state.params, state.extra, batch)
        loads, mtp_loads = aux.pop("loads"), aux.pop("mtp_loads")
        new_state, metrics = self._update(state, grads, metrics, loads, mtp_loads, **aux)
        return new_state, metrics, grads if self.keep_grads else None

    def _update(self, state: TrainState, grads, metrics: dict, loads, mtp_loads, **aux) -> tuple[TrainState, dict]:
        """Gradients -> the next state: optimizer (clipping inside), routing biases from the expert
        loads, and the non-finite guard (an update with a NaN/inf loss or grad norm is dropped).
        Returns it with `metrics` plus grad_norm, `aux` and the load metrics. GRPO's step too."""
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = update_routing_biases(state.extra, loads, mtp_loads, self.cfg.model.bias_update_speed)
        grad_norm = optax.global_norm(grads)
        metrics = dict(metrics, grad_norm=grad_norm, **aux)
        if loads is not None:
            metrics.update(load_metrics(loads))
        return guard_nonfinite(state, TrainState(state.step + 1, params, extra, opt_state), metrics, grad_norm), metrics

    # ------------------------------------------------------------------ host API

    def init(self, seed: int | jax.Array) -> TrainState:
        """A fresh state, each array created directly with its sharding (nothing gathered)."""
        return self._init(init_key(seed) if isinstance(seed, int) else seed)

    def place(self, state: TrainState) -> TrainState:
        """Moves a (host or differently sharded) state onto this step's shardings."""
        return state if self.mesh is None else jax.device_put(state, self.state_shardings)

    def place_batch(self, batch: dict) -> dict:
        batch = {k: jnp.asarray(batch[k]) for k in self.batch_keys}
        return batch if self.mesh is None else jax.device_put(batch, self.batch_shardings)

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        state, metrics, grads = self._step(state, batch)
        if self.keep_grads:
            metrics = dict(metrics, grads=grads)
        return state, metrics

    def evaluate(self, state: TrainState, batch: dict) -> tuple[dict, jax.Array]:
        """Forward pass without gradients: (loss metrics, logits [B,T,V])."""
        return self._eval(state.params, state.extra, batch)

    def sharded_abstract(self) -> TrainState:
        """The state as `jax.ShapeDtypeStruct`s carrying this step's shardings: what a checkpoint
        restores into and what the dry run compiles for."""
        if self.mesh is None:
            return self.abstract
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.state_shardings)

    def lower(self, batch_shape: tuple[int, int]):
        """Lowers the train step for abstract inputs (the dry run): nothing is allocated."""
        abstract = self.sharded_abstract()
        batch = {}
        for k in BATCH_KEYS:
            dt = jnp.float32 if k == "loss_mask" else jnp.int32
            sh = self.batch_shardings[k] if self.mesh is not None else None
            batch[k] = jax.ShapeDtypeStruct(batch_shape, dt, sharding=sh)
        return self._step.lower(abstract, batch)


def synthetic_batch(cfg: Config, key: jax.Array, batch_size: int | None = None, seq_len: int | None = None) -> dict:
    """A random next-token batch (one document a row) for tests, benchmarks and the dry run."""
    b, t = batch_size or cfg.batch_size, seq_len or cfg.seq_len
    tokens = jax.random.randint(key, (b, t + 1), 0, cfg.model.vocab_size, dtype=jnp.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": jnp.ones((b, t), jnp.float32),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
    }
