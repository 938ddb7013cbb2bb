"""Tool calls at inference: read tools for prompts, parse a model's call, and score calls against references.

A model trained by lorafit writes a call in the format its chat template taught it: the Llama 3.1 JSON
`{"name": ..., "parameters": {...}}`, a built-in `<|python_tag|>name.call(key="value")`, or Hermes'
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. `parse_tool_call` reads all three into one
{"name", "arguments"} form; text that is none of them is a plain answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.data.formats import normalize_turns
from lorafit.data.tools import row_tools
from lorafit.errors import DataError

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
BUILTIN_CALL = re.compile(r"^(?:<\|python_tag\|>)?\s*([A-Za-z_]\w*)\.call\((.*)\)\s*$", re.S)
BUILTIN_ARG = re.compile(r'\s*([A-Za-z_]\w*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)', re.S)


def parse_tool_call(text: str) -> tuple[dict | None, str | None]:
    """(call, problem): a call {"name", "arguments"}; (None, None) for a plain answer; (None, why) for a call
    attempt that does not parse (broken JSON, no name, arguments not an object)."""
    text = text.strip()
    hermes = HERMES_CALL.search(text)
    if hermes:
        return _json_call(hermes.group(1))
    builtin = BUILTIN_CALL.match(text)
    if builtin:
        args, at = {}, 0
        body = builtin.group(2)
        for found in BUILTIN_ARG.finditer(body):
            if found.start() != at:
                break
            args[found.group(1)] = found.group(2).replace('\\"', '"')
            at = found.end()
        if at != len(body):
            return None, f"unreadable built-in call arguments: {body[:80]!r}"
        return {"name": builtin.group(1), "arguments": args}, None
    text = text.removeprefix("<|python_tag|>").strip()
    if text.startswith("{"):
        return _json_call(text)
    return None, None


def _json_call(text: str) -> tuple[dict | None, str | None]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        return None, f"not valid JSON ({getattr(err, 'msg', 'nested too deeply')})"
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None, "JSON without a `name`"
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as the OpenAI API does
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None, "arguments are a string that is not JSON"
    if not isinstance(arguments, dict):
        return None, f"arguments are a {type(arguments).__name__}, not an object"
    return {"name": value["name"], "arguments": arguments}, None


def reference_call(message: dict) -> dict | None:
    """The {"name", "arguments"} of a normalised assistant call turn, None for a text answer."""
    if "tool_calls" not in message:
        return None
    function = message["tool_calls"][0]["function"]
    return {"name": function["name"], "arguments": function["arguments"]}


def call_message(call: dict) -> dict:
    """An assistant turn that made `call`, in the normal form the templates render."""
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": dict(call)}]}


# -- tools for prompts -------------------------------------------------------------------------------------------------
def read_tools_file(path: str) -> dict:
    """--tools FILE: a JSON list of tool schemas, or {"tools": [...], "builtin_tools": [...]}."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"tools file {p} does not exist.", "Pass a JSON file holding a list of tool schemas.")
    return tools_from_text(p.read_text(encoding="utf-8"), str(p))


def tools_from_text(text: str, where: str) -> dict:
    """Tools as JSON text (a file's, or pasted in `lorafit ui`), checked as --tools checks a file; WHERE names it."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise DataError(
            f"{where}: broken JSON ({getattr(err, 'msg', err)}).", "Write the tools as one JSON list."
        ) from None
    row = value if isinstance(value, dict) and ("tools" in value or "builtin_tools" in value) else {"tools": value}
    spec, problems = row_tools(row)
    if problems or spec is None:
        reason = "; ".join(f"`{f}`: {r}" for f, r in problems) or "no tools in it"
        raise DataError(
            f"{where}: {reason}.",
            'Use [{"name": ..., "description": ..., "parameters": {...}}, ...] '
            '(or OpenAI\'s {"type": "function", "function": {...}} form).',
        )
    return spec


def prompt_tools(row: dict, loc: str) -> dict | None:
    """A prompt line's own `tools` / `builtin_tools`, checked like training rows."""
    spec, problems = row_tools(row)
    if problems:
        raise DataError(f"{loc}: " + "; ".join(f"`{f}`: {r}" for f, r in problems))
    return spec


def prompt_conversation(turns: list, loc: str) -> list[dict]:
    """A prompt's messages, tool calls and results included, normalised as training normalises them."""
    messages, problems = normalize_turns(turns)
    if problems:
        raise DataError(f"{loc}: " + "; ".join(f"`{f}`: {r}" for f, r in problems[:3]))
    if messages and messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]:
        messages = messages[:-1]  # a trailing answer is the reference, not part of the prompt
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise DataError(f"{loc}: the conversation must end with a `user` turn or a tool result (the one to answer).")
    return messages


# -- scoring -----------------------------------------------------------------------------------------------------------
@dataclass
class ToolScore:
    """Tool-call accuracy over rows that offer tools: each expected call, and each row that expects none."""

    expected: int = 0  # rows whose reference is a call
    valid: int = 0  # ... answered with a call that parses (valid JSON, a name, an arguments object)
    right_tool: int = 0  # ... calling the reference's tool
    exact: int = 0  # ... with exactly the reference's arguments
    no_call_expected: int = 0  # rows whose reference is a text answer
    no_call: int = 0  # ... answered without a call
    details: list[dict] = field(default_factory=list)

    def add(self, expected: dict | None, answer: str) -> dict:
        call, problem = parse_tool_call(answer)
        if expected is None:
            self.no_call_expected += 1
            self.no_call += call is None and problem is None
        else:
            self.expected += 1
            self.valid += call is not None
            self.right_tool += bool(call and call["name"] == expected["name"])
            self.exact += bool(call and call == expected)
        row = {
            "expected": expected,
            "call": call,
            "problem": problem,
            "right": (call == expected) if expected is not None else (call is None and problem is None),
        }
        self.details.append(row)
        return row

    def summary(self) -> dict[str, Any]:
        return {
            "expected_calls": self.expected,
            "valid_calls": self.valid,
            "right_tool": self.right_tool,
            "exact_calls": self.exact,
            "no_call_expected": self.no_call_expected,
            "no_call": self.no_call,
        }
