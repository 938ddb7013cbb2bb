"""`lorafit data check`: the report, its JSON form, and exit code 2 when the data cannot train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import chat, write_jsonl

from lorafit.data.check import data_check

SRC = Path(__file__).resolve().parents[2] / "src"


def good_file(tmp_path):
    return write_jsonl(
        tmp_path / "d.jsonl",
        [chat(f"Question {i}?", f"Answer {i}.") for i in range(12)] + [chat("Question 0?", "Answer 0.")],
    )


def test_report_for_a_good_file(tmp_path, smollm2_tokenizer, capsys):
    path = good_file(tmp_path)
    assert data_check(str(path), None, None, as_json=False) == 0
    out = capsys.readouterr().out
    for needle in [
        "rows",
        "messages",
        "token length: p50",
        "exact duplicates 1",
        "trained tokens",
        "packing: 13 samples",
        "example",
        "[[Answer 0.<|im_end|>]]",
        "ok: the data can train",
    ]:
        assert needle in out, needle


def test_json_report(tmp_path, smollm2_tokenizer, capsys):
    path = good_file(tmp_path)
    assert data_check(str(path), "smollm2-135m-instruct", 64, as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["max_length"] == 64 and report["rows_read"] == 13 and report["duplicates"] == 1
    assert sum(b["count"] for b in report["histogram"]) == 13
    trained = "".join(s["text"] for s in report["example"]["spans"] if s["trained"])
    assert trained == "Answer 0.<|im_end|>"
    assert {"p50", "p95", "max"} <= set(report["length"]) and "efficiency" in report["packing"]


def test_invalid_rows_exit_2_and_are_listed(tmp_path, smollm2_tokenizer, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), {"messages": [{"role": "user", "content": "q"}]}])
    assert data_check(str(path), None, None, as_json=True) == 2
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["invalid"] == 1
    assert report["invalid_examples"] == [f"{path}:2: `messages`: no assistant turn: nothing to train on"]


def test_config_target_uses_its_data_section(tmp_path, smollm2_tokenizer, capsys):
    path = good_file(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  name: smollm2-135m-instruct\ndata:\n  train: {path.name}\n  packing: false\n  max_length: 100\n"
    )
    assert data_check(str(config), None, None, as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_length"] == 100 and "packing" not in report and report["sources"][0]["path"] == str(path)


def test_cli_missing_file_is_exit_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lorafit.cli", "data", "check", str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_special_token_text_in_content_is_reported(tmp_path, smollm2_tokenizer, capsys):
    """A literal `<|im_end|>` inside an answer is read as the end-of-turn token: the check names the row."""
    rows = [
        chat("Is 2 < 3?", "Yes, 2 < 3."),
        chat("Show a chat tag", "It looks like <|im_end|> in text."),
        chat("q", "a"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert data_check(str(path), None, None, as_json=True) == 0  # a warning, not a refusal
    report = json.loads(capsys.readouterr().out)
    assert report["special_token_text"] == {"rows": 1, "first": f"{path}:2: <|im_end|>"}
    assert any("special-token text" in w and f"{path}:2" in w for w in report["warnings"])
    assert data_check(str(path), None, None, as_json=False) == 0
    assert "1 row(s) hold special-token text" in capsys.readouterr().out


def test_clean_data_has_no_special_token_warning(tmp_path, smollm2_tokenizer, capsys):
    assert data_check(str(good_file(tmp_path)), None, None, as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["special_token_text"] == {"rows": 0} and not any("special" in w for w in report["warnings"])
