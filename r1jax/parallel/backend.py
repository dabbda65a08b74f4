"""The one place r1jax asks which backend it runs on.

`on_cpu()` reads `jax.default_backend()` when called, never at import: importing a module of
r1jax must not initialise a backend (a process picks its platform, device count or distributed
setup after importing, e.g. `--xla_force_host_platform_device_count` or
`jax.distributed.initialize`). Callers ask while building or tracing a compiled function, so the
answer is fixed per compiled function.

What it decides: the CPU-only speed paths (`r1jax.model.cpu_experts`, the sampling engine's
per-layer weights and XLA flags), the CPU fallback of expert dispatch (no ragged all-to-all on
XLA:CPU), and how peak FLOP/s are counted for MFU.
"""

from __future__ import annotations

import jax


def backend() -> str:
    """`jax.default_backend()`: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def on_cpu() -> bool:
    return backend() == "cpu"
