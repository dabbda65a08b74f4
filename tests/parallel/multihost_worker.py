"""One process of the two-process test: 4 CPU devices each, gloo collectives, loopback.

    python tests/parallel/multihost_worker.py PORT PROCESS_ID OVERRIDE...
Prints one JSON line with the loss of one train step on this process's half of the batch.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from r1jax import config as config_lib  # noqa: E402
from r1jax.config import DistributedConfig  # noqa: E402
from r1jax.data.pipeline import to_global_batch  # noqa: E402
from r1jax.parallel.mesh import initialize_distributed, make_mesh  # noqa: E402
from r1jax.train.step import BATCH_KEYS, TrainStep, synthetic_batch  # noqa: E402


def main(port: int, pid: int, overrides: list[str]) -> None:
    initialize_distributed(DistributedConfig(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid))
    assert jax.process_count() == 2 and len(jax.devices()) == 8
    cfg = config_lib.load("configs/model/tiny-moe.yaml", *overrides)
    step = TrainStep(cfg, make_mesh(cfg.mesh))
    state = step.init(0)
    full = jax.tree.map(lambda x: jax.device_get(x), synthetic_batch(cfg, jax.random.key(1)))
    half = cfg.batch_size // 2
    local = {k: full[k][pid * half:(pid + 1) * half] for k in BATCH_KEYS}
    batch = to_global_batch(local, step.batch_shardings["inputs"])
    _, metrics = step(state, batch)
    print(json.dumps({"process": pid, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
