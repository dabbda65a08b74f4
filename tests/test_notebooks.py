"""The notebooks in notebooks/ run top to bottom on CPU, and are committed without outputs.

Each notebook runs in a fresh kernel (this venv's Python) with cwd notebooks/, JAX_PLATFORMS=cpu and
no emulated device count: 02_sharding asks for its own 8 devices, the others see one, as a laptop
would. A notebook must finish within NOTEBOOK_TIMEOUT_S in all.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NOTEBOOK_TIMEOUT_S = 240
KERNEL = "r1jax-notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for this interpreter under its own name (so no other `python3` kernel on the
    machine is picked), and the environment the kernel inherits."""
    spec = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": KERNEL, "language": "python"}))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    return {"JUPYTER_PATH": str(spec.parent.parent), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags),
            "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, resources={"metadata": {"path": str(path.parent)}},
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),  # one budget for the whole notebook
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error
    print(f"{path.name}: {time.monotonic() - start:.1f} s")
