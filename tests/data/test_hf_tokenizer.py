"""HFTokenizer (tokenizer.json + tokenizer_config.json) against transformers, and `load_tokenizer`.

The tokenizer is a small byte-level BPE built here, as DeepSeek's and Qwen's are, with R1's markers;
its chat template is DeepSeek-R1's (the fixture beside this file).
"""
import json
import pickle
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from r1jax.data import tokenizer as tok_lib
from r1jax.data.hf_tokenizer import HFTokenizer
from r1jax.data.tasks import corpus
from r1jax.data.tokenizer import SentencePieceTokenizer, encode_chat, load_tokenizer, save_tokenizer, tokenizer_files

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
R1_TEMPLATE = (Path(__file__).parent / "r1_chat_template.jinja").read_text(encoding="utf-8")
CHATML_TEMPLATE = (  # keeps every turn as written: the whole rendering continues the prompt
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LINES = [
    "Ünïcödé façade, naïve café; 漢字とかな、한국어 and emoji 🙂🚀.",
    "  indented\tcode = {'x': [1, 2, 3]}\n\nreturn x ** 2  # ½ Ωμέγα",
    "<think>\nLet me add 17 and 25.\n</think>\n\nThe answer is 42.",
]


def _build(directory: Path, *, template: str = R1_TEMPLATE, pad: bool = False) -> Path:
    """A byte-level BPE tokenizer.json (bos/eos special, bos added by its post-processor as
    transformers would with add_special_tokens) and a tokenizer_config.json beside it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = list(corpus.pretrain_documents(300, seed=0)) + LINES * 20
    tok.train_from_iterator(text, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"] + (["<｜▁pad▁｜>"] if pad else []))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "eos_token": EOS, "chat_template": template, "model_max_length": 4096,
    }
    if pad:
        config["pad_token"] = {"content": "<｜▁pad▁｜>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("r1tok"))


@pytest.fixture(scope="module")
def tok(r1_dir) -> HFTokenizer:
    return HFTokenizer(r1_dir)


@pytest.fixture(scope="module")
def reference(r1_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(r1_dir))


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "one_user_turn": [_user("What is 17 + 25?")],
    "system_prompt": [{"role": "system", "content": tok_lib.R1_ZERO_SYSTEM_PROMPT}, _user("What is 3 * 4?")],
    "two_system_prompts": [{"role": "system", "content": "Be brief."}, _user("hi"),
                           {"role": "system", "content": "Answer in French."}],
    "multi_turn_reasoning": [
        _user("What is 2 + 2?"), _assistant("<think>\n2 plus 2 is 4.\n</think>\n\n4"),
        _user("And times 3?"), _assistant("<think>\n4 * 3 = 12\n</think>\n\n12"), _user("Thanks!"),
    ],
    "ends_with_assistant": [_user("Name a prime."), _assistant("<think>\nTwo is prime.\n</think>\n\n2")],
    "two_think_ends": [_user("x"), _assistant("<think>a</think>b</think>c"), _user("y")],
    "unicode": [_user("Ünïcödé 漢字とかな 한국어 🙂🚀 Ǆ\u0301\u200d"), _assistant("¿Qué? — ½ Ωμέγα"),
                _user("emoji: 👩‍👩‍👧")],
    "empty_content": [_user(""), _assistant(""), _user("")],
    "whitespace": [_user("  two  spaces\ttab\n\nnewlines \n"), _assistant("\n\n  ok  \n")],
    "markers_in_text": [_user(f"what does {USER} or <think> mean?"), _assistant("They are markers.")],
    "tool_output": [_user("weather?"), _assistant("Let me check."), {"role": "tool", "content": "sunny"},
                    _assistant("It is sunny.")],
    "none_values_dropped": [{"role": "user", "content": "hi", "name": None}],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_ids_match_transformers(tok, reference, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == expected
    ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.encode(text) == list(ids)


def test_r1_template_details(tok):
    messages = CONVERSATIONS["multi_turn_reasoning"]
    text = tok.render_chat(messages, add_generation_prompt=True)
    assert text.startswith(BOS) and text.endswith(f"{USER}Thanks!{ASSISTANT}<think>\n")
    assert "2 plus 2" not in text and f"{ASSISTANT}\n\n4{EOS}" in text  # earlier reasoning is dropped
    assert tok.encode(text)[0] == tok.bos_id and tok.encode(text).count(tok.bos_id) == 1


def test_special_ids_and_pad_fallback(tok, tmp_path):
    assert (tok.bos_id, tok.eos_id) == (0, 1) and tok.pad_id == tok.eos_id  # no pad_token: eos
    assert tok.add_bos_token
    for marker in (BOS, EOS, USER, ASSISTANT, "<think>", "</think>"):
        assert tok.encode(marker) == [tok.token_to_id(marker)]
    assert tok.token_to_id("no-such-token-xyz") is None
    assert tok.encode("hi")[0] != tok.bos_id  # the post-processor's bos is not added
    padded = HFTokenizer(_build(tmp_path / "pad", pad=True))
    assert padded.pad_id == padded.token_to_id("<｜▁pad▁｜>") not in (padded.eos_id, padded.bos_id)


@pytest.mark.parametrize("text", [
    f"{BOS}{USER}What is 3 + 4?{ASSISTANT}<think>\n7\n</think>\n\n7{EOS}", *LINES,
    "  two  spaces\ttab\nnewline ", "Ǆ\u0301\u200d", "▁ literal lower-eighth block ▁", "",
])
def test_decode_encode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_ignores_padded_vocab_rows(tok):
    ids = tok.encode(f"{BOS}hello 漢字{EOS}")
    assert tok.vocab_size == len(tok._tok.get_vocab(with_added_tokens=True))
    assert tok.decode([tok.vocab_size, *ids, tok.vocab_size + 7, -1]) == f"{BOS}hello 漢字{EOS}"


def test_load_tokenizer_dispatch(r1_dir, tmp_path):
    assert isinstance(load_tokenizer(r1_dir), HFTokenizer)
    assert isinstance(load_tokenizer(r1_dir / "tokenizer.json"), HFTokenizer)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus.pretrain_documents(100, seed=0)), encoding="utf-8")
    sp = tok_lib.train_sentencepiece([text], 400, tmp_path / "sp")
    assert isinstance(load_tokenizer(tmp_path / "sp.model"), SentencePieceTokenizer)
    sp_dir = tmp_path / "run"
    assert save_tokenizer(sp, sp_dir) == [sp_dir / "tokenizer.model"]
    loaded = load_tokenizer(sp_dir)
    assert isinstance(loaded, SentencePieceTokenizer) and loaded.encode("3 + 4") == sp.encode("3 + 4")
    assert loaded.render_chat([_user("hi")], add_generation_prompt=True) == f"{BOS}{USER}hi{ASSISTANT}"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds neither"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        load_tokenizer(tmp_path / "notes.txt")


def test_tokenizer_files_and_save(tok, r1_dir, tmp_path):
    assert tokenizer_files(tok) == [r1_dir / "tokenizer.json", r1_dir / "tokenizer_config.json"]
    copy = load_tokenizer(save_tokenizer(tok, tmp_path / "copy")[0].parent)
    messages = CONVERSATIONS["multi_turn_reasoning"]
    assert copy.render_chat(messages, add_generation_prompt=True) == tok.render_chat(messages,
                                                                                     add_generation_prompt=True)
    assert copy.encode(LINES[0]) == tok.encode(LINES[0])
    assert pickle.loads(pickle.dumps(tok)).encode(LINES[1]) == tok.encode(LINES[1])


@pytest.mark.parametrize("content, completion", [
    ("<think>\nR is 7.\n</think>\n\nThe answer is 7.", "R is 7.\n</think>\n\nThe answer is 7."),
    ("<think>7</think> <answer>7</answer>", "7</think> <answer>7</answer>"),  # r1jax's corpus format
])
def test_encode_chat_keeps_final_reasoning_with_r1_template(tok, content, completion):
    messages = [*CONVERSATIONS["multi_turn_reasoning"], _assistant(content)]
    prompt = tok.render_chat(messages[:-1], add_generation_prompt=True)
    assert tok_lib.chat_prompt_and_completion(tok, messages) == (prompt, completion + EOS)
    ids, start = encode_chat(tok, messages)
    full = tok.encode(prompt + completion + EOS)
    assert ids == full and ids[:start] == tok.encode(prompt) and ids[start:] == full[start:]
    assert tok.decode(ids[start:]) == completion + EOS and ids[-1] == tok.eos_id


def test_encode_chat_rejects_a_turn_that_does_not_continue_the_prompt(tok):
    with pytest.raises(ValueError, match="generation prompt"):
        encode_chat(tok, [_user("hi"), _assistant("no reasoning")])


def test_encode_chat_is_the_tail_of_the_full_rendering(tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = _build(tmp_path / "chatml", template=CHATML_TEMPLATE)
    tok, reference = HFTokenizer(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    messages = [_user("What is 2 + 2?"), _assistant("<think>\n2 plus 2\n</think>\n\n4"), _user("Times 3?"),
                _assistant("<think>\n4 * 3 = 12\n</think>\n\n12")]
    ids, start = encode_chat(tok, messages)
    full = list(reference.apply_chat_template(messages, tokenize=True, return_dict=False))
    prompt = list(reference.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                return_dict=False))
    assert ids == full and ids[:start] == prompt
    assert tok.decode(ids[start:]) == "<think>\n4 * 3 = 12\n</think>\n\n12<|im_end|>\n"


def test_missing_chat_template_is_a_clear_error(tmp_path):
    directory = _build(tmp_path / "bare")
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}), encoding="utf-8")
    tok = load_tokenizer(directory)
    assert tok.bos_id == tok.eos_id == tok.pad_id  # no bos / pad in the config: eos
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_chat([_user("hi")], add_generation_prompt=True)


def test_output_after_r1_prompt_starts_inside_reasoning(tok):
    from r1jax.serving.reasoning import ReasoningSplitter, opens_reasoning, split_reasoning

    assert opens_reasoning(tok.render_chat([_user("hi")], add_generation_prompt=True))
    assert not opens_reasoning(tok_lib.render_chat([_user("hi")], add_generation_prompt=True))
    output = "Add them: 2 + 2 = 4.\n</think>\n\nThe answer is 4."
    assert split_reasoning(output, thinking=True) == ("Add them: 2 + 2 = 4.", "The answer is 4.")
    assert split_reasoning(output) == (None, output)  # without the prompt's <think> it is all content
    split, parts = ReasoningSplitter(thinking=True), []
    for i in range(0, len(output), 3):
        parts.append(split.feed(output[i:i + 3]))
    parts.append(split.finish())
    assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == split_reasoning(output, thinking=True)
    assert split_reasoning("\nstill thinking ", thinking=True) == ("still thinking", "")  # max_tokens hit


@pytest.mark.parametrize("setting", ["data.tokenizer={d}", "data.tokenizer={d}/tokenizer.json", "init_from={d}"])
def test_run_config_opens_hf_tokenizers(r1_dir, tmp_path, setting):
    from r1jax import config as config_lib
    from r1jax.data.datasets import load_or_train_tokenizer

    run = Path(__file__).parents[2] / "configs" / "tiny-sft.yaml"
    cfg = config_lib.load(run, f"run_dir={tmp_path / 'run'}", setting.format(d=r1_dir))
    assert isinstance(load_or_train_tokenizer(cfg), HFTokenizer)
