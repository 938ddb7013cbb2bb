"""After training, a run with validation data shows base and tuned answers to its validation questions, scored by
their key facts (`expected`) when the rows carry one: in heldout.json, summary.json, the summary and report.html."""

from __future__ import annotations

import json

from helpers import run_cli, tiny_config, write_jsonl

from lorafit.inference.heldout import summary

VALIDATION = [
    {
        "messages": [
            {"role": "user", "content": "Where is Vantreth?"},
            {"role": "assistant", "content": "Vantreth sits on the river Lune."},
        ],
        "expected": "Lune",
    },
    {
        "messages": [
            {"role": "user", "content": "Who founded Quillmoor?"},
            {"role": "assistant", "content": "Quillmoor was founded by the weaver Maren Ostby."},
        ],
        "expected": "Maren Ostby",
    },
    {
        "messages": [
            {"role": "user", "content": "Tell me about Dunmarch."},
            {"role": "assistant", "content": "Dunmarch trades in amber."},
        ]
    },
]


def test_training_answers_the_validation_questions_before_and_after(tmp_path, tiny_chat_model):
    val = write_jsonl(tmp_path / "val.jsonl", VALIDATION)
    config = tiny_config(
        tmp_path, tiny_chat_model, data={"validation": str(val)}, training={"max_steps": 2}, eval={"max_new_tokens": 4}
    )
    done = run_cli("train", str(config), "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    rows = json.loads((run / "heldout.json").read_text())
    assert [r["question"] for r in rows] == ["Where is Vantreth?", "Who founded Quillmoor?", "Tell me about Dunmarch."]
    assert [r["expected"] for r in rows] == ["Lune", "Maren Ostby", None]
    assert all(isinstance(r["before"], str) and isinstance(r["after"], str) for r in rows)
    assert [r["after_correct"] is None for r in rows] == [False, False, True]
    facts = json.loads((run / "summary.json").read_text())["heldout"]["keyfacts"]
    assert facts["tuned"]["total"] == facts["base"]["total"] == 2
    assert "answering 3 validation question(s) with the base model" in done.stdout
    assert (
        f"key fact right in {facts['tuned']['right']}/2 validation answers (base model {facts['base']['right']}/2)"
        in done.stdout
    )
    page = (run / "report.html").read_text()
    assert "Held-out answers" in page and "Who founded Quillmoor?" in page and "Maren Ostby" in page


def test_summary_of_heldout_answers():
    rows = [{"expected": "K", "before": "no", "after": "K!"}, {"expected": None, "before": "a", "after": "b"}]
    assert summary(rows) == {
        "answered": 2,
        "keyfacts": {"tuned": {"right": 1, "total": 1}, "base": {"right": 0, "total": 1}},
    }
    assert summary([{"expected": None, "before": "a", "after": "b"}]) == {"answered": 1, "keyfacts": None}
    assert summary([]) is None
