"""Readers for user data: GSM8K-style and chat JSONL, random-access sources for grain.

Every malformed line raises `DataError` naming the file, the 1-based line number and
what is wrong. Blank lines are skipped (they still count for line numbers).

The random-access sources can check every record when they are built (`validate=True`: one
parse pass over the data), so a bad line stops a run before it compiles anything; with
`skip_bad_lines=True` bad records are instead left out of the index, logged and counted in
`source.skipped` (the `data.skip_bad_lines` config key).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_SKIP_WARNINGS = 20  # skipped lines logged one by one; the rest only counted

log = logging.getLogger(__name__)


class DataError(ValueError):
    def __init__(self, path: str | os.PathLike, line: int, problem: str):
        super().__init__(f"{os.fspath(path)}:{line}: {problem}")
        self.path, self.line, self.problem = os.fspath(path), line, problem

    def __reduce__(self):  # pickles (e.g. out of a grain worker process) with its fields
        return type(self), (self.path, self.line, self.problem)


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


def parse_text(obj: Any) -> str | dict:
    """A pretraining document: a JSON string, or an object with a string `text`."""
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        raise ValueError(f"expected a string or an object with 'text', not {type(obj).__name__}")
    _require_str(obj, "text")
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
        raise DataError(path, line_number, f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
    except UnicodeDecodeError as e:  # bytes from a random-access read
        raise DataError(path, line_number, f"not UTF-8 ({e.reason} at byte {e.start})") from None
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


class _RecordCheck:
    """Parses records once to check them: `ok(line, raw)` is True for a good record; a bad one
    raises its DataError, or with skip_bad_lines is logged, kept in `skipped` and gives False."""

    def __init__(self, name: str, parser: RecordParser | None, skip_bad_lines: bool):
        self.name, self.parser, self.skip_bad_lines = name, parser, skip_bad_lines
        self.skipped: list[DataError] = []

    def ok(self, line_number: int, raw: str | bytes) -> bool:
        try:
            parse_line(self.name, line_number, raw, self.parser)
        except DataError as e:
            if not self.skip_bad_lines:
                raise
            self.skipped.append(e)
            if len(self.skipped) <= MAX_SKIP_WARNINGS:
                log.warning("skipping malformed record %s", e)
            return False
        return True

    def done(self) -> list[DataError]:
        n = len(self.skipped)
        if n > MAX_SKIP_WARNINGS:
            log.warning("%s: %d malformed records skipped in all (the first %d shown)", self.name, n, MAX_SKIP_WARNINGS)
        elif n:
            log.warning("%s: %d malformed record%s skipped", self.name, n, "s" * (n > 1))
        return self.skipped


class JsonlSource:
    """Random-access JSONL for grain (`len`, `[i]`): a line-offset index built once, lazy reads.

    By default records are parsed (and validated) when read, so a bad line raises DataError
    when its index is first read, naming its line. `validate=True` parses every line once
    while indexing (the cost of one parse pass over the file) so a bad line raises here;
    `skip_bad_lines=True` (implies validate) leaves bad lines out of the index instead, each
    logged, their DataErrors kept in `self.skipped`.
    """

    def __init__(self, path: str | os.PathLike, parser: RecordParser | None = None, *, validate: bool = False,
                 skip_bad_lines: bool = False):
        self.path, self.parser = os.fspath(path), parser
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._line_numbers: list[int] = []
        check = _RecordCheck(self.path, parser, skip_bad_lines) if validate or skip_bad_lines else None
        with open(self.path, "rb") as f:
            offset = 0
            for line_number, line in enumerate(f, start=1):
                if line.strip() and (check is None or check.ok(line_number, line)):
                    self._offsets.append(offset)
                    self._lengths.append(len(line))
                    self._line_numbers.append(line_number)
                offset += len(line)
        self.skipped: list[DataError] = check.done() if check else []
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
    """Random-access JSON records in ArrayRecord files, via grain's ArrayRecordDataSource.

    DataError's "line" is the 1-based record number over all the files. `validate` and
    `skip_bad_lines` as for JsonlSource (validating reads every record once)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], parser: RecordParser | None = None,
                 *, validate: bool = False, skip_bad_lines: bool = False):
        try:
            from grain.sources import ArrayRecordDataSource
            import array_record  # noqa: F401  (grain imports it lazily)
        except ImportError as e:
            raise ImportError(
                "ArrayRecordJsonSource needs the `array-record` package (pip install array-record)"
            ) from e
        self._source = ArrayRecordDataSource(paths)
        single = isinstance(paths, (str, os.PathLike))
        self.name = os.fspath(paths) if single else ",".join(map(os.fspath, paths))
        self.parser = parser
        self._indices: list[int] | None = None  # into self._source; None: all of them
        self.skipped: list[DataError] = []
        if validate or skip_bad_lines:
            check = _RecordCheck(self.name, parser, skip_bad_lines)
            good = [i for i in range(len(self._source)) if check.ok(i + 1, self._source[i])]
            self.skipped = check.done()
            if self.skipped:
                self._indices = good

    def __len__(self) -> int:
        return len(self._source) if self._indices is None else len(self._indices)

    def __getitem__(self, index: int) -> Any:
        index = index if self._indices is None else self._indices[index]
        return parse_line(self.name, index + 1, self._source[index], self.parser)
