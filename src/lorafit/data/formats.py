"""Row forms: detect which one a source uses, validate each row, and normalise it to messages or text.

Every form becomes either a conversation (`messages`: list of {role, content}, roles system/user/assistant)
or raw `text`. Validation returns every problem of a row as (field, reason) so the report can name them.
"""

from __future__ import annotations

import json
import re
from typing import Any

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
# Keys that identify a form, most specific first.
SIGNATURES = [("messages", ("messages",)), ("sharegpt", ("conversations",)), ("alpaca", ("instruction", "output")),
              ("prompt_completion", ("prompt", "completion")), ("text", ("text",))]

Problem = tuple[str, str]  # (field, reason)
# JSON may escape half of a UTF-16 pair (`"\ud800"`): valid JSON, but no UTF-8 text; Arrow and tokenizers refuse it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_REASON = "invalid Unicode: a lone surrogate (an unpaired \\ud800-\\udfff escape)"


def detect_format(row: dict) -> str | None:
    """The form whose identifying keys the row has; a `messages` list in ShareGPT shape counts as sharegpt."""
    for name, keys in SIGNATURES:
        if all(k in row for k in keys):
            if name == "messages" and _looks_sharegpt(row["messages"]):
                return "sharegpt"
            return name
    return None


def _looks_sharegpt(turns: Any) -> bool:
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0] and "role" not in turns[0]


def normalize_row(row: dict, fmt: str) -> tuple[list[dict] | None, str | None, list[Problem]]:
    """(messages, text, problems): exactly one of messages/text is set when problems is empty."""
    if fmt == "text":
        text, problems = _string(row, "text")
        return None, text, problems
    if fmt == "messages":
        messages, problems = _turns(row, "messages", "role", "content", None)
    elif fmt == "sharegpt":
        key = "conversations" if "conversations" in row else "messages"
        messages, problems = _turns(row, key, "from", "value", SHAREGPT_ROLES)
    elif fmt == "alpaca":
        messages, problems = _alpaca(row)
    elif fmt == "prompt_completion":
        prompt, p1 = _string(row, "prompt")
        completion, p2 = _string(row, "completion")
        problems = p1 + p2
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        raise ValueError(f"unknown format {fmt}")
    if not problems:
        problems = check_order(messages)
    return (None if problems else messages), None, problems


def _string(row: dict, field: str, required: bool = True) -> tuple[str | None, list[Problem]]:
    if field not in row or row[field] is None:
        return None, [(field, "missing")] if required else []
    value = row[field]
    if not isinstance(value, str):
        return None, [(field, f"expected a string, got {type(value).__name__}")]
    if required and not value.strip():
        return None, [(field, "empty content")]
    if LONE_SURROGATE.search(value):
        return None, [(field, SURROGATE_REASON)]
    return value, []


def _alpaca(row: dict) -> tuple[list[dict], list[Problem]]:
    instruction, problems = _string(row, "instruction")
    extra, p = _string(row, "input", required=False)
    problems += p
    output, p = _string(row, "output")
    problems += p
    system, p = _string(row, "system", required=False)
    problems += p
    user = instruction if not (extra and extra.strip()) else f"{instruction}\n\n{extra}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if system and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages, problems


def _turns(row: dict, key: str, role_key: str, content_key: str, role_map: dict | None) -> tuple[list[dict], list[Problem]]:
    turns = row.get(key)
    if isinstance(turns, str):  # CSV/TSV cells hold the conversation as a JSON string
        try:
            turns = json.loads(turns)
        except (ValueError, RecursionError) as err:  # also nesting too deep, integers over 4300 digits
            reason = getattr(err, "msg", None) or ("nested too deeply" if isinstance(err, RecursionError) else str(err).split(":")[0])
            return [], [(key, f"not a JSON list of turns ({reason})")]
    if turns is None:
        return [], [(key, "missing")]
    if not isinstance(turns, list):
        return [], [(key, f"expected a list of turns, got {type(turns).__name__}")]
    if not turns:
        return [], [(key, "empty conversation")]
    messages, problems = [], []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.append((where, f"expected an object with `{role_key}` and `{content_key}`, got {type(turn).__name__}"))
            continue
        role = turn.get(role_key)
        if role is None and role_map is None and "from" in turn:  # a ShareGPT turn inside `messages`
            role, content_key_here = turn.get("from"), "value"
        else:
            content_key_here = content_key
        if not isinstance(role, str):
            problems.append((f"{where}.{role_key}", "missing" if role is None else f"expected a string, got {type(role).__name__}"))
            continue
        mapped = (role_map or {r: r for r in ROLES}).get(role.strip().lower())
        if mapped is None:
            allowed = ", ".join(sorted(set(role_map))) if role_map else ", ".join(ROLES)
            problems.append((f"{where}.{role_key}", f"unknown role {role!r} (expected one of {allowed})"))
            continue
        content, reason = _content(turn.get(content_key_here))
        if reason:
            problems.append((f"{where}.{content_key_here}", reason))
            continue
        messages.append({"role": mapped, "content": content})
    return messages, problems


def _content(value: Any) -> tuple[str, str | None]:
    """A string, or a list of text parts ({type: text, text: ...}) joined as OpenAI does."""
    if value is None:
        return "", "missing"
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                return "", f"part {j} is not text (type {kind!r}); only text content can be trained"
        value = "".join(parts)
    if not isinstance(value, str):
        return "", f"expected a string or a list of text parts, got {type(value).__name__}"
    if not value.strip():
        return "", "empty content"
    if LONE_SURROGATE.search(value):
        return "", SURROGATE_REASON
    return value, None


def check_order(messages: list[dict]) -> list[Problem]:
    """Optional system first, then user/assistant alternating from user, ending with an assistant answer."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        index = i + (len(messages) - len(body))
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            what = "a system message after the first turn" if m["role"] == "system" else f"{m['role']!r} where {expected!r} was expected"
            return [(f"turn {index}", f"roles out of order: {what} (system first, then user/assistant alternating)")]
    if not any(m["role"] == "assistant" for m in body):
        return [("messages", "no assistant turn: nothing to train on")]
    if body[-1]["role"] != "assistant":
        return [(f"turn {len(messages) - 1}", "roles out of order: the conversation ends with a user turn that has no answer")]
    return []
