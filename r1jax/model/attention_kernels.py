"""The training attention kernel, picked by backend: `model.attention_impl`.

    xla     `layers.causal_attend`: block-causal softmax attention. Each query block's logits
            [B,H,T/n,S] are materialised (and kept for the backward pass): the CPU path and the
            reference the others are tested against.
    splash  Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), the
            TPU kernel: flash-style blocks with an online softmax, causal and packed-segment
            masks, only the output and the log-sum-exp kept for the backward pass, so nothing
            of size T x T exists. It takes q/k (N+R = 192) and v (V = 128) of different widths
            as they are. Off TPU it runs in Pallas interpret mode: the tests, and the dry run's
            memory estimate of the TPU program, use that.
    cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash attention on
            GPU. It wants v as wide as k, so MLA's v is zero-padded to 192 and the output sliced
            back; packed segments go in as a boolean mask [B,1,T,T] (cuDNN turns it into a bias).

"auto" is splash on TPU, cudnn on GPU, xla elsewhere. All three are
`fn(q [B,T,H,K], k [B,T,H,K], v [B,T,H,V], segment_ids [B,T], scale) -> [B,T,H,V]`, causal
within segments. The sampler's prefill and decode attend over a cache (`layers.attend` and
MLA's absorbed form) and do not go through here.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax.model.layers import causal_attend
from r1jax.parallel import rules as rules_lib
from r1jax.parallel.backend import backend

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, float], jax.Array]

_AUTO = {"tpu": "splash", "gpu": "cudnn"}
SPLASH_BLOCK = 512  # query and key block of the splash kernel (MaxText's default for v5p)
SPLASH_TILE = 128  # lengths are padded to a multiple of this (the TPU lane width)


def resolve_attention_impl(name: str) -> str:
    """"auto" -> the backend's kernel; an explicit name is kept (so tests run splash on CPU)."""
    return _AUTO.get(backend(), "xla") if name == "auto" else name


def attention_fn(name: str) -> AttentionFn:
    impl = resolve_attention_impl(name)
    if name == "auto" and impl == "cudnn":
        return _cudnn_or_xla
    return {"xla": causal_attend, "splash": splash_attend, "cudnn": cudnn_attend}[impl]


def _cudnn_or_xla(q, k, v, segment_ids, scale):
    """`auto` on GPU: cuDNN where it takes the shapes (head dim <= 128 before Hopper, <= 256
    from it) and is installed, else the XLA path, said once. An explicit "cudnn" raises instead."""
    try:
        return cudnn_attend(q, k, v, segment_ids, scale)
    except (NotImplementedError, RuntimeError) as e:  # shapes refused; no cuDNN (RuntimeError)
        if not _warned:
            logging.getLogger(__name__).warning("cuDNN attention unavailable (%s); using the XLA path", e)
            _warned.append(True)
        return causal_attend(q, k, v, segment_ids, scale)


_warned: list[bool] = []


# ----------------------------------------------------------------------------- splash


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    with jax.ensure_compile_time_eval():  # its mask tables are concrete constants, safe to cache across traces
        return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _splash_local(q, k, v, segment_ids):
    """Per-device splash over q/k [B,H,T,K], v [B,H,T,V] (already scaled) -> [B,H,T,V]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    _, h, t, _ = q.shape
    kernel = _splash_kernel(h, t, min(SPLASH_BLOCK, t), backend() != "tpu")
    return jax.vmap(kernel)(q, k, v, SegmentIds(q=segment_ids, kv=segment_ids))


def splash_attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float) -> jax.Array:
    """Splash attention, causal within segments; shapes as `layers.causal_attend`.

    The kernel has no softmax scale: q is scaled first. The length is padded to whole blocks
    with segment id -1, which no real token shares. Under `use_rules` the kernel runs per
    device in a `shard_map` with the activations' own specs (a Pallas call cannot be split by
    the SPMD partitioner): batch over the batch axes, heads over `model`.
    """
    t = q.shape[1]
    block = min(SPLASH_BLOCK, -(-t // SPLASH_TILE) * SPLASH_TILE)
    padded = -(-t // block) * block
    to_heads_first = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, padded - t), (0, 0)))
    qh = to_heads_first(q * jnp.asarray(scale, q.dtype))
    kh, vh = to_heads_first(k), to_heads_first(v)
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - t)), constant_values=-1)
    active = rules_lib.active()
    if active is None:
        out = _splash_local(qh, kh, vh, seg)
    else:
        mesh, rules = active
        spec = rules_lib.to_pspec(("batch", "heads", "length", "head_dim"), rules, mesh.axis_names)
        seg_spec = P(spec[0], spec[2])
        out = jax.shard_map(_splash_local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec,
                            check_vma=False)(qh, kh, vh, seg)
    return jnp.swapaxes(out[:, :, :t], 1, 2)


# ----------------------------------------------------------------------------- cuDNN


def cudnn_attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                 *, implementation: str | None = "cudnn") -> jax.Array:
    """cuDNN flash attention, causal within segments; shapes as `layers.causal_attend`.
    implementation: "cudnn", or None/"xla" (the same call on any backend: what CPU tests run)."""
    width_v = v.shape[-1]
    if width_v < k.shape[-1]:
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, k.shape[-1] - width_v)))
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=same_segment, scale=scale, is_causal=True,
                                       implementation=implementation)
    return out[..., :width_v]


def kernel_table(attention_impl: str, expert_kernel: str | None = None) -> dict[str, str]:
    """What a run with these settings uses on this backend, for logs and the dry run."""
    out = {"attention": resolve_attention_impl(attention_impl)}
    if expert_kernel is not None:
        from r1jax.model import grouped_matmul

        out["experts"] = grouped_matmul.resolve_expert_kernel(expert_kernel)
    return out

