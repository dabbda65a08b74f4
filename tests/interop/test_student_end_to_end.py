"""A downloaded R1-Distill-style student, end to end: a tiny random Qwen2 saved by transformers with
a BPE `tokenizer.json` and R1's chat template, converted, served through `serve.py` to the
`openai` client (streaming, reasoning_content), and trained from by `train.py` (SFT and GRPO)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import torch
import transformers as tf
from flax import nnx

from r1jax.data.tokenizer import load_tokenizer
from r1jax.interop import hf
from r1jax.interop.convert import convert
from tests.data.test_hf_tokenizer import _build as build_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    directory = build_tokenizer(tmp_path_factory.mktemp("student") / "R1-Distill-Qwen-tiny")
    vocab = load_tokenizer(directory).vocab_size
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=512, tie_word_embeddings=False))
    model.save_pretrained(directory, max_shard_size="60KB")
    return directory


def test_python_api_and_convert(student, tmp_path):
    model, tokenizer = hf.load(student)
    ids = np.asarray([tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "1+1?"}],
                                                             add_generation_prompt=True))])
    ref = tf.AutoModelForCausalLM.from_pretrained(student).eval()
    with torch.no_grad():
        want = ref(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids).logits), want, atol=1e-4, rtol=0)
    out = tmp_path / "export"
    summary = convert(student, out, dtype="float32", progress=False)
    assert summary["tensors"] == len(ref.state_dict()) and (out / "tokenizer.json").is_file()
    again, _ = hf.load(out)
    np.testing.assert_array_equal(np.asarray(again(ids).logits), np.asarray(model(ids).logits))


def test_load_with_a_dtype(student):
    """hf.load(HF dir, dtype=...) once passed the dtype fields twice (TypeError)."""
    model, _ = hf.load(student, dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    ids = np.asarray([[1, 2, 3, 4]])
    want = tf.AutoModelForCausalLM.from_pretrained(student).eval()
    with torch.no_grad():
        ref = want(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids).logits, np.float32), ref, atol=0.1, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_to_the_openai_client(student):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", f"checkpoint={student}", f"port={port}", "slots=2",
                             "max_len=128"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 240
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.5)
        stream = client.chat.completions.create(model="R1-Distill-Qwen-tiny", messages=[{"role": "user", "content": "2+2?"}],
                                                max_tokens=6, temperature=0.0, stream=True)
        reasoning = content = ""
        for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += (delta.content or "") if delta else ""
        # R1's template ends the prompt in `<think>\n`: random weights never close it, so all is reasoning.
        assert reasoning and not content
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _train(*args):
    """train.py on one CPU device (as a user's laptop run would be; the sharded paths have their own tests)."""
    flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=1")
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, XLA_FLAGS=flags))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sft_and_grpo_start_from_it(student, tmp_path):
    common = [f"init_from={student}", "mesh.data=1", "checkpoint.every=0", "data.tasks=[arithmetic]",
              "data.max_difficulty=1", "eval_every=0"]
    _train("configs/tiny-sft.yaml", *common, f"model={student}", f"run_dir={tmp_path / 'sft'}", "steps=2",
           "batch_size=4", "seq_len=128", "data.builtin_docs=64", "eval_batches=1")
    assert (tmp_path / "sft" / "tokenizer.json").is_file()  # the run keeps the tokenizer it trained with
    common[0] = f"init_from={tmp_path / 'sft'}"
    r = _train("configs/tiny-grpo.yaml", *common, f"model={student}", f"run_dir={tmp_path / 'grpo'}", "steps=2",
               "seq_len=96", "grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.max_completion_length=16",
               "grpo.num_minibatches=1", "grpo.dynamic_sampling=false", "grpo.eval_prompts=0")
    assert "grpo finished" in r.stdout
