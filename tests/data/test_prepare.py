"""prepare_data end to end: columns, stats, validation split, mixing, length policy, packing, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import chat, write_jsonl

from lorafit.config import DataSection
from lorafit.data.prepare import prepare_data
from lorafit.data.special_tokens import IGNORE_INDEX
from lorafit.errors import DataError


def rows(n: int, prefix: str = "q") -> list[dict]:
    return [chat(f"{prefix} question number {i}?", f"answer {i} " + "word " * (i % 7)) for i in range(n)]


def cfg(paths, **kw) -> DataSection:
    return DataSection(train=paths, **kw)


def test_unpacked_columns_stats_and_masks(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", rows(20))
    p = prepare_data(cfg([str(path)], packing=False, max_length=128), smollm2_tokenizer, seed=0)
    assert p.template == "model" and p.validation is None
    assert p.train.column_names == ["input_ids", "labels"] and len(p.train) == 20
    json.dumps(p.stats)  # saved with the run
    s = p.stats
    assert (s["rows_read"], s["invalid"], s["train_samples"], s["sources"][0]["format"]) == (20, 0, 20, "messages")
    assert 0 < s["trained_fraction"] < 1 and s["length"]["p50"] <= s["length"]["p95"] <= s["length"]["max"]
    for r in p.train:
        assert r["labels"][0] == IGNORE_INDEX and all(
            lab in (IGNORE_INDEX, i) for i, lab in zip(r["input_ids"], r["labels"])
        )


def test_packed_rows_hold_the_same_samples(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", rows(30))
    plain = prepare_data(cfg([str(path)], packing=False, max_length=128), smollm2_tokenizer, seed=0)
    packed = prepare_data(cfg([str(path)], packing=True, max_length=128), smollm2_tokenizer, seed=0)
    assert packed.train.column_names == ["input_ids", "labels", "position_ids", "seq_lengths"]
    assert len(packed.train) < len(plain.train) == 30
    samples = []
    for r in packed.train:
        assert len(r["input_ids"]) == sum(r["seq_lengths"]) <= 128
        start = 0
        for n in r["seq_lengths"]:
            assert r["position_ids"][start : start + n] == list(range(n))
            samples.append((tuple(r["input_ids"][start : start + n]), tuple(r["labels"][start : start + n])))
            start += n
    assert sorted(samples) == sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in plain.train)
    pk = packed.stats["packing"]
    assert pk["rows"] == len(packed.train) and 0.5 < pk["efficiency"] <= 1


def test_invalid_rows_stop_or_are_skipped(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", rows(5) + ["{oops", {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError) as err:
        prepare_data(cfg([str(path)]), smollm2_tokenizer, seed=0)
    assert (
        f"{path}:6: (row): broken JSON" in err.value.message
        and f"{path}:7: `messages`: no assistant turn" in err.value.message
    )
    p = prepare_data(cfg([str(path)], skip_invalid=True), smollm2_tokenizer, seed=0)
    assert (p.stats["invalid"], p.stats["train_samples"]) == (2, 5)


def test_validation_fraction_and_file(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", rows(40))
    p = prepare_data(cfg([str(path)], val_fraction=0.25, packing=False), smollm2_tokenizer, seed=3)
    assert (len(p.train), len(p.validation)) == (30, 10)
    train_set = {tuple(r["input_ids"]) for r in p.train}
    assert not train_set & {tuple(r["input_ids"]) for r in p.validation}
    again = prepare_data(cfg([str(path)], val_fraction=0.25, packing=False), smollm2_tokenizer, seed=3)
    assert again.validation["input_ids"] == p.validation["input_ids"]  # seeded
    val = write_jsonl(tmp_path / "val.jsonl", rows(3, "v"))
    p = prepare_data(DataSection(train=[str(path)], validation=[str(val)], packing=False), smollm2_tokenizer, seed=0)
    assert (len(p.train), len(p.validation), p.stats["validation_samples"]) == (40, 3, 3)


def test_mixing_weights_and_formats(tmp_path, smollm2_tokenizer):
    import datasets

    a = write_jsonl(tmp_path / "a.jsonl", rows(10))
    (tmp_path / "b.csv").write_text("instruction,input,output\n" + "".join(f"Say {i},,{i}\n" for i in range(8)))
    datasets.Dataset.from_list([{"text": f"raw text {i}"} for i in range(4)]).to_parquet(str(tmp_path / "c.parquet"))
    sources = [
        {"path": str(a), "weight": 2.0},
        {"path": str(tmp_path / "b.csv"), "weight": 0.5},
        str(tmp_path / "c.parquet"),
    ]
    p = prepare_data(cfg(sources, packing=False), smollm2_tokenizer, seed=0)
    assert [s["format"] for s in p.stats["sources"]] == ["messages", "alpaca", "text"]
    assert len(p.train) == 2 * 10 + 4 + 4


def test_length_policy_counts_and_errors(tmp_path, smollm2_tokenizer):
    long_answer = chat("short question", "long " * 200)
    path = write_jsonl(tmp_path / "d.jsonl", rows(4) + [long_answer])
    p = prepare_data(cfg([str(path)], max_length=64, packing=False), smollm2_tokenizer, seed=0)
    assert (p.stats["dropped_too_long"], p.stats["train_samples"]) == (1, 4)
    p = prepare_data(cfg([str(path)], max_length=64, truncation="right", packing=False), smollm2_tokenizer, seed=0)
    assert (p.stats["truncated"], p.stats["train_samples"]) == (1, 5)
    assert max(len(x) for x in p.train["input_ids"]) == 64
    only_long = write_jsonl(tmp_path / "long.jsonl", [long_answer])
    with pytest.raises(DataError, match="no training sample is left: 1 longer than max_length 64"):
        prepare_data(cfg([str(only_long)], max_length=64), smollm2_tokenizer, seed=0)


def test_text_rows_train_everything_with_the_llama3_tokenizer(tmp_path, llama3_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The cat sat."}, {"text": "A dog ran."}])
    p = prepare_data(cfg([str(path)], packing=False), llama3_tokenizer, seed=0)
    assert p.template == "llama3"
    for r in p.train:
        assert r["input_ids"][0] == 128000 and r["input_ids"][-1] == 128001
        assert r["labels"][1:] == r["input_ids"][1:]
    assert np.isclose(p.stats["trained_fraction"], (p.stats["total_tokens"] - 2) / p.stats["total_tokens"], atol=1e-4)


def test_empty_config_and_all_invalid(tmp_path, smollm2_tokenizer):
    with pytest.raises(DataError, match="no training data"):
        prepare_data(DataSection(), smollm2_tokenizer, seed=0)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="every row is invalid") as err:
        prepare_data(cfg([str(path)], skip_invalid=True), smollm2_tokenizer, seed=0)
    assert f"{path}:1: `text`: empty content" in err.value.message


def test_num_proc_gives_the_same_tokens(tmp_path, smollm2_tokenizer):
    """Workers get a pickled encoder (the compiled template is rebuilt there) and must produce identical rows."""
    path = write_jsonl(tmp_path / "d.jsonl", rows(1000))
    one = prepare_data(cfg([str(path)], packing=False, num_proc=1), smollm2_tokenizer, seed=0)
    two = prepare_data(cfg([str(path)], packing=False, num_proc=2), smollm2_tokenizer, seed=0)
    assert two.train["input_ids"] == one.train["input_ids"] and two.train["labels"] == one.train["labels"]


def test_worker_count(monkeypatch):
    """auto: one process per usable core (at most 8), only for datasets big enough to repay the start-up."""
    from lorafit.data.prepare import worker_count

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert worker_count("auto", 19_999) is None
    assert worker_count("auto", 1_000_000) == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert worker_count("auto", 1_000_000) == 2
    assert worker_count(1, 1_000_000) is None
    assert worker_count(4, 1_000) == 2  # every worker gets a full batch of rows
    assert worker_count(4, 100) is None
    with pytest.raises(ValueError):
        DataSection(num_proc=0)
    with pytest.raises(ValueError):
        DataSection(num_proc="many")
    assert DataSection().num_proc == "auto" and DataSection(num_proc=3).num_proc == 3
