"""JSONL readers, DataError reporting and random-access sources."""
import json
import pickle

import pytest

from r1jax.data import sources
from r1jax.data.sources import DataError, JsonlSource

GOOD_GSM8K = {"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7 apples.\n#### 7"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_gsm8k_final_answer_parsing():
    record = sources.parse_gsm8k({"question": "q", "answer": "Add them: 1000 + 234 = 1234.\n#### 1,234"})
    assert record == {"question": "q", "reasoning": "Add them: 1000 + 234 = 1234.", "answer": "1234"}
    assert sources.parse_gsm8k({"question": "q", "answer": "#### -3.5 "})["answer"] == "-3.5"


def test_read_gsm8k_and_chat(tmp_path):
    gsm = write_lines(tmp_path / "gsm.jsonl", [json.dumps(GOOD_GSM8K), "", json.dumps(GOOD_GSM8K)])
    records = sources.read_gsm8k(gsm)
    assert len(records) == 2 and records[0]["answer"] == "7"
    chat = sources.gsm8k_chat(records[0])
    assert chat["messages"][1]["content"] == "<think>3 + 4 = <<3+4=7>>7 apples.</think> <answer>7</answer>"
    chats = sources.read_chat(write_lines(tmp_path / "chat.jsonl", [json.dumps(GOOD_CHAT)]))
    assert chats == [GOOD_CHAT]


@pytest.mark.parametrize(
    "reader, bad_line, problem",
    [
        (sources.read_gsm8k, '{"question": "q", "answer": "7"', "invalid JSON"),
        (sources.read_gsm8k, '{"question": "q"}', "missing key 'answer'"),
        (sources.read_gsm8k, '{"question": 3, "answer": "#### 3"}', "'question' must be a string"),
        (sources.read_gsm8k, '{"question": "q", "answer": "seven"}', "no '####"),
        (sources.read_gsm8k, '{"question": "q", "answer": "7 ####  "}', "nothing after '####'"),
        (sources.read_gsm8k, '["question", "answer"]', "expected a JSON object"),
        (sources.read_chat, '{"messages": []}', "non-empty list"),
        (sources.read_chat, '{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
        (sources.read_chat, '{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (sources.read_chat, '{"prompt": "x"}', "'messages'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, reader, bad_line, problem):
    good = json.dumps(GOOD_GSM8K if reader is sources.read_gsm8k else GOOD_CHAT)
    path = write_lines(tmp_path / "data.jsonl", [good, "", good, bad_line, good])  # bad line is line 4
    with pytest.raises(DataError) as info:
        reader(path)
    assert info.value.path == str(path) and info.value.line == 4
    assert problem in str(info.value)
    assert str(info.value).startswith(f"{path}:4: ")


def test_jsonl_source_random_access(tmp_path):
    records = [{"text": f"doc {i} ✓", "i": i} for i in range(50)]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path = write_lines(tmp_path / "docs.jsonl", lines[:10] + ["", "   "] + lines[10:])
    source = JsonlSource(path)
    assert len(source) == 50
    assert [source[i] for i in (0, 49, 10, 11, 3, -1)] == [records[i] for i in (0, 49, 10, 11, 3, -1)]
    clone = pickle.loads(pickle.dumps(source))
    assert [clone[i] for i in range(50)] == records


def test_jsonl_source_reports_bad_line_when_read(tmp_path):
    path = write_lines(tmp_path / "gsm.jsonl", [json.dumps(GOOD_GSM8K), "", "not json", json.dumps(GOOD_GSM8K)])
    source = JsonlSource(path, sources.parse_gsm8k)
    assert len(source) == 3
    assert source[2]["answer"] == "7"
    with pytest.raises(DataError, match=r"gsm\.jsonl:3: invalid JSON") as info:
        source[1]
    assert info.value.line == 3


def test_array_record_source(tmp_path):
    writer_module = pytest.importorskip("array_record.python.array_record_module")
    path = str(tmp_path / "docs.array_record")
    writer = writer_module.ArrayRecordWriter(path, "group_size:1")
    records = [{"text": f"doc {i}"} for i in range(5)]
    for r in records:
        writer.write(json.dumps(r).encode())
    writer.close()
    source = sources.ArrayRecordJsonSource(path)
    assert len(source) == 5 and [source[i] for i in range(5)] == records
