"""A tiny exported checkpoint (random tiny MoE, 2 layers, a small SentencePiece tokenizer, a saved
run config) shared by the evaluation tests, and small benchmark files in the three formats."""

import json

import pytest
from flax import nnx

from r1jax import checkpoint as ckpt_lib
from r1jax import config as config_lib
from r1jax.data.tokenizer import train_sentencepiece
from tests.sampling import materialise

CORPUS = ("<think>\nFirst add the ones, then carry the tens.\n</think>\n\n<answer>{n}</answer>\n"
          "Question: what is {a} plus {b}? Janet has {a} ducks and buys {b} more.\n")
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """{"dir": an exported checkpoint with meta config + tokenizer, "tok", "cfg"}."""
    tmp = tmp_path_factory.mktemp("eval_run")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(CORPUS.format(a=a, b=b, n=a + b) for a in range(12) for b in range(7)))
    tok = train_sentencepiece([corpus], 320, tmp / "tok")
    cfg = config_lib.load("configs/tiny-grpo.yaml", f"model.vocab_size={tok.vocab_size}", "model.num_hidden_layers=2",
                          "grpo.max_completion_length=16", "data.max_difficulty=1", "init_from=null")
    model = materialise(cfg.model)
    _, params, extra = nnx.split(model, nnx.Param, ...)
    export = ckpt_lib.export_params(tmp / "params", (params, extra),
                                    meta={"config": config_lib.to_dict(cfg), "tokenizer": tok.model_file})
    return {"dir": export, "tok": tok, "cfg": cfg}


@pytest.fixture
def files(tmp_path):
    return {"gsm8k": write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K), "math": write_jsonl(tmp_path / "math.jsonl", MATH),
            "aime": write_jsonl(tmp_path / "aime.jsonl", AIME)}
