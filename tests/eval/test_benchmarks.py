"""Benchmark files in the three formats and the built-in source become question records; bad input
fails with one line naming the file (and line), before anything is written; answers are checked
by math-verify (files) or the task's checker (built-in)."""

import json

import pytest

from r1jax.data.tokenizer import chat_text
from r1jax.eval import BenchmarkError, load_questions, render
from r1jax.eval.__main__ import main
from r1jax.eval.benchmarks import MATH_TEMPLATE, score
from r1jax.train.grpo import prompt_records
from tests.eval.conftest import AIME, GSM8K, MATH, write_jsonl

ADVICE = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def test_three_formats(files):
    qs = load_questions([str(files["gsm8k"]), str(files["math"]), str(files["aime"])])
    assert [(q["file"], q["id"], q["answer"]) for q in qs] == [
        ("gsm8k.jsonl", "1", "4"), ("gsm8k.jsonl", "2", "1003"), ("gsm8k.jsonl", "3", "12"),
        ("math.jsonl", "a/1", "1"), ("math.jsonl", "a/2", "\\frac{1}{2}"),
        ("aime.jsonl", "7", "42"), ("aime.jsonl", "8", "0")]
    questions = [r["question"] for r in GSM8K] + [r["problem"] for r in MATH + AIME]
    assert [q["question"] for q in qs] == questions
    assert [q["content"] for q in qs] == [q + ADVICE for q in questions]
    assert all("task" not in q for q in qs)


def test_forced_format_and_template(files, tmp_path):
    # problem + answer + solution would be detected as MATH; forced to aime the answer field is used
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"problem": "p", "solution": "\\boxed{5}", "answer": "6"}])
    assert load_questions([str(path)])[0]["answer"] == "6"  # MATH prefers the answer field too
    path = write_jsonl(tmp_path / "sol.jsonl", [{"problem": "p", "solution": "a \\boxed{2} b \\boxed{\\frac{3}{4}}"}])
    assert load_questions([str(path)])[0]["answer"] == "\\frac{3}{4}"  # the last boxed
    qs = load_questions([str(files["aime"])], fmt="aime", template="Q: {question} A:")
    assert qs[0]["content"] == "Q: Find 6 times 7. A:"
    with pytest.raises(BenchmarkError, match=r"aime.jsonl:1: no 'question'"):
        load_questions([str(files["aime"])], fmt="gsm8k")


def test_builtin_source(tiny_run):
    cfg, tok = tiny_run["cfg"], tiny_run["tok"]
    qs = load_questions(["builtin"], cfg=cfg, tokenizer=tok, prompts=5)
    want = prompt_records(cfg, tok, "eval", 5)
    assert [q["id"] for q in qs] == ["0", "1", "2", "3", "4"] and {q["file"] for q in qs} == {"builtin"}
    assert [(q["question"], q["answer"], q["task"]) for q in qs] == [(r["question"], r["answer"], r["task"])
                                                                      for r in want]
    assert [q["content"] for q in qs] == [r["question"] for r in want]  # raw: as the models are trained
    rendered = render(qs, tok)
    assert [q["prompt"] for q in rendered] == [chat_text(tok, [{"role": "user", "content": r["question"]}],
                                                         add_generation_prompt=True) for r in want]


def test_render_uses_the_chat_template(files, tiny_run):
    tok = tiny_run["tok"]
    q = render(load_questions([str(files["gsm8k"])]), tok)[0]
    content = MATH_TEMPLATE.format(question=GSM8K[0]["question"])
    assert q["prompt"] == chat_text(tok, [{"role": "user", "content": content}], add_generation_prompt=True)


def test_scoring():
    q = {"answer": "\\frac{1}{2}"}
    assert score(q, "so it is \\boxed{0.5}") == ("0.5", True)
    assert score(q, "<think>\\boxed{1/2}</think> <answer>1/3</answer>") == ("1/3", False)
    assert score(q, "no answer here") == (None, False)
    assert score({"answer": "1003"}, "\\boxed{1,003}")[1] is True
    builtin = {"task": "arithmetic", "question": "What is 3 + 4?", "answer": "7"}
    assert score(builtin, "<think>3+4</think> <answer>7</answer>") == ("7", True)
    assert score(builtin, "<think>3+4</think> <answer>8</answer>") == ("8", False)


BAD = {
    "empty": ("", r"empty\.jsonl: empty"),
    "malformed": ('{"question": "q", "answer": "#### 1"}\n{"question": oops}\n', r"malformed\.jsonl:2: malformed JSON"),
    "noanswer": ('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": "no hashes"}\n',
                 r"noanswer\.jsonl:2: no 'answer'"),
    "nosolution": ('{"problem": "q", "answer": "1"}\n{"problem": "q2", "solution": "no box"}\n',
                   r"nosolution\.jsonl:2: no answer"),
    "unknown": ('{"prompt": "q", "target": "1"}\n', r"unknown\.jsonl:1: cannot tell the format"),
    "notobject": ('[1, 2]\n', r"notobject\.jsonl:1: a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_naming_the_file(case, tmp_path, capsys):
    text, message = BAD[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_text(text)
    with pytest.raises(BenchmarkError, match=message) as e:
        load_questions([str(path)])
    assert "\n" not in str(e.value)
    out = tmp_path / "result.json"
    # The CLI: one line on stderr, exit 2, nothing written (fails before the checkpoint is looked at).
    assert main(["endpoint=http://127.0.0.1:9/v1", f"data={path}", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and case in err
    assert list(tmp_path.iterdir()) == [path]


def test_other_bad_input(tmp_path, files, capsys):
    with pytest.raises(BenchmarkError, match=r"missing\.jsonl: no such file"):
        load_questions([str(tmp_path / "missing.jsonl")])
    with pytest.raises(BenchmarkError, match=r"format=csv: unknown"):
        load_questions([str(files["aime"])], fmt="csv")
    with pytest.raises(BenchmarkError, match=r"template"):
        load_questions([str(files["aime"])], template="no placeholder")
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "problem": "a", "answer": "1"},
                                               {"id": 1, "problem": "b", "answer": "2"}])
    with pytest.raises(BenchmarkError, match=r"dup\.jsonl:2: id '1' appears twice"):
        load_questions([str(dup)])
    (tmp_path / "sub").mkdir()
    same = write_jsonl(tmp_path / "sub" / "aime.jsonl", AIME)
    with pytest.raises(BenchmarkError, match="a second data file named aime.jsonl"):
        load_questions([str(files["aime"]), str(same)])
    with pytest.raises(BenchmarkError, match="builtin needs"):
        load_questions(["builtin"])
    out = tmp_path / "r.json"
    assert main(["endpoint=http://127.0.0.1:9/v1", f"data={tmp_path / 'missing.jsonl'}", f"out={out}"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert main(["endpoint=http://127.0.0.1:9/v1", f"data={files['aime']}", "format=csv", f"out={out}"]) == 2
    assert not out.exists() and not (tmp_path / "r.partial.jsonl").exists()
    assert json.loads(files["aime"].read_text().splitlines()[0])["id"] == 7
