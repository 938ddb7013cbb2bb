"""Row forms: detect which one a source uses, validate each row, and normalise it to messages or text.

Every form becomes either a conversation (`messages`: list of {role, content}, roles system/user/assistant,
plus tool calls and results in the normal form of `tools.py`) or raw `text`. Validation returns every problem
of a row as (field, reason) so the report can name them, and the row's keys it did not use, so none is
dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lorafit.data.content import LONE_SURROGATE, SURROGATE_REASON, text_content
from lorafit.data.tools import TURN_KEYS, check_tool_conversation, has_tool_turns, is_tool_turn, row_tools, tool_turn

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "function_call": "function_call",
    "observation": "observation",
    "tool": "tool",
    "ipython": "ipython",
}
MESSAGE_ROLES = {r: r for r in ROLES} | {"tool": "tool", "ipython": "ipython", "function": "function"}
# Row keys each form reads; any other key is reported as unused. `tools`/`builtin_tools` only serve conversations.
USED_KEYS = {
    "messages": {"messages", "tools", "builtin_tools"},
    "sharegpt": {"conversations", "messages", "tools", "builtin_tools"},
    "alpaca": {"instruction", "input", "output", "system"},
    "prompt_completion": {"prompt", "completion"},
    "text": {"text"},
}
# Keys that identify a form, most specific first.
SIGNATURES = [
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
]

Problem = tuple[str, str]  # (field, reason)


@dataclass
class Normalized:
    messages: list[dict] | None = None
    text: str | None = None
    tools: dict | None = None  # {"tools": [...] | None, "builtin_tools": [...] | None} of a tool-use row
    unused: list[str] = field(default_factory=list)  # row keys (and `messages[].KEY` turn keys) not used
    problems: list[Problem] = field(default_factory=list)


def detect_format(row: dict) -> str | None:
    """The form whose identifying keys the row has; a `messages` list in ShareGPT shape counts as sharegpt."""
    for name, keys in SIGNATURES:
        if all(k in row for k in keys):
            if name == "messages" and _looks_sharegpt(row["messages"]):
                return "sharegpt"
            return name
    return None


def _looks_sharegpt(turns: Any) -> bool:
    return (
        isinstance(turns, list)
        and bool(turns)
        and isinstance(turns[0], dict)
        and "from" in turns[0]
        and "role" not in turns[0]
    )


def normalize_row(row: dict, fmt: str) -> tuple[list[dict] | None, str | None, list[Problem]]:
    """(messages, text, problems): exactly one of messages/text is set when problems is empty."""
    n = normalize(row, fmt)
    return n.messages, n.text, n.problems


def normalize(row: dict, fmt: str) -> Normalized:
    """The row in normal form, with its tools, its unused keys and its problems (messages/text None if any)."""
    tools, turn_keys = None, set()
    if fmt == "text":
        text, problems = _string(row, "text")
        return Normalized(None, text, None, _unused(row, fmt, turn_keys, ""), problems)
    if fmt in ("messages", "sharegpt"):
        key = "conversations" if fmt == "sharegpt" and "conversations" in row else "messages"
        role_key, content_key, roles = (
            ("role", "content", None) if fmt == "messages" else ("from", "value", SHAREGPT_ROLES)
        )
        messages, problems, turn_keys = _turns(row, key, role_key, content_key, roles)
        tools, more = row_tools(row)
        problems += more
        if not problems and has_tool_turns(messages):
            problems = check_tool_conversation(messages, tools)
    elif fmt == "alpaca":
        messages, problems = _alpaca(row)
    elif fmt == "prompt_completion":
        prompt, p1 = _string(row, "prompt")
        completion, p2 = _string(row, "completion")
        problems = p1 + p2
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        raise ValueError(f"unknown format {fmt}")
    if fmt not in ("messages", "sharegpt") and row_tools(row) != (None, []):  # tools this form cannot render
        problems = problems + [
            (
                "tools",
                f"the {fmt} form has no tool turns, so its `tools` would be dropped; "
                "write tool-use rows as `messages` or `conversations`",
            )
        ]
    if not problems and not has_tool_turns(messages):
        problems = check_order(messages)
    key = "conversations" if fmt == "sharegpt" and "conversations" in row else "messages"
    if problems:
        return Normalized(problems=problems, unused=_unused(row, fmt, turn_keys, key))
    return Normalized(messages, None, tools, _unused(row, fmt, turn_keys, key), [])


def normalize_turns(turns: list) -> tuple[list[dict], list[Problem]]:
    """A prompt's turns (`messages` spelling, tool calls and results included) in normal form; the order is the
    caller's to check (a prompt ends where the model answers)."""
    messages, problems, _ = _turns({"messages": turns}, "messages", "role", "content", None)
    for m in messages:
        m.pop("_id", None)
        m.pop("_name", None)
    return messages, problems


def _unused(row: dict, fmt: str, turn_keys: set, key: str) -> list[str]:
    used = USED_KEYS[fmt] | ({"tools", "builtin_tools"} if fmt not in ("messages", "sharegpt") else set())
    return sorted(k for k in row if k not in used) + sorted(f"{key}[].{k}" for k in turn_keys)


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


def _turns(
    row: dict, key: str, role_key: str, content_key: str, role_map: dict | None
) -> tuple[list[dict], list[Problem], set]:
    """(messages, problems, turn keys not used)."""
    turns = row.get(key)
    if isinstance(turns, str):  # CSV/TSV cells hold the conversation as a JSON string
        try:
            turns = json.loads(turns)
        except (ValueError, RecursionError) as err:  # also nesting too deep, integers over 4300 digits
            reason = getattr(err, "msg", None) or (
                "nested too deeply" if isinstance(err, RecursionError) else str(err).split(":")[0]
            )
            return [], [(key, f"not a JSON list of turns ({reason})")], set()
    if turns is None:
        return [], [(key, "missing")], set()
    if not isinstance(turns, list):
        return [], [(key, f"expected a list of turns, got {type(turns).__name__}")], set()
    if not turns:
        return [], [(key, "empty conversation")], set()
    messages, problems, unused = [], [], set()
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.append(
                (where, f"expected an object with `{role_key}` and `{content_key}`, got {type(turn).__name__}")
            )
            continue
        unused |= {k for k in turn if k not in TURN_KEYS}
        message, found = _turn(turn, where, role_key, content_key, role_map)
        problems += found
        if message is not None:
            messages.append(message)
    return messages, problems, unused


def _turn(
    turn: dict, where: str, role_key: str, content_key: str, role_map: dict | None
) -> tuple[dict | None, list[Problem]]:
    role = turn.get(role_key)
    if role is None and role_map is None and "from" in turn:  # a ShareGPT turn inside `messages`
        role, content_key, role_map = turn.get("from"), "value", SHAREGPT_ROLES
    if not isinstance(role, str):
        reason = "missing" if role is None else f"expected a string, got {type(role).__name__}"
        return None, [(f"{where}.{role_key}", reason)]
    mapped = (role_map or MESSAGE_ROLES).get(role.strip().lower())
    if mapped is None:
        allowed = ", ".join(sorted(set(role_map or MESSAGE_ROLES)))
        return None, [(f"{where}.{role_key}", f"unknown role {role!r} (expected one of {allowed})")]
    if is_tool_turn(mapped, turn):
        return tool_turn(turn, mapped, content_key, where)
    content, reason = text_content(turn.get(content_key))
    if reason:
        return None, [(f"{where}.{content_key}", reason)]
    return {"role": mapped, "content": content}, []


def check_order(messages: list[dict]) -> list[Problem]:
    """Optional system first, then user/assistant alternating from user, ending with an assistant answer."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        index = i + (len(messages) - len(body))
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            what = (
                "a system message after the first turn"
                if m["role"] == "system"
                else f"{m['role']!r} where {expected!r} was expected"
            )
            return [(f"turn {index}", f"roles out of order: {what} (system first, then user/assistant alternating)")]
    if not any(m["role"] == "assistant" for m in body):
        return [("messages", "no assistant turn: nothing to train on")]
    if body[-1]["role"] != "assistant":
        return [
            (
                f"turn {len(messages) - 1}",
                "roles out of order: the conversation ends with a user turn that has no answer",
            )
        ]
    return []
