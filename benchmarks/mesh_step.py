"""Per-step time of the tiny model's train step on each test mesh (8 emulated CPU devices).

    python benchmarks/mesh_step.py [steps]
Emulated devices share this machine's cores, so these times compare layouts and their
collectives, not hardware; the single-device row is the baseline.
"""

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from r1jax import config as config_lib  # noqa: E402
from r1jax.parallel.mesh import make_mesh  # noqa: E402
from r1jax.train.step import TrainStep, synthetic_batch  # noqa: E402

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2), (2, 4, 1), (1, 8, 1)]


def main(steps: int = 5) -> None:
    print(f"{'mesh (d,e,m)':<14}{'fsdp':<7}{'compile s':>10}{'step ms':>10}")
    for shape in MESHES:
        for fsdp in (False, True):
            d, e, m = shape
            cfg = config_lib.load("configs/model/tiny-moe.yaml", "batch_size=16", "seq_len=128", f"mesh.data={d}",
                                  f"mesh.expert={e}", f"mesh.model={m}", f"mesh.fsdp={str(fsdp).lower()}")
            mesh = make_mesh(cfg.mesh, jax.devices()[: d * e * m])
            step = TrainStep(cfg, mesh)
            state = step.init(0)
            batch = step.place_batch(synthetic_batch(cfg, jax.random.key(1)))
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            print(f"{str(shape):<14}{str(fsdp):<7}{compile_s:>10.1f}{(time.perf_counter() - t0) / steps * 1e3:>10.0f}",
                  flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
