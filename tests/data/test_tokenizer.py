"""SentencePiece tokenizer, chat template and R1-Zero prompt."""
import pytest

from r1jax.data import tokenizer as tok_lib
from r1jax.data.tasks import corpus
from r1jax.data.tokenizer import SPECIAL_TOKENS, SentencePieceTokenizer, Tokenizer

MARKERS = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<think>", "</think>", "<answer>", "</answer>",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    tmp = tmp_path_factory.mktemp("tok")
    text = tmp / "corpus.txt"
    text.write_text("\n\n".join(corpus.pretrain_documents(300, seed=0)), encoding="utf-8")
    tok_lib.main(["train", "--input", str(text), "--vocab-size", "400", "--output", str(tmp / "tiny")])
    return SentencePieceTokenizer(tmp / "tiny.model")


def test_implements_the_interface(tokenizer):
    assert isinstance(tokenizer, Tokenizer)
    assert 300 <= tokenizer.vocab_size <= 400
    assert len({tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}) == 3
    assert tokenizer.token_to_id("no-such-piece-xyz") is None


@pytest.mark.parametrize("marker", MARKERS)
def test_marker_is_one_token_and_round_trips(tokenizer, marker):
    assert marker in SPECIAL_TOKENS
    ids = tokenizer.encode(marker)
    assert ids == [tokenizer.token_to_id(marker)]
    assert tokenizer.decode(ids) == marker


def test_bos_eos_pad_ids(tokenizer):
    assert tokenizer.encode("<｜begin▁of▁sentence｜>") == [tokenizer.bos_id]
    assert tokenizer.encode("<｜end▁of▁sentence｜>") == [tokenizer.eos_id]
    assert tokenizer.token_to_id("<pad>") == tokenizer.pad_id
    assert tokenizer.pad_id not in tokenizer.encode("<pad>")  # pad is never read from text


def test_markers_inside_text(tokenizer):
    text = "<think>a</think>"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.token_to_id("<think>") and ids[-1] == tokenizer.token_to_id("</think>")
    assert tokenizer.decode(ids) == text
    text = "x<｜User｜>What is 3 + 4?<｜Assistant｜><think>7</think> <answer>7</answer><｜end▁of▁sentence｜>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    for marker in MARKERS[1:]:
        assert tokenizer.token_to_id(marker) in ids


@pytest.mark.parametrize(
    "text",
    ["héllo wörld", "漢字とかな", "emoji 🙂🚀 ok", "ﬁ ligature ½ Ωμέγα", "  two  spaces\ttab\nnewline ", "Ǆ\u0301\u200d"],
)
def test_unicode_round_trips_via_byte_fallback(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>2+2=4</think> <answer>4</answer>"},
]


def test_chat_template_matches_hand_written_string():
    expected = (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
        "<｜User｜>What is 2+2?<｜Assistant｜><think>2+2=4</think> <answer>4</answer><｜end▁of▁sentence｜>"
    )
    assert tok_lib.render_chat(CONVERSATION, add_generation_prompt=False) == expected
    prompt = "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>"
    assert tok_lib.render_chat(CONVERSATION[:3], add_generation_prompt=True) == prompt
    with_system = [{"role": "system", "content": "Be brief."}] + CONVERSATION[:1]
    assert (
        tok_lib.render_chat(with_system, add_generation_prompt=True)
        == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>"
    )


def test_chat_template_rejects_bad_roles():
    with pytest.raises(ValueError):
        tok_lib.render_chat([{"role": "robot", "content": "x"}], add_generation_prompt=False)
    with pytest.raises(ValueError):
        tok_lib.render_chat(CONVERSATION[:1] + [{"role": "system", "content": "x"}], add_generation_prompt=False)


def test_completion_start_is_first_assistant_token(tokenizer):
    ids, start = tok_lib.encode_chat(tokenizer, CONVERSATION)
    assert ids == tokenizer.encode(tok_lib.render_chat(CONVERSATION, add_generation_prompt=False))
    assert ids[0] == tokenizer.bos_id
    assert ids[start - 1] == tokenizer.token_to_id("<｜Assistant｜>")
    assert ids[start] == tokenizer.token_to_id("<think>")
    assert ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[start:]) == "<think>2+2=4</think> <answer>4</answer><｜end▁of▁sentence｜>"
    assert tokenizer.decode(ids[:start]) == tok_lib.render_chat(CONVERSATION[:3], add_generation_prompt=True)


def test_r1_zero_prompt():
    expected = (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer. The reasoning process and answer are enclosed within "
        "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
        "here </think> <answer> answer here </answer>. User: What is 1+1? Assistant:"
    )
    assert tok_lib.r1_zero_prompt("What is 1+1?") == expected
    messages = tok_lib.r1_zero_messages("What is 1+1?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert tok_lib.render_chat(messages, add_generation_prompt=True).endswith("<｜User｜>What is 1+1?<｜Assistant｜>")
