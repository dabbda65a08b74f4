"""Reward functions for the sandbox tests, at module level so a worker can import them by path."""

import os
import signal
import time


def length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def sleeping(prompts, completions, **_):
    time.sleep(60)
    return [1.0] * len(completions)


def segfault(prompts, completions, **_):
    time.sleep(0.2)  # after the pool has seen the call start: a worker that dies idle breaks the pool instead
    os.kill(os.getpid(), signal.SIGSEGV)


def exiting(prompts, completions, **_):
    time.sleep(0.2)
    os._exit(1)


def memory_hungry(prompts, completions, **_):
    hoard = bytearray(4 << 30)
    return [float(len(hoard))] * len(completions)


def nan_first(prompts, completions, **_):
    return [float("nan"), float("inf"), *[1.0] * (len(completions) - 2)]


def raising(prompts, completions, **_):
    raise RuntimeError("boom")


def none_first(prompts, completions, **_):
    return [None, *[0.5] * (len(completions) - 1)]


def worker_pid(prompts, completions, **_):
    return [float(os.getpid())] * len(completions)
