"""Dry run: lower and compile the sharded train step for abstract inputs on N emulated CPU devices
and report per-device memory and a step-time model. Nothing is allocated; this checks a
pod-scale layout on one machine.

    python -m r1jax.parallel.dryrun configs/model/deepseek-v3-671b.yaml devices=256 \
        mesh.data=8 mesh.expert=32 mesh.model=1 mesh.fsdp=true batch_size=256 seq_len=4096
    python -m r1jax.parallel.dryrun configs/deepseek-v3-671b-pod.yaml devices=256 chip=v5p search=true

Options: `chip=NAME|all` (default all: the step-time model on every chip of
`r1jax.parallel.chips`), `search=true` (compile the meshes `candidate_meshes` keeps, at most
`max_candidates=N`, default 12, and rank those whose peak memory fits the chip by predicted step
time; `chip=all` ranks for v5p). The step-time model (`r1jax.train.step_time`) reads matmul
FLOPs, HBM bytes and collective bytes per device from the compiled HLO. `dropless` expert
dispatch has no XLA:CPU lowering, so the dry run compiles its stand-in, `capacity` at the
config's capacity factor: expert FLOPs and buffers then carry that padding.

Kernels: a dry run models a pod, so `model.attention_impl: auto` compiles the flash-style
kernel, not the CPU's block-causal path: Pallas splash attention, lowered by XLA:CPU in
interpret mode (the TPU kernel's own program: blocks, online softmax, only the output and
log-sum-exp kept for the backward pass). It stands in for cuDNN's flash attention on GPU chips
too (the same memory profile; cuDNN has no CPU lowering). `model.attention_impl=xla` compiles
the block-causal path, which materialises the logits. The first lines printed name the kernels.

`devices=N` (default: the mesh product, else 8) must come before JAX starts, so this module reads
it from argv and sets XLA_FLAGS before importing JAX. The XLA partitioner's warnings are captured
from the compile log: "Involuntary full rematerialization" means a tensor was replicated and
re-split, a sharding-rule bug.

The code lives here, above `train` (it compiles `TrainStep`); `r1jax.parallel.dryrun`, the
documented command, is an entry point that re-exports it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from r1jax.train.step_time import HloCosts

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
    costs: HloCosts | None = None  # per device, from the optimized HLO
    model_flops: float = 0.0  # per device per step: 6·N·tokens + attention (step_time.train_flops)
    tokens: float = 0.0  # per device per step
    parse_s: float = 0.0
    fsdp: bool = field(default=False)

    def step_times(self, chips) -> list:
        """The step-time model of this step on each of `chips` (`r1jax.parallel.chips.Chip`)."""
        from r1jax.train.step_time import predict

        return [predict(self.costs, c, model_flops=self.model_flops, tokens=self.tokens, peak_bytes=self.peak_bytes)
                for c in chips]

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
            ("lower, compile, HLO walk", f"{self.lower_s:.1f} s, {self.compile_s:.1f} s, {self.parse_s:.1f} s"),
            ("partitioner warnings", f"{len(self.warnings)}"),
        ]
        return "\n".join(f"  {k:<28}{v}" for k, v in rows)


class CaptureStderr:
    """Captures what C++ (XLA) writes to file descriptor 2 while compiling. The persistent
    compilation cache is off inside: a program found on disk is not compiled again, so its
    partitioner warnings would never be printed (and the checks for them would see nothing).
    JAX decides once per process whether the cache is used, so turning the flag off is not
    enough after a first compile: the decision is reset on the way in and out."""

    def __enter__(self):
        import jax

        from jax.experimental.compilation_cache import compilation_cache

        self._cache = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
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
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_enable_compilation_cache", self._cache)
        compilation_cache.reset_cache()
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
    """Compiles `TrainStep(cfg, mesh)` for abstract inputs and reads its memory analysis and, from
    the optimized HLO, its per-device costs (`step_time.hlo_costs`)."""

    from r1jax.train.step import TrainStep
    from r1jax.train.step_time import hlo_costs, train_flops

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
    t3 = time.perf_counter()
    costs = hlo_costs(compiled.as_text())
    devices = mesh.devices.size
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
        costs=costs,
        model_flops=train_flops(cfg.model, cfg.batch_size, cfg.seq_len) / devices,
        tokens=cfg.batch_size * cfg.seq_len / devices,
        parse_s=time.perf_counter() - t3,
        fsdp=cfg.mesh.fsdp,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def state_bytes_estimate(cfg, data: int, expert: int, model: int, fsdp: bool) -> float:
    """Parameters + Adam moments per device, from the rules' shape (no compile): routed experts
    split over expert x model (x data under fsdp), the rest over model (x data x expert under
    fsdp). For pruning the search only; the compiled memory analysis decides."""
    from r1jax.model.summary import count_params

    m = cfg.model
    count = count_params(m)
    size = {"float32": 4, "bfloat16": 2}
    per_param = size[m.param_dtype] + 2 * size[cfg.optim.moment_dtype]  # weights + two moments
    routed = (m.num_moe_layers + (m.num_nextn_predict_layers if m.is_moe else 0)) * m.n_routed_experts * 3 * \
        m.hidden_size * m.moe_intermediate_size
    rest = count.total + count.mtp - routed
    return per_param * (routed / (expert * model * (data if fsdp else 1)) + rest / (model * (data * expert if fsdp else 1)))


def candidate_meshes(cfg, devices: int, hbm_bytes: float) -> tuple[list[tuple[int, int, int, bool]], list[str]]:
    """(data, expert, model, fsdp) meshes of `devices` worth compiling, and why the others were
    dropped. Kept: the config allows it (`check_fits`: heads over model, experts over expert,
    batch over data x expert); model <= 8 (tensor parallelism past one 8-chip host/ring buys
    little at 128 heads); at most 32 routed experts a device (fewer all-gathered expert
    weights); the state estimate within 75% of HBM (room for activations). The config's own
    mesh first, then by that estimate, smallest first."""
    from r1jax.config import ConfigError, check_fits

    m = cfg.model
    kept, dropped = [], []
    for model in _divisors(devices):
        for expert in _divisors(devices // model):
            data = devices // model // expert
            for fsdp in (True, False):
                name = f"({data}, {expert}, {model}){' fsdp' if fsdp else ''}"
                try:
                    check_fits(m, model=model, expert=expert, data=data, batch_size=cfg.batch_size)
                except ConfigError:
                    continue  # not a layout of this config: not listed
                if model > 8:
                    dropped.append((name, "model > 8"))
                elif m.is_moe and m.n_routed_experts // expert > 32:
                    dropped.append((name, "over 32 experts a device"))
                elif (est := state_bytes_estimate(cfg, data, expert, model, fsdp)) > 0.75 * hbm_bytes:
                    dropped.append((f"{name} ~{est / GiB:.0f} GiB", "state over 75% of HBM"))
                else:
                    configured = (data, expert, model, fsdp) == (cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model, cfg.mesh.fsdp)
                    kept.append((not configured, est, (data, expert, model, fsdp)))
    reasons: dict[str, list[str]] = {}
    for name, why in dropped:
        reasons.setdefault(why, []).append(name)
    return [c for *_, c in sorted(kept)], [f"{why}: {', '.join(names)}" for why, names in reasons.items()]


def search(cfg, chip, max_candidates: int = 12) -> list[tuple[DryRunReport, object]]:
    """Compiles the candidate meshes on all devices and returns (report, StepTime on `chip`) of
    those whose peak memory fits `chip`, fastest predicted step first (others printed, dropped)."""
    import jax

    from r1jax.parallel.mesh import make_mesh

    devices = jax.device_count()
    candidates, dropped = candidate_meshes(cfg, devices, chip.hbm_bytes)
    print(f"search: {len(candidates)} candidate meshes kept, compiling {min(len(candidates), max_candidates)}")
    for d in dropped:
        print("  dropped,", d)
    for c in candidates[max_candidates:]:
        print(f"  not compiled (max_candidates={max_candidates}): {c}")
    t0, fitting = time.perf_counter(), []
    for data, expert, model, fsdp in candidates[:max_candidates]:
        mesh_cfg = dataclasses.replace(cfg.mesh, data=data, expert=expert, model=model, fsdp=fsdp)
        c = dataclasses.replace(cfg, mesh=mesh_cfg)
        report = dry_run(c, make_mesh(c.mesh))
        (t,) = report.step_times([chip])
        print(f"  ({data}, {expert}, {model}) fsdp={fsdp}: peak {report.peak_bytes / GiB:.1f} GiB, "
              f"step >= {t.lower_s:.2f} s ({t.bound}), {report.lower_s + report.compile_s + report.parse_s:.0f} s"
              + ("" if t.fits else f"  -- does not fit {chip.name}"), flush=True)
        if t.fits:
            fitting.append((report, t))
    print(f"search: {time.perf_counter() - t0:.0f} s")
    return sorted(fitting, key=lambda rt: rt[1].lower_s)


def ranking_table(ranked) -> str:
    rows = [(f"  {'#':<3}{'mesh (d, e, m)':<18}{'fsdp':<6}{'peak/dev':>10}{'compute':>10}{'HBM':>10}{'collect.':>10}"
             f"{'step >=':>10}{'tok/s/chip':>12}{'MFU <=':>8}")]
    for i, (r, t) in enumerate(ranked, 1):
        mesh = f"({r.mesh['data']}, {r.mesh['expert']}, {r.mesh['model']})"
        rows.append(f"  {i:<3}{mesh:<18}{'yes' if r.fsdp else 'no':<6}{r.peak_bytes / GiB:>7.1f} GiB"
                    + f"{t.compute_s:>9.2f}s{t.hbm_s:>9.2f}s{t.collective_s:>9.2f}s{t.lower_s:>9.2f}s"
                    + f"{t.tokens_per_s:>12,.0f}{t.mfu_upper * 100:>7.1f}%")
    return "\n".join(rows)


def dry_run_kernels(cfg):
    """(cfg with the kernels the dry run compiles, a line naming them and what they stand in for)."""
    attention = "splash" if cfg.model.attention_impl == "auto" else cfg.model.attention_impl
    if attention == "cudnn":  # no CPU lowering; same memory profile
        attention = "splash"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=attention))
    what = {"splash": "Pallas splash attention in interpret mode (TPU kernel; stands in for cuDNN flash on GPU)",
            "xla": "block-causal XLA attention (logits materialised per query block)"}[attention]
    line = f"attention {what}"
    if cfg.model.is_moe:
        from r1jax.model.grouped_matmul import resolve_expert_kernel

        on_pod = {p: resolve_expert_kernel(cfg.parallel.expert_kernel, p) for p in ("tpu", "gpu")}
        line += (f"; routed experts: {cfg.parallel.expert_dispatch} dispatch, batched einsums (dropless runs "
                 f"grouped matmuls: {on_pod['tpu']} on TPU, {on_pod['gpu']} on GPU)")
    return cfg, line


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    from r1jax.config import load, parse_options

    (path,), options, rest = parse_options(argv, {"devices": int, "chip": str, "search": bool, "max_candidates": int},
                                           positional=("CONFIG",))
    devices = options.get("devices")
    cfg = load(path, *rest)
    from r1jax.parallel.chips import CHIPS, get_chip

    chip_name = options.get("chip", "all")
    chips = list(CHIPS.values()) if chip_name == "all" else [get_chip(chip_name)]
    if cfg.model.is_moe and cfg.parallel.expert_dispatch == "dropless":
        print(f"dispatch: dropless has no XLA:CPU lowering; compiling its stand-in, capacity at factor "
              f"{cfg.parallel.capacity_factor} (expert FLOPs and buffers carry that padding)")
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, expert_dispatch="capacity"))
    cfg, kernels = dry_run_kernels(cfg)
    print("kernels:", kernels)
    if devices is None:
        sizes = (cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model)
        devices = abs(sizes[0] * sizes[1] * sizes[2]) if -1 not in sizes else 8
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from r1jax.parallel.mesh import make_mesh
    from r1jax.train.step_time import chip_table, costs_table

    if options.get("search"):
        chip = chips[0] if chip_name != "all" else get_chip("v5p")
        ranked = search(cfg, chip, options.get("max_candidates", 12))
        print(f"meshes that fit {chip.name} ({chip.hbm_bytes / GiB:.0f} GiB), fastest predicted step first "
              f"(batch {cfg.batch_size} x {cfg.seq_len}):")
        print(ranking_table(ranked))
        return 0 if ranked else 1
    mesh = make_mesh(cfg.mesh)
    print(f"dry run: {path} on {devices} emulated devices, mesh {dict(mesh.shape)}, fsdp={cfg.mesh.fsdp}")
    report = dry_run(cfg, mesh)
    print(report.table())
    for w in report.warnings[:5]:
        print("  WARNING:", w[:300])
    print("per device per step (optimized HLO, loops multiplied out):")
    print(costs_table(report.costs, report.model_flops))
    print(f"step-time model (roofline; tokens/s and MFU at the lower bound; fits: peak {report.peak_bytes / GiB:.1f} GiB <= HBM):")
    print(chip_table(report.step_times(chips)))
    return 1 if report.warnings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
