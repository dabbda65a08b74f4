"""Test session set-up: 8 emulated CPU devices, before JAX is imported anywhere."""
import os
from pathlib import Path

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
