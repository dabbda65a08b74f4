"""Device meshes with the named axes `data`, `expert`, `model`, and multi-host start-up.

Axis types: every axis is `AxisType.Auto`, on purpose. This JAX defaults `jax.make_mesh` to
Explicit axes ("sharding in types"), where every op must be able to say its output sharding and
ambiguous contractions are errors. r1jax instead places parameters and a few key activations by
one logical-axis table (`r1jax.parallel.rules`) and lets the partitioner propagate the rest; the
one place that needs exact control, the expert dispatch, is a `shard_map` where the axes are
manual anyway. Auto keeps the model code free of per-op sharding arguments, so changing the
parallelism of a run stays a config change.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from r1jax.config import ConfigError, DistributedConfig, MeshConfig, ModelConfig, check_fits

AXES = ("data", "expert", "model")
log = logging.getLogger(__name__)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, expert, model) sizes with -1 resolved; errors name the axis."""
    sizes = {"data": cfg.data, "expert": cfg.expert, "model": cfg.model}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, v in sizes.items():
        if v == -1:
            if num_devices % fixed:
                raise ConfigError(f"mesh.{axis}", f"-1 cannot fill {num_devices} devices: the other axes make {fixed}")
            sizes[axis] = num_devices // fixed
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ConfigError("mesh", f"data*expert*model = {sizes['data']}*{sizes['expert']}*{sizes['model']} = {total}, "
                                  f"but there are {num_devices} devices")
    if sizes["data"] % cfg.dcn_data:
        raise ConfigError("mesh.dcn_data", f"{cfg.dcn_data} slices do not divide mesh.data={sizes['data']}")
    return sizes["data"], sizes["expert"], sizes["model"]


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The run's mesh. With `dcn_data > 1` (multi-slice TPU pods) `data` spans slices over DCN
    and the other axes stay inside a slice, where ICI is fast."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    if cfg.dcn_data > 1:
        ici = (shape[0] // cfg.dcn_data, shape[1], shape[2])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (cfg.dcn_data, 1, 1), devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (NotImplementedError, ValueError, AssertionError):  # odd topologies: plain order
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def check_model_fits(mesh: Mesh, model: ModelConfig, batch_size: int | None = None) -> None:
    """Fails before compiling when heads, experts or the batch do not split over their axes."""
    check_fits(model, model=mesh.shape["model"], expert=mesh.shape["expert"], data=mesh.shape["data"],
               batch_size=batch_size)


def initialize_distributed(cfg: DistributedConfig) -> None:
    """`jax.distributed.initialize` from config, else from the usual environment variables
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; TPU pods and SLURM are
    auto-detected by JAX). Does nothing for a single process."""
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = cfg.num_processes or _env_int("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    if address is None and nproc is None:
        if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_JOB_ID"):
            jax.distributed.initialize()
        return
    if nproc == 1:
        return
    jax.distributed.initialize(address, nproc, pid)
    log.info("process %d of %d joined %s", jax.process_index(), jax.process_count(), address)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
