import jax
import jax.numpy as jnp
import numpy as np

from r1jax.sampling.rng import slot_uniforms


def test_slot_uniforms_are_jax_random_bit_for_bit():
    """The unrolled hash against `jax.random` itself (threefry, partitionable bits) on 4,096
    random (seed, sample, token) triples, seeds across the whole non-negative int32 range."""
    rng = np.random.default_rng(0)
    n = 4096
    seeds = rng.integers(0, 2**31, n).astype(np.int32)
    samples = rng.integers(0, 64, n).astype(np.int32)
    tokens = rng.integers(0, 1 << 16, n).astype(np.int32)

    def ref(s, j, t):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(s), j), t)
        return jax.random.uniform(key, (), jnp.float32)

    want = jax.vmap(ref)(seeds.astype(np.uint32), samples, tokens)
    got = jax.jit(slot_uniforms)(seeds, samples, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert 0.0 <= float(got.min()) and float(got.max()) < 1.0
