"""Tool-use conversations: read tool calls, tool results and tool definitions from every common spelling.

Normal form (what the templates render, the shape transformers' chat templates take):
  an assistant call   {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                       "function": {"name": str, "arguments": dict}}]}
  a tool result       {"role": "tool", "content": str | dict | list}
  the row's tools     {"tools": [JSON schema, ...] | None, "builtin_tools": [name, ...] | None}
Accepted spellings: OpenAI `tool_calls` (arguments as a JSON string or an object) and `tool` results with
`tool_call_id`; the legacy OpenAI `function_call` / `function` role; ShareGPT (glaive, LLaMA-Factory)
`function_call` / `observation` turns; Llama's own `ipython` role. `tools` is a list or a JSON string of one.

The Llama 3.1 format takes one call per assistant turn and renders no text next to a call, so parallel calls
and text beside a call are errors for their row (never a silent change): split them into turns.
"""

from __future__ import annotations

import json
from typing import Any

from lorafit.data.content import SURROGATE_REASON, has_surrogate, text_content

Problem = tuple[str, str]
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")  # Llama 3.1's built-in tools
RESULT_ROLES = {"tool", "ipython", "function", "observation"}  # every name of a tool's result turn
CALL_ROLES = {"function_call"}  # ShareGPT: an assistant turn that is a call
TURN_KEYS = {"role", "content", "from", "value", "tool_calls", "tool_call_id", "name", "function_call", "id"}
NO_TOOLS = (None, "", "[]", [], "null")


def is_tool_turn(role: str, turn: dict) -> bool:
    """Whether a turn is a call or a result (so the tool rules, not the plain ones, read it)."""
    return (
        role in RESULT_ROLES
        or role in CALL_ROLES
        or (role == "assistant" and bool(turn.get("tool_calls") or turn.get("function_call")))
    )


def tool_turn(turn: dict, role: str, content_key: str, where: str) -> tuple[dict | None, list[Problem]]:
    """The normal form of one call or result turn, or its problems."""
    if role in RESULT_ROLES:
        return _result(turn, content_key, where)
    if role in CALL_ROLES:  # ShareGPT: the value is the call as JSON (a list of one call is accepted)
        call, reason = _json_value(turn.get(content_key))
        if reason:
            return None, [
                (f"{where}.{content_key}", f'a function call must be JSON {{"name", "arguments"}} ({reason})')
            ]
        calls = call if isinstance(call, list) else [call]
        return _call_message(calls, f"{where}.{content_key}", "")
    key = "tool_calls" if turn.get("tool_calls") else "function_call"
    calls = turn[key] if key == "tool_calls" else [turn[key]]
    if not isinstance(calls, list):
        return None, [(f"{where}.{key}", f"expected a list of calls, got {type(calls).__name__}")]
    text, _ = text_content(turn.get(content_key), allow_empty=True)
    return _call_message(calls, f"{where}.{key}", text)


def _call_message(calls: list, where: str, text: str) -> tuple[dict | None, list[Problem]]:
    if len(calls) != 1:
        what = "no call" if not calls else f"{len(calls)} parallel calls"
        return None, [
            (
                where,
                f"{what} in one assistant turn; the Llama 3.1 format takes exactly one call per turn: "
                "put each call in its own assistant turn, followed by its result",
            )
        ]
    if text.strip():
        return None, [
            (
                where,
                "text next to a tool call; the Llama 3.1 format renders only the call, so the text "
                "would be lost: put it in an assistant turn of its own, or drop it",
            )
        ]
    name, arguments, call_id, problems = _one_call(calls[0], f"{where}[0]" if where.endswith("tool_calls") else where)
    if problems:
        return None, problems
    message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
    }
    if call_id is not None:
        message["_id"] = call_id  # checked against the result's tool_call_id, then removed (see check_ids)
    return message, []


def _one_call(call: Any, where: str) -> tuple[str, dict, Any, list[Problem]]:
    if not isinstance(call, dict):
        return "", {}, None, [(where, f"expected a call object, got {type(call).__name__}")]
    body = call.get("function") if isinstance(call.get("function"), dict) else call  # OpenAI nests it; others don't
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        return (
            "",
            {},
            None,
            [(f"{where}.name", "missing" if name is None else "expected a function name (a non-empty string)")],
        )
    key = "arguments" if "arguments" in body else "parameters"  # Llama writes `parameters`
    arguments, reason = _json_value(body.get(key), empty={})
    if reason or not isinstance(arguments, dict):
        got = reason or f"got {type(arguments).__name__}"
        return (
            "",
            {},
            None,
            [(f"{where}.{key}", f"the arguments must be a JSON object or a string holding one ({got})")],
        )
    if has_surrogate(arguments) or has_surrogate(name):
        return "", {}, None, [(f"{where}.{key}", SURROGATE_REASON)]
    return name.strip(), arguments, call.get("id"), []


def _json_value(value: Any, empty: Any = None) -> tuple[Any, str | None]:
    """A JSON value given as such, or as a string holding it (None / "" stand for `empty` when one is given)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return (empty, None) if empty is not None else (None, "missing")
    if not isinstance(value, str):
        return value, None
    try:
        return json.loads(value), None
    except (ValueError, RecursionError) as err:
        return None, f"broken JSON: {getattr(err, 'msg', None) or 'nested too deeply'}"


def _result(turn: dict, content_key: str, where: str) -> tuple[dict | None, list[Problem]]:
    value = turn.get(content_key)
    if isinstance(value, dict) or (
        isinstance(value, list) and not all(isinstance(p, dict) and "type" in p for p in value)
    ):
        if has_surrogate(value):
            return None, [(f"{where}.{content_key}", SURROGATE_REASON)]
        content: Any = value  # a JSON result: the official Llama template serialises it with tojson
    else:  # text, or a list of content parts
        content, reason = text_content(value, allow_empty=True)
        if reason:
            return None, [(f"{where}.{content_key}", reason)]
    message = {"role": "tool", "content": content}
    if turn.get("tool_call_id") is not None:
        message["_id"] = turn["tool_call_id"]
    if isinstance(turn.get("name"), str):
        message["_name"] = turn["name"]
    return message, []


# -- the row: its tools, and the order and consistency of calls and results --------------------------------------------
def row_tools(row: dict) -> tuple[dict | None, list[Problem]]:
    """The row's {"tools", "builtin_tools"}, None when it has neither (an empty list counts as none)."""
    tools, problems = _tool_list(row.get("tools"))
    builtin, more = _builtin_list(row.get("builtin_tools"))
    problems += more
    if problems or (tools is None and builtin is None):
        return None, problems
    return {"tools": tools, "builtin_tools": builtin}, []


def _tool_list(value: Any) -> tuple[list | None, list[Problem]]:
    if value in NO_TOOLS:
        return None, []
    tools, reason = _json_value(value)
    if reason:
        return None, [("tools", f"not a JSON list of tool definitions ({reason})")]
    if not isinstance(tools, list):
        return None, [("tools", f"expected a list of tool definitions, got {type(tools).__name__}")]
    for k, tool in enumerate(tools):
        if tool_name(tool) is None:
            return None, [
                (
                    f"tools[{k}]",
                    'expected a function schema with a `name` ({"name", "description", '
                    '"parameters"} or {"type": "function", "function": {...}})',
                )
            ]
        if has_surrogate(tool):
            return None, [(f"tools[{k}]", SURROGATE_REASON)]
    return tools or None, []


def _builtin_list(value: Any) -> tuple[list | None, list[Problem]]:
    if value in NO_TOOLS:
        return None, []
    names, reason = _json_value(value)
    if reason or not isinstance(names, list) or not all(n in BUILTIN_TOOLS for n in names):
        return None, [
            (
                "builtin_tools",
                f"expected a list of Llama 3.1 built-in tools ({', '.join(BUILTIN_TOOLS)}), got {value!r}"[:200],
            )
        ]
    return list(names) or None, []


def tool_name(tool: Any) -> str | None:
    """The name of a tool definition in OpenAI form ({"type": "function", "function": {...}}) or bare form."""
    if not isinstance(tool, dict):
        return None
    body = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = body.get("name")
    return name if isinstance(name, str) and name.strip() else None


def has_tool_turns(messages: list[dict]) -> bool:
    return any(m["role"] == "tool" or "tool_calls" in m for m in messages)


def check_tool_conversation(messages: list[dict], spec: dict | None) -> list[Problem]:
    """Order (system, user, then calls answered by results), ids and names; strips the private `_id`/`_name` keys."""
    problems = _check_order(messages) or _check_links(messages) or _check_calls(messages, spec)
    for m in messages:
        m.pop("_id", None)
        m.pop("_name", None)
    return problems


def _kind(m: dict) -> str:
    return "call" if "tool_calls" in m else m["role"]


def _check_order(messages: list[dict]) -> list[Problem]:
    """user -> answer or call; call -> result (or the end); result -> answer or call; answer -> user (or the end)."""
    allowed = {"user": {"assistant", "call"}, "call": {"tool"}, "tool": {"assistant", "call"}, "assistant": {"user"}}
    start = 1 if messages and messages[0]["role"] == "system" else 0
    previous = None
    for i, m in enumerate(messages[start:], start):
        kind = _kind(m)
        if kind == "system":
            return [(f"turn {i}", "roles out of order: a system message after the first turn")]
        ok = kind == "user" if previous is None else kind in allowed[previous]
        if not ok:
            expected = "a user turn" if previous is None else " or ".join(sorted(allowed[previous]))
            what = (
                "parallel tool results (one call per turn is supported)" if kind == previous == "tool" else f"{kind!r}"
            )
            return [
                (
                    f"turn {i}",
                    f"roles out of order: {what} where {expected} was expected "
                    "(system, user, then each tool call followed by its result)",
                )
            ]
        previous = kind
    if previous not in ("assistant", "call"):
        return [
            (
                f"turn {len(messages) - 1}",
                "roles out of order: the conversation must end with an assistant answer or call",
            )
        ]
    return []


def _check_links(messages: list[dict]) -> list[Problem]:
    """A result's tool_call_id / name, when given, must match the call it follows."""
    for i in range(1, len(messages)):
        m, call = messages[i], messages[i - 1]
        if m["role"] != "tool":
            continue
        function = call["tool_calls"][0]["function"]
        if "_id" in m and "_id" in call and m["_id"] != call["_id"]:
            return [(f"turn {i}.tool_call_id", f"{m['_id']!r} does not match the call before it ({call['_id']!r})")]
        if "_name" in m and m["_name"] != function["name"]:
            return [(f"turn {i}.name", f"{m['_name']!r} does not match the call before it ({function['name']!r})")]
    return []


def _check_calls(messages: list[dict], spec: dict | None) -> list[Problem]:
    """Every call names a tool the row defines; built-in calls take string arguments (the template quotes them)."""
    spec = spec or {}
    defined = [tool_name(t) for t in spec.get("tools") or []]
    builtin = spec.get("builtin_tools") or []
    for i, m in enumerate(messages):
        if "tool_calls" not in m:
            continue
        function = m["tool_calls"][0]["function"]
        if not defined and not builtin:
            return [
                (
                    f"turn {i}",
                    f"a call to {function['name']!r} but the row has no `tools`: the model would learn to "
                    "call a tool it was never shown; add the row's tool definitions as `tools`",
                )
            ]
        if function["name"] in builtin:
            if not all(isinstance(v, str) for v in function["arguments"].values()):
                return [
                    (
                        f"turn {i}",
                        f"built-in tool {function['name']!r} takes string arguments (Llama writes "
                        'name.call(key="value"))',
                    )
                ]
        elif function["name"] not in defined:
            return [
                (
                    f"turn {i}",
                    f"a call to {function['name']!r}, which is not among the row's tools "
                    f"({', '.join(defined + builtin)[:200]})",
                )
            ]
    return []
