"""DeepSeekMoE (`r1jax.model.moe`) against a dense NumPy reference of spec §3.

The reference runs EVERY expert on every token and combines with a dense [N, E] weight matrix
built from the spec's routing formulas, so it shares nothing with the sorted `ragged_dot` path
under test. Reference gradients are the dense formula's backward pass derived by hand in NumPy,
with the (piecewise-constant) expert choice held fixed.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.model.decoder import Decoder
from r1jax.model.moe import MoE, Routing, RoutingBias, expert_loads, routing_bias_update, sequence_balance_loss

D, E, F = 32, 16, 8
B, T = 2, 12


def _cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        n_routed_experts=E, num_experts_per_tok=4, moe_intermediate_size=F, n_shared_experts=2,
        first_k_dense_replace=1, n_group=4, topk_group=2, scoring_func="sigmoid", topk_method="noaux_tc",
        routed_scaling_factor=2.5, norm_topk_prob=True, aux_loss_alpha=1e-4,
    )
    base.update(kw)
    return ModelConfig(**base)


V3_CFG = _cfg()
V2_CFG = _cfg(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
              routed_scaling_factor=1.0, norm_topk_prob=False, aux_loss_alpha=1e-3)


def _build(cfg: ModelConfig, seed: int, bias_scale: float = 0.3) -> tuple[MoE, dict[str, np.ndarray]]:
    """An abstract MoE (no random init to compile) whose every weight is then set from NumPy,
    gate logits big enough that routing matters. Returns the module and its weights in f64."""
    moe = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    w = {
        "gate": rng.normal(0, 0.3, (D, E)),
        "w_gate": rng.normal(0, 0.3, (E, D, F)),
        "w_up": rng.normal(0, 0.3, (E, D, F)),
        "w_down": rng.normal(0, 0.3, (E, F, D)),
    }
    for k, v in w.items():
        getattr(moe, k).value = jnp.asarray(v, jnp.float32)
    if moe.cfg.n_shared_experts:
        fs = F * moe.cfg.n_shared_experts
        for name, shape in (("gate_proj", (D, fs)), ("up_proj", (D, fs)), ("down_proj", (fs, D))):
            w["shared_" + name] = rng.normal(0, 0.3, shape)
            getattr(moe.shared, name).value = jnp.asarray(w["shared_" + name], jnp.float32)
    if hasattr(moe, "bias"):
        w["bias"] = rng.uniform(-bias_scale, bias_scale, (E,))
        moe.bias.value = jnp.asarray(w["bias"], jnp.float32)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(nnx.state(moe)))
    return moe, {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}


_jit_forward = jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state)(x), static_argnums=0)


def _forward(moe, x):
    return _jit_forward(*nnx.split(moe), jnp.asarray(x, jnp.float32))


# ----------------------------------------------------------------------------- NumPy reference


def _silu(z):
    return z / (1.0 + np.exp(-z))


def np_route(logits, bias, cfg):
    """Spec §3 per token: scores, choice by s+b (group top-2 sums, best topk_group groups,
    top-K inside), weights from s without b. Returns (dense weights [N,E], chosen [N,E], s [N,E])."""
    n, e = logits.shape
    if cfg.scoring_func == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    else:
        z = np.exp(logits - logits.max(-1, keepdims=True))
        s = z / z.sum(-1, keepdims=True)
    c = s + bias if bias is not None else s
    per = e // cfg.n_group
    chosen = np.zeros((n, e), bool)
    for i in range(n):
        allowed = np.ones(e, bool)
        if cfg.n_group > 1:
            group_score = [np.sort(c[i, g * per:(g + 1) * per])[-2:].sum() for g in range(cfg.n_group)]
            allowed[:] = False
            for g in np.argsort(group_score)[::-1][: cfg.topk_group]:
                allowed[g * per:(g + 1) * per] = True
        cand = np.where(allowed, c[i], -np.inf)
        chosen[i, np.argsort(cand)[::-1][: cfg.num_experts_per_tok]] = True
    w = np.where(chosen, s, 0.0)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    return w * cfg.routed_scaling_factor, chosen, s


def np_moe(x, w, cfg):
    """x [N, D] -> y [N, D]: all E experts computed densely, combined by the routing weights."""
    logits = x @ w["gate"]
    weights, chosen, s = np_route(logits, w.get("bias"), cfg)
    hidden = _silu(np.einsum("ND,EDF->NEF", x, w["w_gate"])) * np.einsum("ND,EDF->NEF", x, w["w_up"])
    every = np.einsum("NEF,EFD->NED", hidden, w["w_down"])
    y = np.einsum("NE,NED->ND", weights, every)
    if cfg.n_shared_experts:
        y = y + (_silu(x @ w["shared_gate_proj"]) * (x @ w["shared_up_proj"])) @ w["shared_down_proj"]
    return y, chosen, s


def np_balance_loss(chosen, s, batch, cfg):
    """Spec §3: per sequence f_i = E/(K T) #{t: i in TopK(t)}, P_i = mean_t s_i,t / Σ_j s_j,t,
    L = α Σ_i f_i P_i; the layer reports the mean over sequences."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    chosen, s = chosen.reshape(batch, -1, e), s.reshape(batch, -1, e)
    t = chosen.shape[1]
    losses = []
    for b in range(batch):
        f = e / (k * t) * chosen[b].sum(0)
        p = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
        losses.append(cfg.aux_loss_alpha * np.sum(f * p))
    return np.mean(losses)


def _input(seed, shape=(B, T, D)):
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("cfg", [V3_CFG, V2_CFG], ids=["v3_sigmoid_groups_bias", "v2_softmax_greedy"])
def test_forward_matches_dense_reference(cfg):
    moe, w = _build(cfg, seed=1)
    x = _input(2)
    y, stats = _forward(moe, x)
    chex.assert_shape(y, (B, T, D))
    y_ref, chosen, s = np_moe(x.reshape(-1, D).astype(np.float64), w, cfg)
    chex.assert_trees_all_close(y, y_ref.reshape(B, T, D).astype(np.float32), atol=1e-5, rtol=1e-5)

    # expert_loads: a plain count of (token, expert) pairs.
    counts = chosen.sum(0).astype(np.float32)
    chex.assert_trees_all_close(stats["loads"], counts)
    assert counts.sum() == B * T * cfg.num_experts_per_tok
    np.testing.assert_allclose(stats["balance_loss"], np_balance_loss(chosen, s, B, cfg), rtol=1e-5)


def test_v3_routing_exercises_groups_and_bias():
    """The forward test above could not tell group limiting, the bias or the un-biased weights
    apart unless they change the result on these inputs: check that they do."""
    cfg = V3_CFG
    _, w = _build(cfg, seed=1)
    x = _input(2).reshape(-1, D).astype(np.float64)
    logits = x @ w["gate"]
    _, chosen, s = np_route(logits, w["bias"], cfg)
    _, chosen_no_bias, _ = np_route(logits, np.zeros(E), cfg)
    _, chosen_no_groups, _ = np_route(logits, w["bias"], _cfg(n_group=1, topk_group=1))
    assert (chosen != chosen_no_bias).any(axis=1).sum() >= 3
    assert (chosen != chosen_no_groups).any(axis=1).sum() >= 3
    # The chosen experts of each token lie in exactly topk_group (or fewer) groups.
    per_group = chosen.reshape(-1, cfg.n_group, E // cfg.n_group).any(-1).sum(-1)
    assert (per_group <= cfg.topk_group).all()
    # Weights taken from s + b instead of s would differ: the forward test pins the use of s.
    with_b, without_b = np.where(chosen, s + w["bias"], 0.0), np.where(chosen, s, 0.0)
    normed = lambda a: a / a.sum(-1, keepdims=True)  # noqa: E731
    assert not np.allclose(normed(with_b), normed(without_b), atol=1e-3)


def test_v2_has_no_bias_and_unnormalised_weights():
    moe, w = _build(V2_CFG, seed=3)
    assert not hasattr(moe, "bias")
    x = _input(4).reshape(-1, D).astype(np.float64)
    weights, _, _ = np_route(x @ w["gate"], None, V2_CFG)
    sums = weights.sum(-1)
    assert (sums < 0.99).all()  # softmax top-K of 16 experts without renormalisation


# ----------------------------------------------------------------------------- gradients


def _swiglu_backward(x, wg, wu, wd, dy):
    """Gradients of y = (silu(x wg) * (x wu)) wd given dy: (dx, dwg, dwu, dwd)."""
    a, u = x @ wg, x @ wu
    sig = 1.0 / (1.0 + np.exp(-a))
    silu = a * sig
    dh = dy @ wd.T
    da = dh * u * (sig * (1 + a * (1 - sig)))
    du = dh * silu
    return da @ wg.T + du @ wu.T, x.T @ da, x.T @ du, (silu * u).T @ dy


def np_moe_grads(x, w, chosen, cot, cfg):
    """Hand-derived gradients of Σ y·cot for the dense reference, expert choice held fixed."""
    logits = x @ w["gate"]
    if cfg.scoring_func == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    else:
        z = np.exp(logits - logits.max(-1, keepdims=True))
        s = z / z.sum(-1, keepdims=True)
    m = chosen.astype(np.float64)
    total = (m * s).sum(-1, keepdims=True) if cfg.norm_topk_prob else 1.0
    weights = m * s / total * cfg.routed_scaling_factor
    g = {"w_gate": np.zeros_like(w["w_gate"]), "w_up": np.zeros_like(w["w_up"]), "w_down": np.zeros_like(w["w_down"])}
    dx = np.zeros_like(x)
    dweights = np.zeros_like(weights)
    for e in range(cfg.n_routed_experts):
        wg, wu, wd = w["w_gate"][e], w["w_up"][e], w["w_down"][e]
        out = (_silu(x @ wg) * (x @ wu)) @ wd
        dweights[:, e] = (out * cot).sum(-1)
        dxe, g["w_gate"][e], g["w_up"][e], g["w_down"][e] = _swiglu_backward(x, wg, wu, wd, weights[:, e:e + 1] * cot)
        dx += dxe
    # weights = scale · m s / Σ m s  ->  ds = scale · m/Σ · (dw - Σ_j (m s/Σ)_j dw_j)
    dws = dweights * cfg.routed_scaling_factor
    if cfg.norm_topk_prob:
        ds = m / total * (dws - (m * s / total * dws).sum(-1, keepdims=True))
    else:
        ds = m * dws
    if cfg.scoring_func == "sigmoid":
        dlogits = ds * s * (1 - s)
    else:
        dlogits = s * (ds - (s * ds).sum(-1, keepdims=True))
    g["gate"] = x.T @ dlogits
    dx += dlogits @ w["gate"].T
    if cfg.n_shared_experts:
        dxs, *gs = _swiglu_backward(x, w["shared_gate_proj"], w["shared_up_proj"], w["shared_down_proj"], cot)
        dx += dxs
        g["shared"] = dict(zip(("gate_proj", "up_proj", "down_proj"), gs))
    return dx, g


@pytest.mark.parametrize("cfg", [V3_CFG, V2_CFG], ids=["v3", "v2"])
def test_gradients_match_dense_reference(cfg):
    moe, w = _build(cfg, seed=5)
    x = _input(6)
    cot = _input(7)
    _, chosen, _ = np_moe(x.reshape(-1, D).astype(np.float64), w, cfg)

    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss_under_test(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * cot)

    g_params, g_x = jax.jit(jax.grad(loss_under_test, argnums=(0, 1)))(params, jnp.asarray(x))
    g_params = nnx.to_pure_dict(g_params)

    x64, cot64 = (a.reshape(-1, D).astype(np.float64) for a in (x, cot))
    r_x, r_params = np_moe_grads(x64, w, chosen, cot64, cfg)
    r_x = r_x.reshape(B, T, D)
    r_params, r_x = jax.tree.map(lambda a: a.astype(np.float32), (r_params, r_x))
    assert set(g_params) == set(r_params)  # the bias is no Param: it gets no gradient
    chex.assert_trees_all_close(g_x, r_x, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(g_params, r_params, atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(g_params["gate"]).max()) > 1e-3  # the router does learn through w


# ----------------------------------------------------------------------------- balance loss


def test_sequence_balance_loss_on_given_routing():
    cfg = V3_CFG
    rng = np.random.default_rng(11)
    n = B * T
    scores = rng.uniform(0.05, 0.95, (n, E))
    experts = np.stack([rng.choice(E, cfg.num_experts_per_tok, replace=False) for _ in range(n)])
    chosen = np.zeros((n, E), bool)
    chosen[np.arange(n)[:, None], experts] = True
    routing = Routing(jnp.ones((n, 4), jnp.float32), jnp.asarray(experts, jnp.int32), jnp.asarray(scores, jnp.float32))
    got = sequence_balance_loss(routing, B, cfg)
    np.testing.assert_allclose(got, np_balance_loss(chosen, scores, B, cfg), rtol=1e-5)
    # alpha 0 switches the loss off.
    assert float(sequence_balance_loss(routing, B, _cfg(aux_loss_alpha=0.0))) == 0.0
    loads = expert_loads(jnp.asarray(experts, jnp.int32), E)
    chex.assert_trees_all_close(loads, np.bincount(experts.reshape(-1), minlength=E).astype(np.float32))


# ----------------------------------------------------------------------------- bias updates


def test_bias_update_balances_a_skewed_router():
    cfg = V3_CFG
    moe, _ = _build(cfg, seed=20)
    rng = np.random.default_rng(21)
    gate = rng.normal(0, 0.05, (D, E))
    gate[:, :3] += 0.15  # experts 0-2 favoured for inputs with a positive mean
    moe.gate.value = jnp.asarray(gate, jnp.float32)
    moe.bias.value = jnp.zeros((E,), jnp.float32)
    x = jnp.asarray(rng.normal(0.5, 1.0, (4, 32, D)), jnp.float32)
    before = nnx.to_pure_dict(nnx.state(moe, nnx.Param))

    gamma = 0.01
    ratios = []
    for _ in range(51):
        loads = _forward(moe, x)[1]["loads"]
        ratios.append(float(loads.max() / loads.mean()))
        moe.bias.value = routing_bias_update(moe.bias[...], loads, gamma)
    ratios = np.array(ratios)
    assert ratios[0] > 2.0, ratios[0]  # the router really is skewed
    assert ratios[-1] < 0.6 * ratios[0], ratios
    # Non-increasing trend: each block of 10 steps is no worse than the one before it.
    blocks = ratios[1:].reshape(5, 10).mean(1)
    assert (np.diff(blocks) <= 0.05).all(), blocks
    assert blocks[-1] < blocks[0]
    # Only the bias moved: every Param is bit-identical.
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(moe, nnx.Param)), before)
    assert float(jnp.abs(moe.bias[...]).max()) > 0


def test_routing_bias_update_formula():
    bias = jnp.asarray([0.0, 0.1, -0.2, 0.0], jnp.float32)
    loads = jnp.asarray([10.0, 2.0, 4.0, 4.0], jnp.float32)  # mean 5
    got = routing_bias_update(bias, loads, 0.001)
    chex.assert_trees_all_close(got, np.array([-0.001, 0.101, -0.199, 0.001], np.float32))


def test_routing_bias_is_not_a_param():
    moe = nnx.eval_shape(lambda: MoE(V3_CFG, rngs=nnx.Rngs(0)))
    assert isinstance(moe.bias, RoutingBias) and not isinstance(moe.bias, nnx.Param)
    params = nnx.to_pure_dict(nnx.state(moe, nnx.Param))
    assert "bias" not in params
    assert "bias" in nnx.to_pure_dict(nnx.state(moe, RoutingBias))

    model = nnx.eval_shape(lambda: Decoder(_cfg(num_nextn_predict_layers=1, kv_lora_rank=16, qk_nope_head_dim=8,
                                                   qk_rope_head_dim=4, v_head_dim=8), rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    assert leaves and not any("bias" == str(getattr(p[-1], "key", "")) for p, _ in leaves)
    biases = jax.tree_util.tree_leaves_with_path(nnx.state(model, RoutingBias))
    # One per MoE layer (stacked [L_moe, E]) and one in the MTP block.
    shapes = sorted(tuple(v.shape) for _, v in biases)
    assert shapes == sorted([(1, E), (E,)]), shapes


def _per_pair_experts(x, chosen, weights, wg, wu, wd):
    """Reference: every (token, expert) pair with that expert's own weights, gathered per pair."""
    gate = jnp.einsum("nd,nkdf->nkf", x, wg[chosen])
    h = jax.nn.silu(gate) * jnp.einsum("nd,nkdf->nkf", x, wu[chosen])
    return jnp.einsum("nk,nkd->nd", weights, jnp.einsum("nkf,nkfd->nkd", h, wd[chosen]))


@pytest.mark.parametrize("n,e,k", [(1, 16, 4), (25, 16, 4), (37, 4, 2), (3000, 4, 2)])
def test_blocked_cpu_experts_equal_per_token_numpy(n, e, k):
    """The CPU expert kernel (pairs scattered into per-expert blocks) against a per-token NumPy
    SwiGLU sum, from fewer pairs than experts (decode) to several 128-row blocks per expert;
    gradients (x, routing weights, all three expert weights) against the per-pair jnp formula."""
    from r1jax.model.cpu_experts import block_rows, blocked_experts  # noqa: PLC0415

    rng = np.random.default_rng(n)
    d, f = 8, 6
    x = rng.standard_normal((n, d)).astype(np.float32)
    chosen = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.random((n, k)).astype(np.float32)
    wg, wu = rng.standard_normal((2, e, d, f)).astype(np.float32)
    wd = rng.standard_normal((e, f, d)).astype(np.float32)

    def blocked(x, weights, wg, wu, wd):
        return blocked_experts(x, Routing(weights, jnp.asarray(chosen), None), wg, wu, wd)

    got = jax.jit(blocked)(x, weights, wg, wu, wd)
    gate = np.einsum("nd,nkdf->nkf", x, wg[chosen])
    h = gate / (1 + np.exp(-gate)) * np.einsum("nd,nkdf->nkf", x, wu[chosen])
    want = np.einsum("nk,nkd->nd", weights, np.einsum("nkf,nkfd->nkd", h, wd[chosen]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    if n == 3000:
        assert block_rows(n * k, e) * 4 <= n * k / e  # several full blocks per expert, not one
    ct = rng.standard_normal((n, d)).astype(np.float32)
    args = (x, weights, wg, wu, wd)
    grads = jax.grad(lambda *a: jnp.sum(blocked(*a) * ct), argnums=range(5))(*args)
    ref = jax.grad(lambda *a: jnp.sum(_per_pair_experts(a[0], chosen, *a[1:]) * ct), argnums=range(5))(*args)
    chex.assert_trees_all_close(grads, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, f, same", [(1, 6, False), (4, 6, False), (64, 6, False), (8, 160, False),
                                         (8, 160, True)])
def test_small_batch_experts_equal_per_token_numpy(n, f, same):
    """Decode's expert kernel against a per-token NumPy sum over the chosen experts: n 1 takes
    the gathered-pairs branch, 4 the every-expert one, 64 falls back to the blocked kernel;
    experts of 8 x 160 take the bucketed buffers, with every token on the same experts (same)
    filling the largest bucket."""
    from r1jax.model.cpu_experts import small_batch_experts  # noqa: PLC0415

    rng = np.random.default_rng(n)
    d, e, k = (8, 16, 4) if f == 6 else (128, 16, 4)
    x = rng.standard_normal((n, d)).astype(np.float32)
    chosen = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    if same:
        chosen[:] = chosen[0]
    weights = rng.random((n, k)).astype(np.float32)
    wg, wu = (rng.standard_normal((2, e, d, f)) * d**-0.5).astype(np.float32)
    wd = rng.standard_normal((e, f, d)).astype(np.float32)
    routing = Routing(jnp.asarray(weights), jnp.asarray(chosen), jnp.zeros((n, e)))
    got, _ = jax.jit(small_batch_experts)(x, routing, wg, wu, wd)
    want = np.zeros((n, d), np.float32)
    for t in range(n):
        for j, ex in enumerate(chosen[t]):
            gate = x[t] @ wg[ex]
            want[t] += weights[t, j] * ((gate / (1 + np.exp(-gate)) * (x[t] @ wu[ex])) @ wd[ex])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [V3_CFG, _cfg(n_shared_experts=0)], ids=["shared2", "noshared"])
@pytest.mark.parametrize("n", [4, 24])
def test_dense_moe_equals_numpy_moe(cfg, n):
    """The decode's fused MoE (routed and shared experts as two plain matmuls over
    `dense_moe_weights`) against the NumPy MoE of spec §3, two shared experts or none."""
    from r1jax.model.cpu_experts import dense_moe, dense_moe_weights  # noqa: PLC0415

    moe, w = _build(cfg, seed=11)
    shared = (moe.shared.gate_proj[...], moe.shared.up_proj[...], moe.shared.down_proj[...]) \
        if cfg.n_shared_experts else None
    dense = dense_moe_weights(moe.w_gate[...], moe.w_up[...], moe.w_down[...], shared)
    x = _input(12, (n, D))
    got = jax.jit(lambda x: dense_moe(x, moe.routing(x), dense["gate_up"], dense["down"], E, F))(jnp.asarray(x))
    want, _, _ = np_moe(x.astype(np.float64), w, cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_padding_never_counts_in_loads_or_balance_loss():
    """Rows padded with a mask: loads and balance loss equal the unpadded rows' (a NumPy count
    over the real tokens only), outputs on the real tokens unchanged. Unmasked, padding that
    all routes alike would skew the loads, and through them the routing-bias update."""
    moe, w = _build(V3_CFG, seed=5)
    x = _input(6)
    pad = np.repeat(_input(7, (B, 1, D)), 5, axis=1)  # identical padding tokens, as in a GRPO batch
    mask = np.concatenate([np.ones((B, T), bool), np.zeros((B, 5), bool)], axis=1)
    padded = np.concatenate([x, pad], axis=1)
    graphdef, state = nnx.split(moe)
    y, stats = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m))(state, jnp.asarray(padded), jnp.asarray(mask))
    y_ref, chosen, s = np_moe(x.reshape(-1, D).astype(np.float64), w, V3_CFG)
    chex.assert_trees_all_close(y[:, :T], y_ref.reshape(B, T, D).astype(np.float32), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(stats["loads"], chosen.sum(0).astype(np.float32))
    np.testing.assert_allclose(stats["balance_loss"], np_balance_loss(chosen, s, B, V3_CFG), rtol=1e-5)
    _, unmasked = _forward(moe, padded)
    assert not np.allclose(unmasked["loads"], stats["loads"])  # not vacuous
