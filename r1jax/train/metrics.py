"""Where training metrics go: a progress bar, JSONL (one object per step), TensorBoard, and a
PNG of the curves at the end. Also the measured matmul peak that MFU is divided by."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def measure_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Best FLOP/s of a jitted n x n GEMM on the default device: the MFU denominator, measured
    on the machine at start-up rather than taken from a spec sheet. R1JAX_PEAK_FLOPS=X skips the
    measurement (the tests, where MFU is not under test; or a known accelerator peak)."""
    if os.environ.get("R1JAX_PEAK_FLOPS"):
        return float(os.environ["R1JAX_PEAK_FLOPS"])
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def to_python(metrics: dict[str, Any]) -> dict[str, Any]:
    """Device scalars/arrays -> floats/lists (one host transfer for the dict)."""
    host = jax.device_get(metrics)
    out = {}
    for k, v in host.items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else v.tolist()
    return out


def _summary_writer():
    """tensorboardX's SummaryWriter class, imported without torch: tensorboardX imports torch
    when it is installed, only to accept torch tensors (we log floats), and that import is most of
    a training process's start-up (2-6 s on 2 CPU cores)."""
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLogger:
    """One call per step; only process 0 writes."""

    def __init__(self, run_dir: str | Path, *, jsonl: str | Path | None, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = jax.process_index() == 0
        self.history: list[dict] = []
        self._jsonl = self._tb = self._bar = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = Path(jsonl) if jsonl else self.run_dir / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and path.exists():
            path.unlink()
        self._jsonl = open(path, "a")
        self.jsonl_path = path
        if tensorboard:
            self._tb = _summary_writer()(str(self.run_dir / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}{k}": v for k, v in metrics.items()}}
        self.history.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None and not prefix:
            self._bar.update(step - self._bar.n)
            shown = {k: record[k] for k in ("loss", "mtp_ce", "grad_norm", "tokens_per_s", "mfu") if k in record}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], path: str | Path, keys: tuple[str, ...], title: str = "") -> Path:
    """PNG of each key against step, one panel per key (keys missing from the records are skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = tuple(k for k in keys if any(k in r for r in records))
    cols = min(4, max(len(keys), 1))
    rows = -(-max(len(keys), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
