"""Splits R1 output into `reasoning_content` (inside `<think>…</think>`) and `content`, as
DeepSeek's API does, also incrementally while streaming.

    split = ReasoningSplitter()
    for delta in text_deltas:
        reasoning, content = split.feed(delta)     # either may be ""
    reasoning, content = split.finish()            # what was held back

The result does not depend on how the text is cut into deltas: a suffix that may be the start
of a marker (or whitespace that may precede one) is held back until the next delta decides it,
so `split_reasoning(text)` equals the concatenation of any streamed split of the same text.

Rules. Output that starts (after whitespace) with `<think>` is reasoning up to `</think>`, and
content after it; whitespace around the reasoning and at the start of the content is dropped
(R1 writes `<think>\\n…\\n</think>\\n\\n`). Output that does not start with `<think>` is all
content (a model that does not think). An unclosed `<think>` (max_tokens reached while
thinking) leaves all of its text in `reasoning_content`.

A prompt that already opens the reasoning (DeepSeek-R1's chat template ends its generation prompt
with `<think>\\n`; r1jax's SentencePiece template does not) makes the output start inside it:
`ReasoningSplitter(thinking=True)`, with `opens_reasoning(prompt_text)` deciding. Then the
output is reasoning up to `</think>`, and all reasoning if it never closes. Otherwise the opening
tag is expected in the output, and a `</think>` without an opening tag stays in the content.
"""

from __future__ import annotations

from r1jax.data.tokenizer import THINK_END, THINK_START

_BEFORE, _THINKING, _AFTER_THINK, _CONTENT = range(4)


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest proper suffix of `text` that is a prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def opens_reasoning(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an opened `<think>` (the output continues the reasoning)."""
    return prompt_text.rstrip().endswith(THINK_START)


class ReasoningSplitter:
    """`thinking`: the prompt opened `<think>`, so the output starts inside the reasoning."""

    def __init__(self, *, thinking: bool = False):
        self.state = _THINKING if thinking else _BEFORE
        self.buf = ""  # text not yet assigned
        self.thought = thinking  # saw <think> (or the prompt did)
        self._started = False  # some reasoning text went out (leading whitespace is dropped)

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning, content) that `delta` (with what was held back) makes certain."""
        self.buf += delta
        reasoning = content = ""
        while True:
            if self.state == _BEFORE:
                head = self.buf.lstrip()
                if head.startswith(THINK_START):
                    self.buf = head[len(THINK_START):]
                    self.state, self.thought = _THINKING, True
                elif head and not THINK_START.startswith(head):
                    self.state = _CONTENT
                else:
                    return reasoning, content  # whitespace or a prefix of <think>: undecided
            elif self.state == _THINKING:
                if not self._started:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        return reasoning, content
                end = self.buf.find(THINK_END)
                if end >= 0:
                    reasoning += self.buf[:end].rstrip()
                    self.buf = self.buf[end + len(THINK_END):]
                    self.state = _AFTER_THINK
                    continue
                # hold back a possible start of </think>, and trailing whitespace before it
                keep = partial_suffix(self.buf, THINK_END)
                body = self.buf[: len(self.buf) - keep]
                stripped = body.rstrip()
                reasoning += stripped
                self._started = self._started or bool(stripped)
                self.buf = body[len(stripped):] + self.buf[len(body):]
                return reasoning, content
            elif self.state == _AFTER_THINK:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return reasoning, content
                self.state = _CONTENT
            else:
                content += self.buf
                self.buf = ""
                return reasoning, content

    def finish(self) -> tuple[str, str]:
        """(reasoning, content) still held back at the end of the output."""
        buf, self.buf = self.buf, ""
        if self.state == _THINKING:
            return buf.rstrip(), ""
        if self.state == _BEFORE:
            return "", buf
        return "", buf if self.state == _CONTENT else ""


def split_reasoning(text: str, *, thinking: bool = False) -> tuple[str | None, str]:
    """(reasoning_content or None when the output has no reasoning, content) of a whole output;
    `thinking` as for `ReasoningSplitter`."""
    s = ReasoningSplitter(thinking=thinking)
    r1, c1 = s.feed(text)
    r2, c2 = s.finish()
    return (r1 + r2 if s.thought else None), c1 + c2
