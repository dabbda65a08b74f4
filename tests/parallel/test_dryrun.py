"""The dry run compiles for abstract inputs, reads memory, and catches partitioner warnings."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from r1jax import config as config_lib
from r1jax.parallel.dryrun import REMAT_WARNING, CaptureStderr, dry_run
from r1jax.parallel.mesh import make_mesh


def test_log_capture_sees_a_known_full_rematerialization():
    """openxla/xla#15207: without this the no-warning assertions elsewhere could never fail."""
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    s1 = NamedSharding(mesh, PartitionSpec("y", None, "x"))
    s2 = NamedSharding(mesh, PartitionSpec(None, ("x", "y"), None))

    def f(a, b, c):
        return c + jax.lax.with_sharding_constraint(a + b, s2)

    a = jax.ShapeDtypeStruct((16, 16, 16), jnp.float32, sharding=s1)
    c = jax.ShapeDtypeStruct((16, 16, 16), jnp.float32, sharding=s2)
    with CaptureStderr() as log:
        jax.jit(f, out_shardings=s2).lower(a, a, c).compile()
    assert REMAT_WARNING in log.text


def test_dry_run_of_the_tiny_model_on_eight_devices():
    cfg = config_lib.load("configs/model/tiny-moe.yaml", "model.num_hidden_layers=2", "mesh.data=2", "mesh.expert=2",
                          "mesh.model=2", "mesh.fsdp=true", "batch_size=8", "seq_len=32")
    report = dry_run(cfg, make_mesh(cfg.mesh))
    assert report.warnings == []
    assert 0 < report.param_bytes < report.optimizer_bytes <= 2 * report.param_bytes + 1024
    assert report.argument_bytes >= report.param_bytes + report.optimizer_bytes
    assert report.peak_bytes > report.argument_bytes
