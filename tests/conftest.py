"""Test session set-up: 8 emulated CPU devices, before JAX is imported anywhere."""
import os
from pathlib import Path

import pytest

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# Tests run tiny programs many times over: compile time dominates, so skip LLVM's costly passes.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Workers and the train.py subprocesses of the tests compile many identical programs: share them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))
# 0: also the hundreds of tiny programs Orbax's first save compiles in every train.py process.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# MFU is not under test: skip the GEMM peak measurement of every training run.
os.environ.setdefault("R1JAX_PEAK_FLOPS", "1e11")


TINY_CORPUS = ("<think>\nFirst add the ones, then carry the tens.\n</think>\n\n<answer>{n}</answer>\n"
               "Question: what is {a} plus {b}? Janet has {a} ducks and buys {b} more.\n")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny exported checkpoint (random tiny MoE, 2 layers, a small SentencePiece tokenizer, a
    saved run config): {"dir": the export, "tok", "cfg"}. Used by the evaluation and server tests."""
    from flax import nnx

    from r1jax import checkpoint as ckpt_lib
    from r1jax import config as config_lib
    from r1jax.data.tokenizer import train_sentencepiece
    from tests.sampling import materialise

    tmp = tmp_path_factory.mktemp("eval_run")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(TINY_CORPUS.format(a=a, b=b, n=a + b) for a in range(12) for b in range(7)))
    tok = train_sentencepiece([corpus], 320, tmp / "tok")
    cfg = config_lib.load("configs/tiny-grpo.yaml", f"model.vocab_size={tok.vocab_size}", "model.num_hidden_layers=2",
                          "grpo.max_completion_length=16", "data.max_difficulty=1", "init_from=null")
    model = materialise(cfg.model)
    _, params, extra = nnx.split(model, nnx.Param, ...)
    export = ckpt_lib.export_params(tmp / "params", (params, extra),
                                    meta={"config": config_lib.to_dict(cfg), "tokenizer": tok.model_file})
    return {"dir": export, "tok": tok, "cfg": cfg}
