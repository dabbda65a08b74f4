"""MTP speculative decoding: greedy output identical to plain greedy decoding, whether drafts
are the MTP's own, always right, always wrong, or right for one row only."""

import jax.numpy as jnp
import numpy as np

from r1jax.sampling.engine import SamplingParams, generate
from r1jax.sampling.speculative import speculative_generate
from tests.sampling import prompts, tiny_moe

TOKENS = 100


def test_speculative_greedy_equals_plain_greedy():
    model = tiny_moe()
    ps = prompts(model.cfg, (7, 19), seed=11)
    plain = [c[0].token_ids for c in generate(model, ps, SamplingParams(temperature=0.0, max_tokens=TOKENS),
                                             cache_dtype=jnp.float32, slots=2, max_len=256)]
    mtp = speculative_generate(model, ps, TOKENS, max_len=256)
    print(f"MTP drafts (random weights): acceptance {mtp.acceptance_rate:.2f}, {mtp.steps} steps for "
          f"{TOKENS} tokens, {mtp.tokens_per_second:.0f} tokens/s")
    assert mtp.tokens == plain
    assert mtp.steps < TOKENS or mtp.acceptance_rate == 0
    # Drafts forced right: every draft accepted, two tokens a step, same output.
    # Forced drafts change on device within each compiled call of `chunk` steps.
    table = np.asarray(plain, np.int32)
    right = speculative_generate(model, ps, TOKENS, max_len=256, forced_drafts=table)
    assert right.tokens == plain and right.acceptance_rate == 1.0 and right.steps == TOKENS // 2
    # Forced wrong: nothing accepted, one token a step, same output.
    wrong = speculative_generate(model, ps, TOKENS, max_len=256, forced_drafts=(table + 1) % model.cfg.vocab_size)
    assert wrong.tokens == plain and wrong.accepted == 0 and wrong.steps == TOKENS - 1
    # Right for one row, wrong for the other: rows advance at their own pace, in a call of one
    # step or of eight.
    mixed = np.stack([table[0], (table[1] + 1) % model.cfg.vocab_size])
    for chunk in (1, 8):
        both = speculative_generate(model, ps, TOKENS, max_len=256, forced_drafts=mixed, chunk=chunk)
        assert both.tokens == plain and both.accepted == TOKENS // 2 and both.steps == TOKENS - 1, chunk
