"""Message content: plain strings, or lists of text parts, checked for text a tokenizer can take.

Shared by the row forms (formats) and the tool turns (tools), so both read content parts the same way.
"""

from __future__ import annotations

import re
from typing import Any

# JSON may escape half of a UTF-16 pair (`"\ud800"`): valid JSON, but no UTF-8 text; Arrow and tokenizers refuse it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_REASON = "invalid Unicode: a lone surrogate (an unpaired \\ud800-\\udfff escape)"


def text_content(value: Any, allow_empty: bool = False) -> tuple[str, str | None]:
    """(text, reason): a string, or a list of text parts joined as OpenAI does. Parts are strings,
    `{"type": "text", "text": ...}` (OpenAI) or `{"type": "text", "value": ...}` (LLaMA-Factory's newer files)."""
    if value is None:
        return "", "missing"
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            text, reason = _part_text(part, j)
            if reason:
                return "", reason
            parts.append(text)
        value = "".join(parts)
    if not isinstance(value, str):
        return "", f"expected a string or a list of text parts, got {type(value).__name__}"
    if not allow_empty and not value.strip():
        return "", "empty content"
    if LONE_SURROGATE.search(value):
        return "", SURROGATE_REASON
    return value, None


def _part_text(part: Any, j: int) -> tuple[str, str | None]:
    if isinstance(part, str):
        return part, None
    if not isinstance(part, dict):
        return "", f"part {j} is a {type(part).__name__}, not a text part; only text content can be trained"
    kind = part.get("type", "text")
    if kind != "text":
        return "", f"part {j} is not text (type {kind!r}); only text content can be trained"
    for key in ("text", "value"):
        if isinstance(part.get(key), str):
            return part[key], None
    return "", f"part {j} has type 'text' but no string `text` or `value` field"


def has_surrogate(value: Any) -> bool:
    """Whether any string inside a JSON value (tool arguments, schemas) holds a lone surrogate."""
    if isinstance(value, str):
        return LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    return False
