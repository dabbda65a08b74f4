"""The harness on the real engine over the tiny checkpoint: an OpenAI-compatible r1jax server gives
the records in-process evaluation gives; samples do not depend on the batching; an interrupted
and resumed run equals an uninterrupted one; the CLI writes the JSON and prints the tables.

Random weights never write `<think>` or an answer, so one question's prompt is answered by a
script (`ScriptedEngine`, as in tests/serving): a correct, well-formed R1 completion that goes
through the server's reasoning split and back."""

import json
import typing

import pytest

from r1jax import eval as r1eval
from r1jax.eval import backends, benchmarks
from r1jax.eval.__main__ import main
from r1jax.eval.metrics import summarize
from r1jax.sampling.engine import Engine
from r1jax.serving.app import create_app
from tests.eval.conftest import GSM8K
from tests.serving.loopback import serving

K = 2
MAX_TOKENS = 24
SCRIPT = "<think>2 plus 2 is 4. </think> <answer>4</answer>"
# As the server returns it (reasoning_content, content) and both backends join it back:
JOINED = "<think>\n2 plus 2 is 4.\n</think>\n\n<answer>4</answer>"


class ScriptedEngine(Engine):
    """Emits `scripts[prompt ids]` (then eos) instead of its samples for the prompts listed there."""

    scripts: typing.ClassVar[dict[tuple, list[int]]] = {}

    def _emit(self, slot, token, logprob, events):
        req = self.running[slot]
        script = self.scripts.get(tuple(req.prompt))
        if script is not None:
            token = script[min(len(req.token_ids), len(script) - 1)]
        super()._emit(slot, token, logprob, events)


@pytest.fixture(scope="module")
def scripted(tiny_run, tmp_path_factory, monkeypatch_module):
    tok = tiny_run["tok"]
    path = tmp_path_factory.mktemp("data") / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    questions = benchmarks.render(benchmarks.load([str(path)]), tok)
    ScriptedEngine.scripts = {tuple(tok.encode(questions[0]["prompt"])): tok.encode(SCRIPT) + [tok.eos_id]}
    monkeypatch_module.setattr(backends, "Engine", ScriptedEngine)
    return {"data": str(path), "questions": questions}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def engine(tiny_run, scripted):
    """The engine evaluate() builds for these questions (same slots and max_len: shared compiles)."""
    weights = backends.load_weights(tiny_run["dir"], tiny_run["cfg"])
    return backends.make_engine(weights, tiny_run["tok"], scripted["questions"], k=K, max_tokens=MAX_TOKENS,
                                batch_prompts=4)


def test_endpoint_matches_in_process(tiny_run, scripted, engine):
    tok = tiny_run["tok"]
    app = create_app(engine, tok, model_name="tiny-eval")
    common = {"data": [scripted["data"]], "k": K, "temperature": 0.0, "max_tokens": MAX_TOKENS, "seed": 5,
              "progress": False, "batch_prompts": 4}
    with serving(app) as port:
        served = r1eval.evaluate(endpoint=f"http://127.0.0.1:{port}/v1", tokenizer=tok.model_file, **common)
    local = r1eval.evaluate(checkpoint=str(tiny_run["dir"]), **common)
    # Lengths: a server reports the total of a request's choices; per choice they are re-encoded.
    without_length = lambda result: [{**r, "length": None} for r in result["records"]]
    assert without_length(served) == without_length(local)
    first = local["records"][:K]
    assert [r["completion"] for r in first] == [JOINED] * K  # the split into reasoning / content, joined back
    assert [(r["answer"], r["correct"], r["finish_reason"]) for r in first] == [("4", True, "stop")] * K
    assert [r["length"] for r in first] == [len(tok.encode(SCRIPT)) + 1] * K
    assert [r["length"] for r in served["records"][:K]] == [len(tok.encode(JOINED)) + 1] * K
    assert all(r["finish_reason"] == "length" and r["length"] == MAX_TOKENS for r in served["records"][K:])
    assert served["records"][K:] == local["records"][K:]
    for name in ("pass@1", "pass@1_se", f"pass@{K}", f"cons@{K}", "format", "truncated"):
        assert served["metrics"]["overall"][name] == local["metrics"]["overall"][name]
    # greedy: the k samples of a question agree; unscripted ones run to max_tokens unanswered
    rest = local["records"][K:]
    assert all(r["completion"] == rest[2 * (i // 2)]["completion"] for i, r in enumerate(rest))
    assert all(not r["correct"] for r in rest)
    m = local["metrics"]["gsm8k.jsonl"]
    assert m["n"] == 3 and m["pass@1"] == pytest.approx(1 / 3) and m["format"] == pytest.approx(1 / 3)
    assert local["config"]["checkpoint"] == str(tiny_run["dir"]) and served["config"]["endpoint"].endswith("/v1")


def test_samples_do_not_depend_on_batching(tiny_run, scripted, engine):
    fn = backends.engine_generate_fn(engine, tiny_run["tok"], temperature=1.0, top_p=1.0, max_tokens=8)
    qs = scripted["questions"]
    together = r1eval.evaluate_with(fn, qs, k=K, seed=3, batch_prompts=3, progress=False)
    alone = r1eval.evaluate_with(fn, qs[::-1], k=K, seed=3, batch_prompts=1, progress=False)
    key = lambda r: (r["id"], r["sample"])
    assert sorted(together["records"], key=key) == sorted(alone["records"], key=key)
    texts = [r["completion"] for r in together["records"][K:]]
    assert len(set(texts)) == len(texts)  # sampled: every unscripted sample differs
    other = r1eval.evaluate_with(fn, qs, k=K, seed=4, batch_prompts=3, progress=False)
    assert [r["completion"] for r in other["records"][K:]] != texts  # the seed matters


def test_interrupted_and_resumed_equals_uninterrupted(tiny_run, scripted, engine, tmp_path):
    fn = backends.engine_generate_fn(engine, tiny_run["tok"], temperature=1.0, top_p=1.0, max_tokens=8)
    qs = scripted["questions"]
    config = {"anything": 1}
    whole = r1eval.evaluate_with(fn, qs, k=K, seed=1, batch_prompts=1, config=config, progress=False)
    calls = []

    def dies_after_one(chunk, k, seeds):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(chunk))
        return fn(chunk, k, seeds)

    sidecar = tmp_path / "out.partial.jsonl"
    with pytest.raises(KeyboardInterrupt):
        r1eval.evaluate_with(dies_after_one, qs, k=K, seed=1, batch_prompts=1, sidecar=sidecar, config=config,
                             progress=False)
    lines = sidecar.read_text().splitlines()
    assert json.loads(lines[0]) == {"config": config} and len(lines) == 1 + K
    with open(sidecar, "a") as f:
        f.write('{"file": "gsm8k.jsonl", "id": "2", "sam')  # killed mid-write
    seen = []

    def counting(chunk, k, seeds):
        seen.extend(q["id"] for q in chunk)
        return fn(chunk, k, seeds)

    resumed = r1eval.evaluate_with(counting, qs, k=K, seed=1, batch_prompts=2, sidecar=sidecar, config=config,
                                   progress=False)
    assert seen == ["2", "3"]  # question 1 came from the sidecar
    assert resumed == whole
    with pytest.raises(r1eval.BenchmarkError, match="other arguments"):
        r1eval.evaluate_with(fn, qs, k=K, seed=1, sidecar=sidecar, config={"anything": 2}, progress=False)


def test_cli_writes_json_prints_table_and_compares(tiny_run, scripted, tmp_path, capsys):
    out = tmp_path / "a.json"
    args = [f"checkpoint={tiny_run['dir']}", f"data={scripted['data']},builtin", f"k={K}", f"out={out}",
            f"max_tokens={MAX_TOKENS}", "prompts=3", "batch_prompts=4", "progress=false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result) == {"metrics", "records", "config"}
    assert list(result["metrics"]) == ["gsm8k.jsonl", "builtin", "overall"]
    for name in ("gsm8k.jsonl", "builtin", "overall"):
        assert set(result["metrics"][name]) == {"n", "pass@1", "pass@1_se", f"pass@{K}", f"cons@{K}", "format",
                                                "mean_length", "max_length", "truncated"}
        assert name in printed
    assert result["metrics"]["overall"] == summarize(result["records"], K)
    assert len(result["records"]) == 6 * K and result["config"]["max_tokens"] == MAX_TOKENS
    assert result["config"]["temperature"] == 0.6 and result["config"]["k"] == K
    assert not (tmp_path / "a.partial.jsonl").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert "pass@1" in printed and f"cons@{K}" in printed and "33.3" in printed  # the scripted question
    # Another seed, compared: paired by question.
    b = tmp_path / "b.json"
    b.write_text(json.dumps({**result, "records": [{**r, "correct": True} for r in result["records"]]}))
    assert main(["--compare", str(out), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "B - A" in printed and "overall" in printed
    overall = next(line for line in printed.splitlines() if line.startswith("overall"))
    assert "+83.3" in overall  # 5 of 6 questions go from 0 to 1
