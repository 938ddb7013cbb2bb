"""Held-out answers: what a run learned, shown on its own validation data.

When a run has validation data, up to 10 of its conversations (prepare.heldout_examples) are answered by the
base model before training (adapter off) and by the tuned model after; `heldout.json` keeps both answers next to
the reference answer and, for rows that carry `expected`, whether each answer holds the key fact
(lorafit.keyfacts). The report and the summary show them.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.keyfacts import accuracy, is_correct
from lorafit.rundir import write_json

HELDOUT = "heldout.json"


def read_answers(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HELDOUT
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def write_before(run_dir: Path, examples: list[dict], before: list[str]) -> None:
    write_json(Path(run_dir) / HELDOUT, [_row(e, b, None) for e, b in zip(examples, before)])


def write_after(run_dir: Path, examples: list[dict], after: list[str]) -> list[dict]:
    """Add the tuned answers next to the stored base answers (kept across a resume)."""
    before = {json.dumps(r.get("messages")): r.get("before") for r in read_answers(run_dir)}
    rows = [_row(e, before.get(json.dumps(e["messages"])), a) for e, a in zip(examples, after)]
    write_json(Path(run_dir) / HELDOUT, rows)
    return rows


def _row(example: dict, before: str | None, after: str | None) -> dict:
    key = example.get("expected")
    return {
        "question": example["messages"][-1]["content"],
        "messages": example["messages"],
        "reference": example["reference"],
        "expected": key,
        "loc": example.get("loc"),
        "before": before,
        "after": after,
        "before_correct": is_correct(before, key) if key and before is not None else None,
        "after_correct": is_correct(after, key) if key and after is not None else None,
    }


def summary(rows: list[dict]) -> dict | None:
    """{answered, keyfacts: {base, tuned}} for summary.json; keyfacts None when no row has `expected`."""
    if not rows:
        return None
    keys = [r.get("expected") for r in rows]
    facts = None
    if any(keys) and all(r.get("after") is not None for r in rows):
        facts = {"tuned": accuracy([r["after"] for r in rows], keys)}
        if all(r.get("before") is not None for r in rows):
            facts["base"] = accuracy([r["before"] for r in rows], keys)
    return {"answered": len(rows), "keyfacts": facts}
