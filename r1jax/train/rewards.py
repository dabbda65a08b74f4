"""Rule-based rewards for R1 (accuracy, format, language consistency) and a runner for them.

A reward function follows TRL's signature:
    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]
where each column is a list with one entry per completion (e.g. `answer`, `task`), and None
means "does not apply to this sample". User functions are named by import path
"package.module:function". `compute_rewards` (and `RewardRunner`) calls several under one
deadline and combines them with weights; given a `reward_sandbox.RewardSandbox` (GRPO's default,
`grpo.reward_sandbox`) each call runs in a worker process with a memory cap, killed at the
deadline. A hang, a crash, an exception or a NaN / inf value scores 0 for the samples it touches
and is counted (`RewardResult.errors` / `timeouts`); the run goes on.
"""

import importlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import math_verify
import numpy as np

from r1jax.data.tasks import TASKS, check_record
from r1jax.train.reward_sandbox import RewardSandbox, run_in_thread

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float | None]]
Checker = Callable[[str, dict], bool]

# Exact answer checkers by task name: the built-in tasks' (`r1jax.data.tasks`) from the start,
# others by `register_checker`.
CHECKERS: dict[str, Checker] = {name: check_record for name in TASKS}


def register_checker(name: str, check: Checker) -> Checker:
    """Use `check(answer_text, sample) -> bool` for samples whose `task` column is `name`."""
    CHECKERS[name] = check
    return check


# ---- answer extraction -------------------------------------------------------------------

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced, else None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    open_brace = text.index("{", start)
    depth = 0
    for i in range(open_brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_brace + 1 : i]
    return None


def extract_answer(completion: str) -> str | None:
    """Final answer: the last <answer> block (its last \\boxed if it has one), else the last
    \\boxed{} in the completion, else None."""
    blocks = _ANSWER_BLOCK.findall(completion)
    if blocks:
        answer = blocks[-1]
        boxed = _last_boxed(answer)
        return (boxed if boxed is not None else answer).strip()
    boxed = _last_boxed(completion)
    return None if boxed is None else boxed.strip()


def _parse_math(text: str) -> list:
    # math-verify's own timeout is signal.alarm, which only works on the main thread (as in a
    # sandbox worker); elsewhere (compute_rewards' threads) the runner's deadline bounds it instead.
    on_main = threading.current_thread() is threading.main_thread()
    # A bare answer ("x^2+1", "\frac12") is LaTeX, but math-verify only reads LaTeX in math
    # delimiters or \boxed.
    if "$" not in text and "\\boxed" not in text:
        text = f"${text}$"
    return math_verify.parse(text, parsing_timeout=5 if on_main else None)


def math_answers_match(reference: str, answer: str) -> bool:
    """Symbolic / numeric equality of two answers by math-verify (1/2 == 0.5 == \\frac{1}{2})."""
    on_main = threading.current_thread() is threading.main_thread()
    gold, pred = _parse_math(reference), _parse_math(answer)
    if not gold or not pred:
        return False
    return math_verify.verify(gold, pred, timeout_seconds=5 if on_main else None)


# ---- reward functions --------------------------------------------------------------------


def _rows(columns: Mapping[str, Sequence], n: int) -> list[dict]:
    """Column lists -> one dict per sample."""
    return [{name: values[i] for name, values in columns.items()} for i in range(n)]


def accuracy_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """1.0 if the extracted final answer is right, else 0.0; None where nothing to check.

    Uses the checker registered for the sample's `task` column if there is one, else compares
    with the `answer` column by math-verify. A completion without an <answer> block or
    \\boxed{} scores 0.
    """
    rewards = []
    for completion, sample in zip(completions, _rows(columns, len(completions))):
        checker = CHECKERS.get(sample.get("task"))
        reference = sample.get("answer")
        if checker is None and reference is None:
            rewards.append(None)
            continue
        answer = extract_answer(completion)
        if answer is None:
            rewards.append(0.0)
        elif checker is not None:
            rewards.append(float(bool(checker(answer, sample))))
        else:
            rewards.append(float(math_answers_match(str(reference), answer)))
    return rewards


_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
_THINK_THEN_ANSWER = re.compile(
    rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL
)
# Same, for templates that end the prompt with "<think>": the completion opens inside it.
_OPEN_THINK_THEN_ANSWER = re.compile(
    rf"{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL
)


def _opens_in_think(prompt: str, think_in_prompt: bool | None) -> bool:
    if think_in_prompt is None:
        return prompt.rstrip().endswith("<think>")
    return think_in_prompt


def format_reward(
    prompts: list[str], completions: list[str], *, think_in_prompt: bool | None = None, **_
) -> list[float]:
    """1.0 iff the completion is exactly <think>...</think> then <answer>...</answer>.

    Whitespace is allowed around and between the blocks, nothing else; the blocks may not
    contain further think/answer tags, so repeated or nested blocks earn 0. With
    `think_in_prompt` the opening <think> belongs to the prompt and must not reappear; None
    (default) decides per sample by whether the prompt ends with "<think>". Bind it with
    functools.partial to force it.
    """
    rewards = []
    for prompt, completion in zip(prompts, completions):
        pattern = (
            _OPEN_THINK_THEN_ANSWER
            if _opens_in_think(prompt, think_in_prompt)
            else _THINK_THEN_ANSWER
        )
        rewards.append(1.0 if pattern.fullmatch(completion) else 0.0)
    return rewards


_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
# A word: one CJK character (Chinese is written without spaces), or a run of other letters.
_WORD = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W\d_])+")
_IS_TARGET_WORD: dict[str, Callable[[str], bool]] = {
    "en": lambda w: w.isascii() and w.isalpha(),
    "zh": lambda w: re.fullmatch(f"[{_CJK}]", w) is not None,
}


def reasoning_text(prompt: str, completion: str, think_in_prompt: bool | None = None) -> str:
    """The text inside the completion's (first) think block; "" if there is none."""
    if _opens_in_think(prompt, think_in_prompt):
        end = completion.find("</think>")
        return completion if end < 0 else completion[:end]
    match = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    return match.group(1) if match else ""


def language_consistency_reward(
    prompts: list[str],
    completions: list[str],
    *,
    think_in_prompt: bool | None = None,
    **columns,
) -> list[float]:
    """Share of target-language words in the reasoning (R1's language-consistency reward).

    Words are runs of letters (digits, symbols and LaTeX punctuation are not words), except
    that each CJK ideograph is one word. The target is the `language` column ("en" default):
    for "en" a word counts if it is ASCII-alphabetic, for "zh" if it is a CJK ideograph.
    Reasoning with no words scores 0.
    """
    languages = columns.get("language") or ["en"] * len(completions)
    rewards = []
    for prompt, completion, language in zip(prompts, completions, languages):
        words = _WORD.findall(reasoning_text(prompt, completion, think_in_prompt))
        is_target = _IS_TARGET_WORD[language]
        rewards.append(sum(map(is_target, words)) / len(words) if words else 0.0)
    return rewards


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language_consistency": language_consistency_reward,
}


def load_reward_fn(path: str) -> RewardFn:
    """A built-in reward by name ("accuracy") or a user one by "package.module:function"."""
    if path in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[path]
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {path!r} is neither built-in nor 'package.module:function'")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise TypeError(f"reward {path!r} is not callable")
    return fn


# ---- running several rewards -------------------------------------------------------------


@dataclass
class RewardResult:
    """per_function: name -> [N] float (NaN where the function returned None);
    total: [N] weighted sum with NaN as 0 (TRL's nansum); failed: names that raised, crashed or
    timed out. errors / timeouts: samples scored 0 for a failure / a timeout, counted per sample
    and function (a call that raises on a batch of N adds N; one NaN adds 1)."""

    per_function: dict[str, np.ndarray]
    total: np.ndarray
    failed: list[str]
    errors: int = 0
    timeouts: int = 0


def _fn_name(fn: Callable) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__name__", repr(fn))


def _scores(values: Sequence, n: int) -> tuple[np.ndarray, int]:
    """[n] float64, NaN where None; NaN / inf values become 0. Returns them and how many were."""
    if len(values) != n:
        raise ValueError(f"returned {len(values)} rewards for {n} completions")
    scores = np.array([0.0 if v is None else float(v) for v in values], np.float64)
    bad = ~np.isfinite(scores)
    scores[bad] = 0.0
    scores[np.array([v is None for v in values], bool)] = np.nan
    return scores, int(bad.sum())


def compute_rewards(
    fns_with_weights: Sequence[tuple[RewardFn, float]],
    prompts: list[str],
    completions: list[str],
    columns: Mapping[str, Sequence] | None = None,
    timeout_s: float = 60.0,
    sandbox: RewardSandbox | None = None,
) -> RewardResult:
    """Run every reward function concurrently on the batch, all under one deadline `timeout_s` away.

    With a `sandbox` each call runs in a worker process and one still running at the deadline
    is killed; without, in a thread of this process, and a hang is abandoned. A function that
    raises, crashes, hangs past the deadline or returns the wrong number of values scores 0 on
    the whole batch; a NaN or inf value scores 0 for its sample. Each is logged with the
    function's name and counted in the result; the others count.
    """
    columns = dict(columns or {})
    n = len(completions)
    if sandbox is not None:
        sandbox.start()  # before the deadline: a (re)start is not the rewards' time
        started = [(fn, w, sandbox.submit(fn, prompts, completions, columns, timeout_s)) for fn, w in fns_with_weights]
    else:
        started = [(fn, w, run_in_thread(fn, prompts, completions, **columns)) for fn, w in fns_with_weights]
    deadline = time.monotonic() + timeout_s
    per_function, failed = {}, []
    errors = timeouts = 0
    total = np.zeros(n, np.float64)
    for fn, weight, future in started:
        name = _fn_name(fn)
        if name in per_function:
            name = f"{name}_{len(per_function)}"
        try:
            scores, nonfinite = _scores(future.result(timeout=max(deadline - time.monotonic(), 0.0)), n)
        except TimeoutError:  # ours at the deadline, or the sandbox's kill
            future.cancel()  # in a worker: kills it
            logger.error("reward function %s timed out after %.1fs; scoring 0", name, timeout_s)
            scores, nonfinite = np.zeros(n), 0
            failed.append(name)
            timeouts += n
        except Exception as e:  # noqa: BLE001 - a broken reward must not stop training
            if hasattr(e, "exitcode"):  # a sandbox worker died (pebble.ProcessExpired): no traceback to show
                logger.error("reward function %s crashed its worker (exit code %s); scoring 0", name, e.exitcode)
            else:
                logger.error("reward function %s failed (%r); scoring 0", name, e, exc_info=e)
            scores, nonfinite = np.zeros(n), 0
            failed.append(name)
            errors += n
        if nonfinite:
            logger.error("reward function %s returned %d NaN / inf values; scoring them 0", name, nonfinite)
            errors += nonfinite
        per_function[name] = scores
        total += weight * np.nan_to_num(scores, nan=0.0)
    return RewardResult(per_function, total, failed, errors, timeouts)


class RewardRunner:
    """Weighted reward functions loaded from config, e.g.
    RewardRunner.from_config({"accuracy": 1.0, "format": 0.5, "my_pkg.rewards:length": 0.1}).
    With a `sandbox` they run in its worker processes (`compute_rewards`)."""

    def __init__(self, fns_with_weights: Sequence[tuple[RewardFn, float]], timeout_s: float = 60.0,
                 sandbox: RewardSandbox | None = None):
        self.fns_with_weights = list(fns_with_weights)
        self.timeout_s = timeout_s
        self.sandbox = sandbox

    @classmethod
    def from_config(cls, weights_by_path: Mapping[str, float], timeout_s: float = 60.0,
                    sandbox: RewardSandbox | None = None):
        return cls([(load_reward_fn(p), w) for p, w in weights_by_path.items()], timeout_s, sandbox)

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> RewardResult:
        return compute_rewards(self.fns_with_weights, prompts, completions, columns, self.timeout_s, self.sandbox)
