"""Two processes x 4 CPU devices (gloo, loopback coordinator) equal one process of 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from r1jax import config as config_lib
from r1jax.parallel.mesh import make_mesh
from r1jax.train.step import TrainStep, synthetic_batch

WORKER = Path(__file__).with_name("multihost_worker.py")
REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["model.num_hidden_layers=3", "model.vocab_size=256", "batch_size=8", "seq_len=16",
             "mesh.data=2", "mesh.expert=2", "mesh.model=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), *OVERRIDES], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))

    cfg = config_lib.load("configs/model/tiny-moe.yaml", *OVERRIDES)
    step = TrainStep(cfg, make_mesh(cfg.mesh))
    state = step.init(0)
    _, metrics = step(state, step.place_batch(synthetic_batch(cfg, jax.random.key(1))))
    for out in outs:
        np.testing.assert_allclose(out["loss"], float(metrics["loss"]), rtol=1e-5)
        np.testing.assert_allclose(out["grad_norm"], float(metrics["grad_norm"]), rtol=1e-5)
