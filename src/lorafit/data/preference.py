"""Preference rows (a prompt, a better and a worse answer): detect the form a row uses, validate it, normalise it.

Three forms, as people have them:
- `prompt` / `chosen` / `rejected` (TRL's explicit-prompt form): strings (the prompt is one user turn), or
  conversations (the prompt a list of turns, each answer a list with one assistant turn);
- `conversations` + `chosen` + `rejected` (ShareGPT, as LLaMA-Factory's DPO data writes it): the conversation ends
  with the user's turn, and `chosen` / `rejected` are each one `{"from": "gpt", "value": ...}` turn (or a string);
- `chosen` / `rejected` alone (TRL's implicit-prompt form): two full conversations that share every turn but the
  last assistant answer; the shared turns are the prompt.
An optional `system` string becomes the system message. Every problem is (field, reason), as in formats.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lorafit.data.content import LONE_SURROGATE, SURROGATE_REASON
from lorafit.data.formats import Problem, check_order, normalize_turns

PREFERENCE_FORMS = {
    "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
    "sharegpt_preference": ("conversations", "chosen", "rejected"),
    "chosen_rejected": ("chosen", "rejected"),
}
USED = {name: set(keys) | {"system"} for name, keys in PREFERENCE_FORMS.items()}


@dataclass
class Pair:
    prompt: list[dict] | None = None  # the turns before the answers (ends with a user turn)
    chosen: str | None = None
    rejected: str | None = None
    unused: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def preference_form(row: dict) -> str | None:
    """The preference form of a row (None when it has no `chosen` and `rejected`)."""
    if not ("chosen" in row and "rejected" in row):
        return None
    if "conversations" in row:
        return "sharegpt_preference"
    if "prompt" in row:
        return "prompt_chosen_rejected"
    return "chosen_rejected"


def normalize_pair(row: dict, form: str) -> Pair:
    """The row as (prompt turns, chosen answer, rejected answer), or its problems."""
    unused = sorted(k for k in row if k not in USED[form])
    problems: list[Problem] = []
    if "tools" in row or "builtin_tools" in row:
        problems.append(("tools", "tool definitions are not supported in preference rows; remove them"))
    if form == "chosen_rejected":
        prompt, chosen, rejected, found = _implicit(row)
    else:
        key = "prompt" if form == "prompt_chosen_rejected" else "conversations"
        prompt, found = _prompt(row.get(key), key)
        chosen, more = _answer(row.get("chosen"), "chosen")
        found += more
        rejected, more = _answer(row.get("rejected"), "rejected")
        found += more
    problems += found
    system, more = _system(row)
    problems += more
    if not problems and prompt[0]["role"] == "system" and system:
        problems.append(("system", "the prompt already has a system turn; keep one of them"))
    if not problems and chosen == rejected:
        problems.append(("rejected", "the same answer as `chosen`: the pair prefers nothing"))
    if problems:
        return Pair(unused=unused, problems=problems)
    if system:
        prompt = [{"role": "system", "content": system}] + prompt
    return Pair(prompt, chosen, rejected, unused, [])


def _parse(value, key: str):
    """CSV/TSV cells hold lists as JSON strings."""
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value), []
        except (ValueError, RecursionError):
            return None, [(key, "looks like JSON but does not parse")]
    return value, []


def _text(value, key: str) -> tuple[str | None, list[Problem]]:
    if not isinstance(value, str):
        return None, [(key, f"expected a string, got {type(value).__name__}")]
    if not value.strip():
        return None, [(key, "empty content")]
    if LONE_SURROGATE.search(value):
        return None, [(key, SURROGATE_REASON)]
    return value, []


def _present(value, key: str) -> tuple[object, list[Problem]]:
    """The field's value parsed (a JSON string read as JSON), or why it cannot be used (missing, broken JSON)."""
    if value is None:
        return None, [(key, "missing")]
    return _parse(value, key)


def _prompt(value, key: str) -> tuple[list[dict] | None, list[Problem]]:
    value, problems = _present(value, key)
    if problems:
        return None, problems
    if isinstance(value, str):
        text, problems = _text(value, key)
        return ([{"role": "user", "content": text}] if text else None), problems
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else type(value).__name__
        return None, [(key, f"expected a string or a list of turns, got {what}")]
    turns, problems = _turns(value, key)
    if problems:
        return None, problems
    return turns, _prompt_order(turns, key)


def _turns(value: list, key: str) -> tuple[list[dict], list[Problem]]:
    turns, problems = normalize_turns(value)
    problems = [(f.replace("messages[", f"{key}[", 1), reason) for f, reason in problems]
    if not problems and any(m["role"] not in ("system", "user", "assistant") for m in turns):
        problems = [(key, "tool turns are not supported in preference rows")]
    return turns, problems


def _prompt_order(turns: list[dict], key: str) -> list[Problem]:
    """System first, then user/assistant alternating, ending with the user turn the answers reply to."""
    if turns[-1]["role"] != "user":
        return [
            (key, f"must end with the user turn that `chosen` and `rejected` answer (ends with {turns[-1]['role']})")
        ]
    found = check_order(turns + [{"role": "assistant", "content": "-"}])
    return [(f"{key}: {f}", reason) for f, reason in found]


def _answer(value, key: str) -> tuple[str | None, list[Problem]]:
    """One assistant answer: a string, a `{role/from, content/value}` turn, or a list holding exactly that turn."""
    value, problems = _present(value, key)
    if problems:
        return None, problems
    if isinstance(value, str):
        return _text(value, key)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or len(value) != 1:
        what = f"{len(value)} turns" if isinstance(value, list) else type(value).__name__
        return None, [(key, f"expected one assistant answer (a string or one assistant turn), got {what}")]
    turns, problems = _turns(value, key)
    if problems:
        return None, problems
    if turns[0]["role"] != "assistant":
        return None, [(key, f"the answer's role is {turns[0]['role']!r}; it must be the assistant's")]
    return _text(turns[0]["content"], key)


def _implicit(row: dict):
    """chosen / rejected as full conversations: the prompt is the turns they share, the answers their last turns."""
    sides, problems = {}, []
    for key in ("chosen", "rejected"):
        value, found = _parse(row.get(key), key)
        if not found and not (isinstance(value, list) and len(value) >= 2):
            found = [(key, "expected a full conversation (a list of turns ending with the answer), or add `prompt`")]
        if not found:
            turns, found = _turns(value, key)
            sides[key] = turns
        problems += found
    if problems:
        return None, None, None, problems
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen[:-1] != rejected[:-1]:
        shared = next(i for i, (a, b) in enumerate(zip(chosen + [None], rejected + [None])) if a != b)
        return None, None, None, [("rejected", f"differs from `chosen` at turn {shared}, before the last answer")]
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            problems.append((key, "must end with the assistant's answer"))
    problems += _prompt_order(chosen[:-1], "chosen") if not problems else []
    if problems:
        return None, None, None, problems
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], []


def _system(row: dict) -> tuple[str | None, list[Problem]]:
    value = row.get("system")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, []
    return _text(value, "system")
