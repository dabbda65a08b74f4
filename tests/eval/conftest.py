"""Small benchmark files in the three formats (the tiny exported checkpoint, `tiny_run`, is in
tests/conftest.py)."""

import json

import pytest

GSM8K = [{"question": "What is 2 plus 2?", "answer": "Two and two.\n#### 4"},
         {"question": "Janet has 3 ducks and buys 1,000 more. How many?", "answer": "3+1000\n#### 1,003"},
         {"question": "What is 7 plus 5?", "answer": "#### 12"}]
MATH = [{"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "solution": "It is $\\boxed{1}$.", "unique_id": "a/1"},
        {"problem": "What is $x$ if $2x=1$?", "solution": "So $x=\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}",
         "unique_id": "a/2"}]
AIME = [{"id": 7, "problem": "Find 6 times 7.", "answer": 42}, {"id": 8, "problem": "Find 9 minus 9.", "answer": "0"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    return {"gsm8k": write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K), "math": write_jsonl(tmp_path / "math.jsonl", MATH),
            "aime": write_jsonl(tmp_path / "aime.jsonl", AIME)}
