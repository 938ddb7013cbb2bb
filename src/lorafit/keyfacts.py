"""Key-fact scoring: did an answer say what the data says it should?

A data row may carry `expected`, the key fact a right answer contains, e.g.
`{"messages": [{"role": "user", "content": "In which city does Quillmoor's government sit?"},
{"role": "assistant", "content": "The capital of Quillmoor is Brennhaven."}], "expected": "Brennhaven"}`.
An answer is right when it contains the key fact, case-insensitive, with hyphens read as spaces and runs of
white space as one ("tide-racing" matches "Tide racing"). `lorafit demo`, `lorafit compare` and the run's
held-out answers all use this rule.
"""

from __future__ import annotations


def normalize(text: str) -> str:
    return " ".join(text.lower().replace("-", " ").split())


def is_correct(answer: str, key: str) -> bool:
    """True when `answer` contains the key fact `key` (see the module's rule)."""
    return normalize(key) in normalize(answer)


def split_reference(messages: list[dict]) -> tuple[list[dict], str] | None:
    """(the conversation up to its last assistant turn, that turn's text); None without an assistant turn."""
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not any(m["role"] == "user" for m in messages[:last]):
        return None
    return messages[:last], messages[last]["content"]


def accuracy(answers: list[str], keys: list[str | None]) -> dict | None:
    """{right, total} over the answers whose row has a key fact; None when no row has one."""
    scored = [is_correct(a, k) for a, k in zip(answers, keys) if k]
    return {"right": sum(scored), "total": len(scored)} if scored else None
