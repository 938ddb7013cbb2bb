"""lorafit compare: base answers and loss come from the adapter switched off, tuned ones from it switched on."""

from __future__ import annotations

import io
import json

import pytest

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "What colour is the sky of Zorbania?"},
            {"role": "assistant", "content": "Green."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who rules Zorbania?"},
            {"role": "assistant", "content": "Queen Ilvy."},
        ]
    },
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmp") / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    return path


def _loss(model_dir_or_model, tokenizer, data_file, run_dir):
    """Mean loss per trained token computed independently: plain logits, cross-entropy on the training labels."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lorafit.config import DataSource
    from lorafit.data.prepare import prepare_data
    from lorafit.rundir import load_run_config

    cfg = load_run_config(run_dir)
    data_cfg = cfg.data.model_copy(update={"train": [DataSource(path=str(data_file))], "packing": False})
    rows = prepare_data(data_cfg, tokenizer, seed=0).train
    model = AutoModelForCausalLM.from_pretrained(model_dir_or_model, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(labels[1:])
        total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total / count


def test_compare_losses_are_the_base_and_the_merged_models(tiny_run_dir, tiny_chat_model, data_file, tmp_path):
    from rich.console import Console

    from lorafit.export.merge import merge_run
    from lorafit.inference.compare import compare
    from lorafit.models.tokenizer import load_tokenizer

    console = Console(file=io.StringIO(), width=200)
    result = compare(str(tiny_run_dir), str(data_file), limit=2, max_new_tokens=4, console=console)
    tokenizer = load_tokenizer(str(tiny_chat_model))
    merged = merge_run(tiny_run_dir, tmp_path / "merged", dtype="fp32")
    assert result["rows"] == 2 and result["trained_tokens"] > 4
    assert result["base_loss"] == pytest.approx(_loss(tiny_chat_model, tokenizer, data_file, tiny_run_dir), rel=1e-4)
    assert result["tuned_loss"] == pytest.approx(_loss(merged, tokenizer, data_file, tiny_run_dir), rel=1e-4)
    assert result["base_loss"] != pytest.approx(result["tuned_loss"], rel=1e-3)
    assert [a["question"] for a in result["answers"]] == ["What colour is the sky of Zorbania?", "Who rules Zorbania?"]
    assert [a["reference"] for a in result["answers"]] == ["Green.", "Queen Ilvy."]
    printed = console.file.getvalue()
    assert "base vs tuned" in printed and "Queen Ilvy." in printed and "validation loss on 2 rows" in printed


def test_compare_answers_differ_when_the_adapter_is_on(tiny_run_dir, data_file):
    from lorafit.inference.compare import compare

    result = compare(str(tiny_run_dir), str(data_file), limit=1, max_new_tokens=6, as_json=True)
    answer = result["answers"][0]
    assert answer["base"] != answer["tuned"]  # the random adapter changes the greedy answer of the random model


def test_compare_names_bad_rows(tiny_run_dir, tmp_path):
    from lorafit.errors import DataError
    from lorafit.inference.compare import compare

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        compare(str(tiny_run_dir), str(bad))
    with pytest.raises(DataError, match="does not exist"):
        compare(str(tiny_run_dir), str(tmp_path / "missing.jsonl"))
