"""A source becomes an Arrow dataset of normalised rows; invalid rows are listed by file:line, field and reason."""

from __future__ import annotations

import json

import pytest
from helpers import chat, write_jsonl

from lorafit.config import DataSource
from lorafit.data.sources import raise_for_problems, read_source, valid_rows
from lorafit.errors import DataError


def test_every_problem_is_named(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            chat("q", "a"),
            '{"messages": [',
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}]},
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        ],
    )
    src = read_source(DataSource(path=str(path)))
    assert (src.format, src.rows, src.invalid, len(valid_rows([src]))) == ("messages", 6, 5, 1)
    text = "\n".join(src.problems)
    for needle in [
        f"{path}:2: (row): broken JSON",
        f"{path}:3: `messages[1].role`: unknown role 'bot'",
        f"{path}:4: `messages`: no assistant turn",
        f"{path}:5: `messages[0].content`: empty content",
        f"{path}:6: `messages`: missing",
        "in sharegpt form",
    ]:
        assert needle in text
    with pytest.raises(DataError) as err:
        raise_for_problems([src], "training")
    assert err.value.message.startswith("5 invalid row(s) in the training data") and "skip_invalid" in err.value.hint


def test_only_the_first_twenty_are_listed_with_the_total(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}] * 25)
    src = read_source(DataSource(path=str(path)))
    with pytest.raises(DataError) as err:
        raise_for_problems([src], "training")
    assert "25 invalid row(s)" in err.value.message and "the first 20 shown" in err.value.message
    assert err.value.message.count("empty content") == 20


def test_column_mapping_and_forced_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    src = read_source(DataSource(path=str(path), columns={"question": "prompt", "answer": "completion"}))
    assert src.format == "prompt_completion" and src.invalid == 0
    assert json.loads(valid_rows([src])[0]["messages"])[1] == {"role": "assistant", "content": "a"}
    unknown = read_source(DataSource(path=str(path)))
    assert unknown.invalid == 1 and "no known format" in unknown.problems[0] and "columns:" in unknown.problems[0]
    forced = read_source(DataSource(path=str(path), format="text"))
    assert "`text`: missing" in forced.problems[0]


def test_an_edited_file_is_read_again(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}])
    assert read_source(DataSource(path=str(path))).rows == 1
    write_jsonl(path, [{"text": "one"}, {"text": "two"}])
    assert read_source(DataSource(path=str(path))).rows == 2


def test_errors_raised_while_reading_are_shown_as_they_are(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        read_source(DataSource(path="someone/some-dataset", format="messages"))
