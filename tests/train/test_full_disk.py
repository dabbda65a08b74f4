"""A full disk while saving: train.py stops with one line naming the checkpoint directory, the
previous checkpoint stays intact, and `resume: auto` continues from it once there is room.

The disk is a size-limited tmpfs in a private mount namespace (`unshare --user --map-root-user
--mount`): nothing is mounted outside the test, and the mount goes with the namespace. Everything
that looks at the disk runs inside it: this file is also the driver (`python test_full_disk.py
DISK REPORT`), writing what it saw to REPORT, outside the tmpfs.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# tests/train/test_loop.py's tiny run (the same compiled programs), 6 steps, a checkpoint every 2.
RUN = ["configs/tiny-pretrain.yaml", "model.num_hidden_layers=2", "model.vocab_size=512", "data.vocab_size=512",
       "data.builtin_docs=400", "batch_size=8", "seq_len=32", "steps=6", "eval_every=0", "eval_batches=1",
       "optim.warmup_steps=2", "optim.decay_steps=6", "checkpoint.every=2", "checkpoint.keep=2"]


def _namespace(disk: Path, size_kib: int, command: list[str]) -> subprocess.CompletedProcess:
    """`command` with a `size_kib` tmpfs on `disk`, in a private user + mount namespace."""
    script = f'mount -t tmpfs -o size={size_kib}k tmpfs "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(disk),
                           *command], capture_output=True, text=True, timeout=300)


def _listing(checkpoints: Path) -> dict[str, bool]:
    """Each entry of the checkpoint directory: whether it holds Orbax's commit file."""
    if not checkpoints.is_dir():
        return {}
    return {p.name: (p / "_CHECKPOINT_METADATA").is_file() for p in sorted(checkpoints.iterdir())}


def _drive(disk: Path, report: Path) -> None:
    """Inside the namespace: train until the disk is full, look, make room, resume."""
    run_dir = disk / "run"
    train = [sys.executable, "train.py", *RUN, f"run_dir={run_dir}"]
    full = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=240)
    after_failure = _listing(run_dir / "checkpoints")
    subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
    resumed = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=240)
    report.write_text(json.dumps({
        "full": {"rc": full.returncode, "stderr": full.stderr, "stdout": full.stdout},
        "after_failure": after_failure,
        "resumed": {"rc": resumed.returncode, "stderr": resumed.stderr[-3000:], "stdout": resumed.stdout},
        "after_resume": _listing(run_dir / "checkpoints"),
    }))


def _checkpoint_bytes() -> int:
    """A checkpoint of RUN holds about its state's bytes (params + two Adam moments)."""
    import jax  # noqa: PLC0415

    from r1jax import config as config_lib  # noqa: PLC0415
    from r1jax.train.step import TrainStep  # noqa: PLC0415

    abstract = TrainStep(config_lib.load(*RUN)).abstract
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))


@pytest.fixture
def disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("needs `unshare` (util-linux) to mount a size-limited tmpfs in a private namespace")
    probe = _namespace(disk, 1024, ["true"])
    if probe.returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here: `unshare --user --map-root-user --mount` + "
                    f"`mount -t tmpfs` failed ({probe.stderr.strip()[:200]}); user namespaces may be disabled")
    return disk


def test_full_disk_stops_with_one_line_and_the_previous_checkpoint_resumes(disk, tmp_path):
    # Room for the first checkpoint (step 2) and the run's small files, not for a second one.
    size_kib = _checkpoint_bytes() * 3 // 2 // 1024
    report = tmp_path / "report.json"
    out = _namespace(disk, size_kib, [sys.executable, __file__, str(disk), str(report)])
    assert out.returncode == 0 and report.exists(), out.stderr[-3000:]
    seen = json.loads(report.read_text())

    full = seen["full"]
    checkpoints = disk / "run" / "checkpoints"
    expected = (f"checkpoint error: no space left on device while saving step 4 to {checkpoints}; the previous "
                "checkpoint, step 2, is intact (resume: auto continues from it)")
    assert full["rc"] == 1, full["stderr"][-3000:]
    lines = [line.split("\r")[-1] for line in full["stderr"].splitlines()]  # the progress bar redraws with \r
    assert lines[-1] == expected, full["stderr"][-3000:]
    noise = [line for line in lines if any(w in line for w in ("Traceback", "space", "RESOURCE_EXHAUSTED", "Error"))]
    assert noise == [expected], full["stderr"][-3000:]  # one line: no traceback, no log of Orbax's threads

    assert seen["after_failure"] == {"2": True}  # intact; the partial step-4 directory removed
    resumed = seen["resumed"]
    assert resumed["rc"] == 0, resumed["stderr"]
    assert re.findall(r"resumed from step\s+(\d+)", resumed["stdout"]) == ["2"], resumed["stdout"]
    assert seen["after_resume"] == {"4": True, "6": True}


if __name__ == "__main__":
    os.chdir(REPO)
    _drive(Path(sys.argv[1]), Path(sys.argv[2]))
