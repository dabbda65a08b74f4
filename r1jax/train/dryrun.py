"""Dry run: lower and compile the sharded train step for abstract inputs on N emulated CPU devices
and report per-device memory. Nothing is allocated; this checks a pod-scale layout on one machine.

    python -m r1jax.parallel.dryrun configs/model/deepseek-v3-671b.yaml devices=256 \
        mesh.data=8 mesh.expert=32 mesh.model=1 mesh.fsdp=true batch_size=256 seq_len=4096

`devices=N` (default: the mesh product, else 8) must come before JAX starts, so this module reads
it from argv and sets XLA_FLAGS before importing JAX. The XLA partitioner's warnings are captured
from the compile log: "Involuntary full rematerialization" means a tensor was replicated and
re-split, a sharding-rule bug.

The code lives here, above `train` (it compiles `TrainStep`); `r1jax.parallel.dryrun`, the
documented command, is an entry point that re-exports it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass

GiB = 1024**3
REMAT_WARNING = "Involuntary full rematerialization"


@dataclass
class DryRunReport:
    mesh: dict
    batch_size: int
    seq_len: int
    param_bytes: int  # per device
    optimizer_bytes: int  # per device
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int  # arguments + temporaries + outputs not aliased to arguments
    lower_s: float
    compile_s: float
    warnings: list[str]

    def table(self) -> str:
        rows = [
            ("mesh (data, expert, model)", f"{self.mesh}"),
            ("global batch x seq", f"{self.batch_size} x {self.seq_len}"),
            ("params / device", f"{self.param_bytes / GiB:.2f} GiB"),
            ("optimizer state / device", f"{self.optimizer_bytes / GiB:.2f} GiB"),
            ("compiled arguments", f"{self.argument_bytes / GiB:.2f} GiB"),
            ("compiled temporaries", f"{self.temp_bytes / GiB:.2f} GiB"),
            ("compiled outputs (aliased)", f"{self.output_bytes / GiB:.2f} GiB ({self.alias_bytes / GiB:.2f})"),
            ("peak / device", f"{self.peak_bytes / GiB:.2f} GiB"),
            ("lower + compile", f"{self.lower_s:.1f} s + {self.compile_s:.1f} s"),
            ("partitioner warnings", f"{len(self.warnings)}"),
        ]
        return "\n".join(f"  {k:<28}{v}" for k, v in rows)


class CaptureStderr:
    """Captures what C++ (XLA) writes to file descriptor 2 while compiling. The persistent
    compilation cache is off inside: a program found on disk is not compiled again, so its
    partitioner warnings would never be printed (and the checks for them would see nothing)."""

    def __enter__(self):
        import jax

        self._cache = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        self._file = tempfile.TemporaryFile(mode="w+b")
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()
        import jax

        jax.config.update("jax_enable_compilation_cache", self._cache)
        return False


def _shard_bytes(tree) -> int:
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "shape"):
            continue
        shard_shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += int(np.prod(shard_shape, dtype=np.int64)) * leaf.dtype.itemsize
    return total


def dry_run(cfg, mesh) -> DryRunReport:
    """Compiles `TrainStep(cfg, mesh)` for abstract inputs and reads its memory analysis."""

    from r1jax.train.step import TrainStep

    step = TrainStep(cfg, mesh)
    t0 = time.perf_counter()
    with CaptureStderr() as log:
        lowered = step.lower((cfg.batch_size, cfg.seq_len))
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    sys.stderr.write("".join(line + "\n" for line in log.text.splitlines() if REMAT_WARNING not in line)[-4000:])
    abstract = step.sharded_abstract()
    mem = compiled.memory_analysis()
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    return DryRunReport(
        mesh=dict(mesh.shape),
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        param_bytes=_shard_bytes(abstract.params),
        optimizer_bytes=_shard_bytes(abstract.opt_state),
        argument_bytes=arg,
        output_bytes=out,
        alias_bytes=alias,
        temp_bytes=temp,
        peak_bytes=arg + temp + out - alias,
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        warnings=[line for line in log.text.splitlines() if REMAT_WARNING in line],
    )


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    from r1jax.config import load, parse_options

    (path,), options, rest = parse_options(argv, {"devices": int}, positional=("CONFIG",))
    devices = options.get("devices")
    cfg = load(path, *rest)
    if devices is None:
        sizes = (cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model)
        devices = abs(sizes[0] * sizes[1] * sizes[2]) if -1 not in sizes else 8
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from r1jax.parallel.mesh import make_mesh

    mesh = make_mesh(cfg.mesh)
    print(f"dry run: {path} on {devices} emulated devices, mesh {dict(mesh.shape)}, fsdp={cfg.mesh.fsdp}")
    report = dry_run(cfg, mesh)
    print(report.table())
    for w in report.warnings[:5]:
        print("  WARNING:", w[:300])
    return 1 if report.warnings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
