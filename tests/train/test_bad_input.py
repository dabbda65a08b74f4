"""Bad input stops a run early and clearly: malformed data lines (or, with data.skip_bad_lines,
skips and counts them), missing tokenizer / data paths, and NaN/inf losses."""

import functools
import importlib.util
import json
import logging
import pickle
import re

import jax
import numpy as np
import pytest

from r1jax import config as config_lib
from r1jax.checkpoint import load_params, read_meta
from r1jax.data import datasets
from r1jax.data.sources import DataError
from r1jax.train import loop
from r1jax.train.metrics import read_jsonl
from r1jax.train.step import TrainStep
from tests.train.test_loop import REPO, RUN  # the same tiny run: its compiled programs are cached

GOOD = [{"text": f"doc {i}: 1 + {i} = {1 + i}"} for i in range(4)]
BAD_LINE = '{"text": "cut off'  # line 3 of the file


def _jsonl(path):
    lines = [json.dumps(GOOD[0]), json.dumps(GOOD[1]), BAD_LINE, json.dumps(GOOD[2]), "", json.dumps(GOOD[3])]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(tmp_path, *extra):
    return config_lib.load(*RUN, f"run_dir={tmp_path / 'run'}", *extra)


class _NoStep:
    def __init__(self, *args, **kwargs):
        raise AssertionError("the run got as far as building its train step")


def _cli():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_malformed_line_stops_the_run_before_anything_compiles(tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "data.jsonl")
    monkeypatch.setattr(loop, "TrainStep", _NoStep)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: invalid JSON"):
        loop.train(_cfg(tmp_path, f"data.source={path}"))
    assert not (tmp_path / "run" / "tokenizer.model").exists()  # failed before even the tokenizer


def test_skip_bad_lines_skips_and_counts(tmp_path, caplog):
    path = _jsonl(tmp_path / "data.jsonl")
    with caplog.at_level(logging.WARNING, logger="r1jax"):
        source = datasets.data_source(_cfg(tmp_path, f"data.source={path}", "data.skip_bad_lines=true"))
    assert [source[i] for i in range(len(source))] == GOOD
    assert datasets.skipped_lines(source) == 1
    clone = pickle.loads(pickle.dumps(source))  # as grain's worker processes get it
    assert [clone[i] for i in range(len(clone))] == GOOD and clone.skipped[0].line == 3
    assert f"{path}:3: invalid JSON" in caplog.text

    # The same for ArrayRecord ("line" is the record number); a record of the wrong shape counts too.
    writer_module = pytest.importorskip("array_record.python.array_record_module")
    ar = str(tmp_path / "data.array_record")
    writer = writer_module.ArrayRecordWriter(ar, "group_size:1")
    for raw in [json.dumps(GOOD[0]), BAD_LINE, json.dumps({"txt": "x"}), json.dumps(GOOD[1])]:
        writer.write(raw.encode())
    writer.close()
    with pytest.raises(DataError, match=f"^{re.escape(ar)}:2: invalid JSON"):
        datasets.data_source(_cfg(tmp_path, f"data.source={ar}"))
    source = datasets.data_source(_cfg(tmp_path, f"data.source={ar}", "data.skip_bad_lines=true"))
    assert [source[i] for i in range(len(source))] == GOOD[:2] and datasets.skipped_lines(source) == 2


@pytest.mark.parametrize("key", ["data.tokenizer", "data.source"])
def test_missing_path_is_one_clear_line_naming_key_and_path(tmp_path, monkeypatch, capsys, key):
    missing = tmp_path / "nowhere" / ("tok.model" if key == "data.tokenizer" else "data.jsonl")
    monkeypatch.setattr(loop, "TrainStep", _NoStep)
    code = _cli()([*RUN, f"run_dir={tmp_path / 'run'}", f"{key}={missing}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"config error: {key}: {missing} does not exist" in err.strip().splitlines()[-1]


def test_nonfinite_losses_are_never_applied_and_stop_the_run(tmp_path, monkeypatch):
    """Losses NaN from step 5 on: steps 5, 6, 7 are skipped and logged, the third stops the run,
    the params never move after step 4, and no checkpoint is written after a NaN step (not at 6)."""
    nan_from, params_after = 5, {}  # host copies after steps 3 (saved), 4 (last good), 7 (third NaN)

    class NanStep(loop.TrainStep):  # poisons the batch's loss weights, so the compiled step is the usual one
        def __call__(self, state, batch):
            if int(state.step) + 1 >= nan_from:
                mask = batch["loss_mask"]
                batch = dict(batch, loss_mask=jax.device_put(np.full(mask.shape, np.nan, np.float32), mask.sharding))
            state, metrics = super().__call__(state, batch)
            if int(state.step) in (3, 4, 7):
                params_after[int(state.step)] = [np.asarray(x) for x in jax.tree.leaves(state.params)]
            return state, metrics

    monkeypatch.setattr(loop, "TrainStep", NanStep)
    # Not under test, and slow on a shared CPU: the GEMM peak for MFU, TensorBoard's import.
    monkeypatch.setattr(loop, "measure_peak_flops", lambda: 1e12)
    monkeypatch.setattr(loop, "MetricsLogger", functools.partial(loop.MetricsLogger, tensorboard=False))
    cfg = _cfg(tmp_path)
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 7"):
        loop.train(cfg)

    records = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r}
    assert sorted(records) == list(range(1, 8))
    assert [records[s]["nonfinite"] for s in range(1, 8)] == [0.0] * 4 + [1.0] * 3
    assert all(np.isnan(records[s]["loss"]) for s in (5, 6, 7))

    assert sorted(params_after) == [3, 4, 7]
    assert any(not np.array_equal(a, b) for a, b in zip(params_after[3], params_after[4]))  # step 4 trained
    assert all(np.array_equal(a, b) for a, b in zip(params_after[4], params_after[7]))  # NaN steps: no change
    assert all(np.isfinite(x).all() for x in params_after[7])

    assert read_meta(tmp_path / "run")["step"] == 3  # the last save before the NaNs; none at step 6
    abstract = TrainStep(cfg).abstract
    params, _ = load_params(tmp_path / "run", (abstract.params, abstract.extra))
    for saved, expected in zip(jax.tree.leaves(params), params_after[3]):
        np.testing.assert_array_equal(np.asarray(saved), expected)
