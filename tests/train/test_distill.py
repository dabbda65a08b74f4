"""mode: distill end to end on a tiny random MoE (MLA) teacher and a tiny dense (GQA) student of another
width and depth: traces -> SFT student whose held-out loss falls; the teacher's stored top-k equals
its own forward over each trace; logit-level training (stored top-k and live teacher) lowers the
loss, and both see the same loss when k is the whole vocabulary; a finished run re-run samples
nothing; teacher and student with different vocabularies stop before anything is written."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from r1jax import checkpoint as ckpt_lib
from r1jax import config as config_lib
from r1jax.data.tokenizer import encode_chat, train_sentencepiece
from r1jax.train import distill as distill_lib
from r1jax.train.metrics import read_jsonl
from tests.sampling import materialise

CORPUS = ("<think>\nFirst add the ones, then carry the tens.\n</think>\n\n<answer>{n}</answer>\n"
          "Question: what is {a} plus {b}? What is {a} + {b}? Compute {a} - {b}.\n")


def student_cfg(teacher, run_dir, *extra):
    return config_lib.load(
        "configs/tiny-distill.yaml", f"distill.teacher={teacher['dir']}", f"run_dir={run_dir}",
        f"model.vocab_size={teacher['tok'].vocab_size}", "model.hidden_size=48", "model.num_hidden_layers=3",
        "model.intermediate_size=96", "batch_size=8", "seq_len=64", "steps=24", "eval_every=8", "eval_batches=2",
        "log_every=1", "optim.learning_rate=3e-3", "optim.warmup_steps=2", "optim.decay_steps=22",
        "checkpoint.every=12", "checkpoint.async_save=false", "distill.prompts=16", "distill.samples=3",
        "distill.eval_prompts=8", "distill.max_tokens=20", "distill.batch_prompts=16", "distill.min={format: 0.0}",
        "distill.top_k=8", *extra)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An exported random tiny MoE (MLA, 2 layers) with a saved config and a small SentencePiece
    tokenizer. One embedding dimension is made large and feeds the eos logit, so its samples end
    within a few tokens (the format threshold is 0 in these tests: any finished sample is a trace)."""
    tmp = tmp_path_factory.mktemp("teacher")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(CORPUS.format(a=a, b=b, n=a + b) for a in range(12) for b in range(7)))
    tok = train_sentencepiece([corpus], 320, tmp / "tok")
    cfg = config_lib.load("configs/tiny-grpo.yaml", f"model.vocab_size={tok.vocab_size}", "model.num_hidden_layers=2",
                          "data.max_difficulty=1", "init_from=null")
    model = materialise(cfg.model)
    _, params, extra = nnx.split(model, nnx.Param, ...)
    params["embed"].value = params["embed"].value.at[:, 0].set(8.0)
    params["lm_head"].value = params["lm_head"].value.at[0, tok.eos_id].set(0.8)
    export = ckpt_lib.export_params(tmp / "params", (params, extra),
                                    meta={"config": config_lib.to_dict(cfg), "tokenizer": tok.model_file})
    return {"dir": export, "tok": tok, "cfg": cfg, "model": nnx.merge(*nnx.split(model))}


def _eval_losses(run_dir):
    return [r["eval_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r]


def _losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def sequence_run(teacher, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("seq") / "run"
    summary = distill_lib.distill(student_cfg(teacher, run_dir, "distill.kind=sequence"))
    return run_dir, summary


def test_sequence_level_student_learns_the_traces(sequence_run):
    run_dir, summary = sequence_run
    assert summary.generated and summary.traces >= 16 and summary.eval_traces >= 8
    traces = [json.loads(line) for line in (run_dir / "traces.jsonl").read_text().splitlines()]
    assert all(t["messages"][-1]["role"] == "assistant" for t in traces)
    assert not list(run_dir.glob("*.tmp"))
    held_out = _eval_losses(run_dir)
    first_train = _losses(run_dir)[0]
    assert len(held_out) == 3 and held_out[-1] < held_out[0] < first_train, (held_out, first_train)
    assert (run_dir / "params").is_dir() and summary.student.steps == 24
    saved = config_lib.load(run_dir / "config.yaml")
    assert saved.mode == "sft" and saved.data.source == str(run_dir / "traces.jsonl")


def test_rerunning_a_finished_run_samples_nothing(sequence_run, teacher, monkeypatch):
    run_dir, _ = sequence_run
    before = (run_dir / "traces.jsonl").stat().st_mtime_ns

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built again")

    monkeypatch.setattr(distill_lib, "Engine", no_engine)
    again = distill_lib.distill(student_cfg(teacher, run_dir, "distill.kind=sequence"))
    assert not again.generated and again.student.resumed_from == 24
    assert (run_dir / "traces.jsonl").stat().st_mtime_ns == before


def _logit_run(teacher, sequence_run, tmp_path, *extra, held_out=True):
    """A logit-level run on the sequence run's traces (copied: their generation is skipped)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    for name in ("traces.jsonl", "traces_eval.jsonl")[:2 if held_out else 1]:
        shutil.copy(sequence_run[0] / name, run_dir / name)
    cfg = student_cfg(teacher, run_dir, "distill.kind=logit", "distill.loss=jsd", "distill.jsd_beta=0.5",
                      "distill.kd_temperature=2.0", "steps=12", "eval_every=4", "optim.decay_steps=10", *extra)
    return run_dir, distill_lib.distill(cfg)


def test_stored_topk_is_the_teachers_forward_and_the_student_learns(teacher, sequence_run, tmp_path):
    run_dir, summary = _logit_run(teacher, sequence_run, tmp_path)
    assert not summary.generated
    arrays = {k: np.load(run_dir / "trace_arrays" / f"train_{k}.npy") for k in
              ("inputs", "targets", "loss_mask", "lengths", "teacher_ids", "teacher_logp")}
    traces = [json.loads(line) for line in (run_dir / "traces.jsonl").read_text().splitlines()]
    for i in (0, len(traces) - 1):  # independently: the chat's ids, the teacher's own forward
        ids, start = encode_chat(teacher["tok"], traces[i]["messages"])
        n = min(len(ids) - 1, 64)
        assert arrays["lengths"][i] == n
        np.testing.assert_array_equal(arrays["targets"][i, :n], ids[1:n + 1])
        np.testing.assert_array_equal(arrays["loss_mask"][i, :n], np.arange(1, n + 1) >= start)
        logp = np.asarray(jax.nn.log_softmax(teacher["model"](np.asarray([ids[:n]])).logits[0], -1))
        want = np.argsort(-logp, -1)[:, :8]
        np.testing.assert_array_equal(arrays["teacher_ids"][i, :n], want)
        np.testing.assert_allclose(arrays["teacher_logp"][i, :n], np.take_along_axis(logp, want, -1), atol=2e-4)
    losses, held_out = _losses(run_dir), _eval_losses(run_dir)
    # JSD at τ = 2 of a near-random pair sits near its bound log 2: it falls by a few percent in 12 steps.
    assert np.mean(losses[-3:]) < 0.97 * losses[0] and held_out[-1] < 0.98 * held_out[0], (losses, held_out)
    assert "kd" in read_jsonl(run_dir / "metrics.jsonl")[0]


def test_live_teacher_equals_stored_full_topk_and_learns(teacher, sequence_run, tmp_path):
    vocab = teacher["tok"].vocab_size
    live_dir, _ = _logit_run(teacher, sequence_run, tmp_path / "live", "distill.live_teacher=true")
    stored_dir, _ = _logit_run(teacher, sequence_run, tmp_path / "stored", f"distill.top_k={vocab}", "steps=1",
                               held_out=False)
    live, stored = _losses(live_dir), _losses(stored_dir)
    np.testing.assert_allclose(live[0], stored[0], rtol=1e-4)  # same init, same first batch
    assert np.mean(live[-3:]) < 0.97 * live[0] and len(_eval_losses(live_dir)) == 3, live


@pytest.mark.parametrize("kind", ["sequence", "logit"])
def test_different_vocabularies_stop_before_anything_is_written(teacher, tmp_path, kind):
    other = tmp_path / "other.txt"
    other.write_text("".join(f"lorem ipsum {a} dolor {a * 7} sit amet\n" for a in range(300)))
    tok = train_sentencepiece([other], 400, tmp_path / "other")
    run_dir = tmp_path / "run"
    cases = [[f"data.tokenizer={tok.model_file}"]] + ([["model.vocab_size=512"]] if kind == "logit" else [])
    for extra in cases:
        with pytest.raises(config_lib.ConfigError) as e:
            distill_lib.distill(student_cfg(teacher, run_dir, f"distill.kind={kind}", *extra))
        assert e.value.key == "distill.teacher" and "\n" not in str(e.value), e.value
        assert not run_dir.exists()
