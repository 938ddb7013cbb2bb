"""Shared by the fuzz tests: hypothesis settings, a hard time limit per example, and strategies for hostile data."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

HARD_LIMIT_S = 15  # a hang fails the example instead of stalling CI (the deadline below only flags slowness)
# derandomize: CI sees the same examples every run; database=None: no .hypothesis/ folder in the repo.
FUZZ = settings(
    max_examples=30,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

FORM_KEYS = [
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
    "type",
    "text",
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
]
ROLE_WORDS = ["system", "user", "assistant", "human", "gpt", "User", " assistant ", "tool", "", "bot"]
# Byte fragments that break readers in practice: BOMs, every newline style, NUL, invalid and over-long UTF-8,
# a UTF-8-encoded surrogate, lone surrogate escapes, deep nesting, huge numbers, JSON's non-finite floats.
NASTY = [
    b"\xef\xbb\xbf",
    b"\r\n",
    b"\r",
    b"\n",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b'"\\ud800"',
    b'"\\udfff x"',
    b"[" * 3000,
    b'{"a":' * 1500,
    b"1" * 5000,
    b"NaN",
    b"-Infinity",
    b"1e999",
    b'"',
    b"\\",
    b",",
    b":",
    b"{",
    b"}",
    b"[",
    b"]",
    b"null",
    b"\t",
    b'"text"',
    b'"messages"',
    b"\x1b[31m",
    "\u2028".encode(),
]

text = (
    st.text(st.characters(codec="utf-8"), max_size=40)
    | st.sampled_from(ROLE_WORDS)
    | st.sampled_from(["\ud800", "a\udfffb", "\udc80", "<|im_end|>", "\x00", "\r\n\r", " "])
)
keys = st.sampled_from(FORM_KEYS) | st.text(max_size=8)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=25
)
turn = st.fixed_dictionaries(
    {},
    optional={
        "role": json_values | st.sampled_from(ROLE_WORDS),
        "content": json_values,
        "from": st.sampled_from(ROLE_WORDS),
        "value": json_values,
    },
)
# Rows shaped like the forms we read, with every field possibly missing, mistyped or strange.
rows = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=5)}),
    st.fixed_dictionaries({"conversations": st.lists(turn, max_size=5) | json_values}),
    st.fixed_dictionaries(
        {"instruction": json_values, "output": json_values}, optional={"input": json_values, "system": json_values}
    ),
    st.fixed_dictionaries({"prompt": json_values, "completion": json_values}),
    st.fixed_dictionaries({"text": json_values}),
    st.dictionaries(keys, json_values, max_size=6),
)


def lone_surrogate_free(value: str) -> bool:
    return not any("\ud800" <= ch <= "\udfff" for ch in value)


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float = HARD_LIMIT_S):
    """SIGALRM-based: interrupts pure-Python loops and most C calls that release back to the interpreter."""

    def _raise(signum, frame):
        raise Hang(f"no result after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
