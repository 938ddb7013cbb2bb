"""Every supported input type is read with the location of each row; unreadable rows are named, not skipped."""

from __future__ import annotations

import json

import pytest
from helpers import chat, write_jsonl

from lorafit.data.readers import expand_source, read_rows
from lorafit.errors import DataError

ROWS = [chat("q1", "a1"), chat("q2", "a2")]


def _read(path):
    return [item for f in expand_source(str(path)) for item in read_rows(f)]


def test_jsonl_lines_and_problems(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "broken"\n{"text": "bad \xff byte"}\n[1, 2]\n{"text": "last"}\n')
    items = _read(path)
    assert [(loc.rsplit(":", 1)[1], row is not None) for loc, row, _ in items] == [
        ("1", True),
        ("3", False),
        ("4", False),
        ("5", False),
        ("6", True),
    ]
    problems = [p for _, _, p in items if p]
    assert "broken JSON" in problems[0] and "invalid UTF-8" in problems[1] and "expected a JSON object" in problems[2]


def test_empty_file_is_a_problem(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    [(loc, row, problem)] = _read(path)
    assert row is None and "empty file" in problem and loc == str(path)


@pytest.mark.parametrize("payload", [ROWS, {"data": ROWS}, {"a": ROWS[0], "b": ROWS[1]}])
def test_json_array_or_object_of_rows(tmp_path, payload):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(payload))
    items = _read(path)
    assert [row for _, row, _ in items] == ROWS
    assert items[1][0] == f"{path}: row 2"


def test_json_object_of_columns_and_broken_json(tmp_path):
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"prompt": ["a", "b"], "completion": ["c", "d"]}))
    assert [row for _, row, _ in _read(path)] == [
        {"prompt": "a", "completion": "c"},
        {"prompt": "b", "completion": "d"},
    ]
    path.write_text('[\n {"text": "a"},\n {"text": }\n]')
    [(loc, row, problem)] = _read(path)
    assert loc == f"{path}:3" and "broken JSON" in problem


def test_csv_and_tsv_with_line_numbers(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b'prompt,completion\nq1,a1\n"multi\nline",a2\nq3,a3,extra\nq\xff,a4\n')
    items = _read(csv_path)
    assert [loc.rsplit(":", 1)[1] for loc, _, _ in items] == ["2", "3", "5", "6"]
    assert items[1][1] == {"prompt": "multi\nline", "completion": "a2"}
    assert "more field" in items[2][2] and "invalid UTF-8" in items[3][2]
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text("messages\n" + json.dumps(ROWS[0]["messages"]) + "\n")
    [(_, row, _)] = _read(tsv_path)
    assert json.loads(row["messages"]) == ROWS[0]["messages"]


def test_parquet_and_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert [row for _, row, _ in _read(tmp_path / "d.parquet")] == ROWS
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [row for _, row, _ in _read(tmp_path / "saved")] == ROWS
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    assert len(_read(tmp_path / "saved_dict")) == 2


def test_glob_and_folder(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    write_jsonl(tmp_path / "b.jsonl", ROWS[:1])
    assert expand_source(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert len(_read(tmp_path)) == 3


def test_missing_unsupported_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        expand_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no file matches"):
        expand_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported type"):
        expand_source(str(tmp_path / "d.txt"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    [hub] = expand_source("someone/some-dataset")
    with pytest.raises(DataError, match="offline"):
        list(read_rows(hub))
