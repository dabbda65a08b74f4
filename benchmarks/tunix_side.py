"""The Tunix half of `benchmarks/vs_tunix.py`: Tunix 0.1.7's Qwen2, sampler, GRPO learner and
SFT step on the weights of one HF Qwen2 directory (Tunix's own safetensors loader,
`tunix.models.qwen2.params`). Imported only by that benchmark; nothing of r1jax imports it.

Every function takes the shared `Workload` pieces as plain values, so both sides see the same
prompts, lengths and settings; timings exclude compilation (one warm-up call first).
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType

from tunix.generate import sampler as sampler_lib
from tunix.generate import utils as gen_utils
from tunix.models.qwen2 import model as qwen2_model
from tunix.models.qwen2 import params as qwen2_params
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import peft_trainer


def mesh():
    """One CPU device as Tunix's (fsdp, tp) mesh. Auto axes: with Explicit ones GRPO rollouts fail
    (`ShardingTypeError` in `dynamic_update_slice`)."""
    return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


def model_config(hf: dict) -> qwen2_model.ModelConfig:
    return qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf["hidden_size"] // hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf["rope_theta"]), norm_eps=hf["rms_norm_eps"], use_tied_embedding=False,
        dtype=jnp.float32, param_dtype=jnp.float32)


def load(hf_dir, hf: dict, m):
    """Tunix's Qwen2 with the directory's weights, through Tunix's own safetensors loader."""
    with jax.set_mesh(m):
        return qwen2_params.create_model_from_safe_tensors(str(hf_dir), model_config(hf), m, dtype=jnp.float32)


def logits(model, ids: np.ndarray, m) -> np.ndarray:
    """[B, T, V] float32 logits of a causal forward without cache."""
    b, t = ids.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    mask = gen_utils.make_causal_attn_mask(jnp.ones((b, t), bool), t)
    with jax.set_mesh(m):
        out, _ = model(jnp.asarray(ids), jnp.asarray(positions), None, mask)
    return np.asarray(out, np.float32)


class WordTokenizer:
    """The benchmark's tokenizer for Tunix (encode / decode / bos_id / eos_id / pad_id, which
    `TokenizerAdapter` accepts): the same tokenizer.json r1jax reads, through `tokenizers`."""

    def __init__(self, path, pad_id: int, eos_id: int):
        import tokenizers

        self.tok = tokenizers.Tokenizer.from_file(str(path))
        self._pad, self._eos = pad_id, eos_id

    def encode(self, text, **kw):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, **kw):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def bos_id(self):
        return None  # prompts are given without bos, as on the r1jax side

    def eos_id(self):
        return self._eos

    def pad_id(self):
        return self._pad


def _cache_config(model, size: int) -> sampler_lib.CacheConfig:
    c = model.config
    return sampler_lib.CacheConfig(cache_size=size, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
                                   head_dim=c.head_dim)


def make_sampler(model, tok: WordTokenizer, cache_size: int) -> sampler_lib.Sampler:
    return sampler_lib.Sampler(transformer=model, tokenizer=tok, cache_config=_cache_config(model, cache_size))


def greedy(s: sampler_lib.Sampler, texts: list[str], steps: int, prompt_len: int, eos: int, m) -> list[list[int]]:
    """Greedy completions through the public `Sampler.__call__` (strings in, tokens out)."""
    with jax.set_mesh(m):
        out = s(texts, max_generation_steps=steps, max_prompt_length=prompt_len, temperature=0.0,
                eos_tokens=[eos], seed=0)
    return [np.asarray(t).tolist() for t in out.tokens]


def sampler_rates(s: sampler_lib.Sampler, prompts: np.ndarray, new_tokens: int, eos: int, temperature: float,
                  top_p: float | None, repeats: int, m) -> dict:
    """(prefill tokens/s, decode tokens/s), each a list of `repeats` timings after a compiling run.
    Prefill: the compiled prefill call (the prompt's forward and the first token); decode: the
    compiled `while_loop` that runs the remaining steps (all on device, no host loop)."""
    b, p = prompts.shape
    s.eos_ids = jnp.array([eos])

    def state():
        return s.init_sample_state(
            jnp.asarray(prompts), total_sampling_steps=p + new_tokens, include_logits=False,
            forbidden_token_ids=None, temperature=temperature, top_p=top_p, top_k=None,
            seed=jax.random.PRNGKey(0), beam_size=None)

    def one():
        st = state()
        jax.block_until_ready(st)
        t0 = time.perf_counter()
        st = s._compiled_prefill_fn(s._flattened_transformer_state, st, None, echo=False)
        jax.block_until_ready(st.token_buffer)
        t1 = time.perf_counter()
        before = int(st.decoding_step)
        st = s._compiled_decode_fn(s._flattened_transformer_state, st)
        jax.block_until_ready(st.token_buffer)
        t2 = time.perf_counter()
        steps = int(st.decoding_step) - before
        return b * p / (t1 - t0), b * steps / (t2 - t1)

    with jax.set_mesh(m):
        one()  # compile
        runs = [one() for _ in range(repeats)]
    return {"prefill": [r[0] for r in runs], "decode": [r[1] for r in runs]}


# ----------------------------------------------------------------------------- GRPO


def grpo_iterations(hf_dir, hf: dict, tok: WordTokenizer, prompt_texts: list[str], *, generations: int,
                    prompt_len: int, new_tokens: int, temperature: float, top_p: float, beta: float,
                    epsilon: float, mu: int, optimizer: optax.GradientTransformation, reward_fn, eos: int,
                    warmup: int, repeats: int, m) -> dict:
    """warmup + repeats GRPO iterations of `GRPOLearner.train` (one batch of all prompts each, one
    mini-batch, vanilla rollout colocated with the actor). Per iteration: wall time of the
    global step, its rollout part (`_generate_and_compute_advantage`: sampling, reference
    log-probs, rewards, advantages) and its update part (`RLCluster.update_actor`)."""
    actor = load(hf_dir, hf, m)
    reference = load(hf_dir, hf, m)
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=new_tokens, max_prompt_length=prompt_len, kv_cache_size=prompt_len + new_tokens,
        temperature=temperature, top_p=top_p, top_k=None, eos_tokens=[eos])
    n = len(prompt_texts)
    training_config = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=10**9, mini_batch_size=n,
        train_micro_batch_size=n, metrics_logging_options=None, checkpoint_root_directory=None,
        pbar_description=None)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: m, rl_cluster_lib.Role.REFERENCE: m,
                      rl_cluster_lib.Role.ROLLOUT: m},
        rollout_engine="vanilla", offload_to_cpu=False, training_config=training_config,
        rollout_config=rollout_config)
    times: dict[str, list[float]] = {"iteration": [], "rollout": [], "update": []}
    lengths: list[float] = []
    with jax.set_mesh(m):
        cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tok,
                                           cluster_config=cluster_config)
        learner = grpo_learner.GRPOLearner(
            rl_cluster=cluster, reward_fns=[reward_fn],
            algo_config=grpo_learner.GRPOConfig(num_generations=generations, num_iterations=mu, beta=beta,
                                                epsilon=epsilon))

        def timed(obj, name, key, block=None):
            fn = getattr(obj, name)

            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                out = fn(*a, **kw)
                if block is not None:
                    block(out)
                times[key].append(time.perf_counter() - t0)
                return out

            setattr(obj, name, wrapper)

        def block_example(ex):
            jax.block_until_ready((ex.completion_ids, ex.advantages, ex.ref_per_token_logps))
            lengths.append(float(np.asarray(ex.completion_mask).sum(-1).mean()))

        def block_actor(_):
            jax.block_until_ready(nnx.state(cluster.actor_trainer.model))

        timed(learner, "_generate_and_compute_advantage", "rollout", block_example)
        timed(cluster, "update_actor", "update", block_actor)
        timed(learner, "_run_global_step", "iteration", lambda _: block_actor(None))
        batch = {"prompts": np.asarray(prompt_texts)}
        learner.train([dict(batch) for _ in range(warmup + repeats)])
    return {k: v[warmup:] for k, v in times.items()} | {"completion_length": lengths[warmup:]}


# ----------------------------------------------------------------------------- SFT


def sft_step(hf_dir, hf: dict, tokens: np.ndarray, optimizer: optax.GradientTransformation, repeats: int,
             m) -> dict:
    """`PeftTrainer`'s own jitted train step (its default next-token loss, nnx.jit, donated
    optimizer) on [B, T] tokens, best of `repeats` after a compiling call; then the forward and
    forward + backward of the same loss as pure jitted functions, for the split."""
    model = load(hf_dir, hf, m)
    b, t = tokens.shape
    config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=10**9, metrics_logging_options=None,
                                         checkpoint_root_directory=None, pbar_description=None)
    with jax.set_mesh(m):
        trainer = peft_trainer.PeftTrainer(model, optimizer, config)
        trainer = trainer.with_gen_model_input_fn(lambda x: x)
        train_step, _ = trainer.jit_train_and_eval_step()
        mask = jnp.ones((b, t), bool)
        inputs = {"input_tokens": jnp.asarray(tokens), "input_mask": mask,
                  "positions": jnp.asarray(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))),
                  "attention_mask": gen_utils.make_causal_attn_mask(mask, t)}

        def step():
            loss, _, grad_norm = train_step(inputs)
            jax.block_until_ready((loss, nnx.state(trainer.model)))
            return float(loss)

        loss0 = step()  # compile
        step_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            step_s.append(time.perf_counter() - t0)

        graphdef, state = nnx.split(trainer.model)
        loss_fn = peft_trainer._default_loss_fn

        def pure_loss(state, inputs):
            return loss_fn(nnx.merge(graphdef, state), **inputs)

        fwd = jax.jit(pure_loss)
        grads = jax.jit(jax.grad(pure_loss))
        split = {"forward": [], "forward_backward": []}
        for key, fn in (("forward", fwd), ("forward_backward", grads)):
            jax.block_until_ready(fn(state, inputs))
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(state, inputs))
                split[key].append(time.perf_counter() - t0)
    return {"step": step_s, "loss0": loss0, **split}


@contextlib.contextmanager
def quiet():
    """Tunix logs through absl at INFO; keep the benchmark's output to its own lines."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)
