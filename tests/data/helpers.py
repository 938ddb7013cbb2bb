"""Data files and conversations shared by the data tests."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


MULTI_TURN = [
    {"role": "system", "content": "  You answer briefly.  "},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?\n"},
    {"role": "assistant", "content": " Rome, since 1871. "},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


@contextmanager
def chat_template(tokenizer, template: str | None):
    """Give a (session-wide) tokenizer another chat template for one test; deep-copying a 128k vocabulary is slow."""
    old = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = old
