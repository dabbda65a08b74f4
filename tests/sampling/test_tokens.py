"""The sampler's token programs against NumPy references: the sort-free top-k / top-p mask
(ties, -inf, a tie at the k-th place) and the greedy program's log-prob."""

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.sampling import tokens


def _ranking_mask(x, top_k, top_p):
    """NumPy: rank the row (stable), softmax over its first top_k, keep the shortest prefix whose
    mass before each token is < top_p, then every token >= the last kept value."""
    out = np.zeros(x.shape, bool)
    for r, row in enumerate(x.astype(np.float64)):
        order = np.argsort(-row, kind="stable")
        k = top_k[r] if top_k[r] > 0 else len(row)
        ranked = row[order][:k]
        p = np.exp(ranked - ranked.max())
        p /= p.sum()
        last = max(int(((np.cumsum(p) - p) < top_p[r]).sum()), 1) - 1
        out[r] = row >= ranked[last]
    return out


def test_truncation_mask_equals_ranking_with_ties():
    rng = np.random.default_rng(0)
    mask = jax.jit(tokens._truncation_mask)
    for trial in range(6):
        x = (rng.standard_normal((16, 256)) * 3).astype(np.float32)
        if trial % 2 == 0:
            x = np.round(x)  # many ties, at the k-th place too; -0.0 beside +0.0
        if trial % 3 == 0:
            x[:, ::5] = -np.inf
        top_k = rng.integers(1, 40, 16).astype(np.int32)
        top_k[::3] = 0
        top_p = rng.uniform(0.05, 0.99, 16).astype(np.float32)
        top_p[1::4] = 1.0
        got = np.asarray(mask(x, top_k, top_p))
        np.testing.assert_array_equal(got, _ranking_mask(x, top_k, np.where(top_p < 1, top_p, 2.0)),
                                      err_msg=f"trial {trial}")


def test_greedy_program_is_argmax_and_its_log_softmax():
    x = np.random.default_rng(1).integers(-3, 4, (8, 64)).astype(np.float32)  # ties: the first max
    toks, lps = jax.jit(tokens.greedy_tokens)(x)
    np.testing.assert_array_equal(np.asarray(toks), np.argmax(x, -1))
    ref = jax.nn.log_softmax(jnp.asarray(x), -1)[jnp.arange(8), np.argmax(x, -1)]
    np.testing.assert_array_equal(np.asarray(lps), np.asarray(ref))
    assert tokens.sampling_mode([0.0, 0.0], [5, 0], [0.5, 1.0]) == tokens.GREEDY
    assert tokens.sampling_mode([0.0, 0.7], [0, 0], [0.5, 1.0]) == tokens.SAMPLED  # the greedy row's top_p is moot
    assert tokens.sampling_mode([0.0, 0.7], [0, 3], [1.0, 1.0]) == tokens.TRUNCATED
