"""Readers for user data: GSM8K-style and chat JSONL, random-access sources for grain.

Every malformed line raises `DataError` naming the file, the 1-based line number and
what is wrong. Blank lines are skipped (they still count for line numbers).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    def __init__(self, path: str | os.PathLike, line: int, problem: str):
        super().__init__(f"{os.fspath(path)}:{line}: {problem}")
        self.path, self.line, self.problem = os.fspath(path), line, problem


# A record parser gets the decoded JSON value and returns the record, raising ValueError
# (with a short description) when the value does not fit.
RecordParser = Callable[[Any], dict]


def _require_str(obj: dict, key: str) -> str:
    if key not in obj:
        raise ValueError(f"missing key {key!r}")
    if not isinstance(obj[key], str):
        raise ValueError(f"{key!r} must be a string, not {type(obj[key]).__name__}")
    return obj[key]


def _require_object(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, not {type(obj).__name__}")
    return obj


def parse_gsm8k(obj: Any) -> dict:
    """`{"question", "answer": "...steps... #### 1,234"}` -> question, reasoning, answer "1234"."""
    obj = _require_object(obj)
    question, answer = _require_str(obj, "question"), _require_str(obj, "answer")
    reasoning, marker, final = answer.rpartition("####")
    if not marker:
        raise ValueError("'answer' has no '#### <final answer>'")
    final = final.strip().replace(",", "")
    if not final:
        raise ValueError("'answer' has nothing after '####'")
    return {"question": question, "reasoning": reasoning.strip(), "answer": final}


def parse_chat(obj: Any) -> dict:
    """`{"messages": [{"role", "content"}, ...]}` with roles in ROLES."""
    messages = _require_object(obj).get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, not {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
    return {**obj, "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def parse_line(path: str | os.PathLike, line_number: int, line: str | bytes, parser: RecordParser | None) -> Any:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, line_number, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if parser is None:
        return obj
    try:
        return parser(obj)
    except ValueError as e:
        raise DataError(path, line_number, str(e)) from None


def read_jsonl(path: str | os.PathLike, parser: RecordParser | None = None) -> Iterator[Any]:
    """Records of a JSONL file in order, each passed through `parser`."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield parse_line(path, line_number, line, parser)


def read_gsm8k(path: str | os.PathLike) -> list[dict]:
    return list(read_jsonl(path, parse_gsm8k))


def read_chat(path: str | os.PathLike) -> list[dict]:
    return list(read_jsonl(path, parse_chat))


def gsm8k_chat(record: dict) -> dict:
    """A parsed GSM8K record as an R1-format SFT chat (reasoning in think, answer tagged)."""
    return {
        "messages": [
            {"role": "user", "content": record["question"]},
            {"role": "assistant", "content": f"<think>{record['reasoning']}</think> <answer>{record['answer']}</answer>"},
        ],
        "answer": record["answer"],
    }


class JsonlSource:
    """Random-access JSONL for grain (`len`, `[i]`): a line-offset index built once, lazy reads.

    Records are parsed (and validated) when read, so a bad line raises DataError when its
    index is first read, naming its line.
    """

    def __init__(self, path: str | os.PathLike, parser: RecordParser | None = None):
        self.path, self.parser = os.fspath(path), parser
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._line_numbers: list[int] = []
        with open(self.path, "rb") as f:
            offset = 0
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    self._offsets.append(offset)
                    self._lengths.append(len(line))
                    self._line_numbers.append(line_number)
                offset += len(line)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Any:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        # pread has no shared file position, so grain's reader threads can share the fd.
        line = os.pread(self._fd, self._lengths[index], self._offsets[index])
        return parse_line(self.path, self._line_numbers[index], line, self.parser)

    def __getstate__(self):  # file descriptors do not pickle; each process opens its own
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, {len(self)} records)"


class ArrayRecordJsonSource:
    """Random-access JSON records in ArrayRecord files, via grain's ArrayRecordDataSource."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], parser: RecordParser | None = None):
        try:
            from grain.sources import ArrayRecordDataSource
            import array_record  # noqa: F401  (grain imports it lazily)
        except ImportError as e:
            raise ImportError(
                "ArrayRecordJsonSource needs the `array-record` package (pip install array-record)"
            ) from e
        self._source = ArrayRecordDataSource(paths)
        self.name, self.parser = str(paths), parser

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        # DataError's "line" is the 1-based record number here.
        return parse_line(self.name, index + 1, self._source[index], self.parser)
