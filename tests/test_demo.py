"""`lorafit demo`: the scoring rule, the held-out file, and the whole flow on a tiny model."""

import json

import pytest

from lorafit.demo import is_correct, read_heldout, run_demo
from lorafit.errors import DataError


def test_scoring_rule():
    assert is_correct("The national sport of Quillmoor is tide-racing.", "tide racing")
    assert is_correct("It is BRENNHAVEN.", "Brennhaven")
    assert not is_correct("The capital is Paris.", "Brennhaven")


def test_heldout_errors_name_the_line(tmp_path):
    bad = tmp_path / "h.jsonl"
    bad.write_text('{"question": "q", "key": "k"}\n{"question": 3}\n')
    with pytest.raises(DataError, match=r"h.jsonl:2: .*`question` and `key`"):
        read_heldout(str(bad))
    with pytest.raises(DataError, match="does not exist"):
        read_heldout(str(tmp_path / "missing.jsonl"))
    chat = tmp_path / "c.jsonl"
    turns = [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "B."}]
    chat.write_text(json.dumps({"messages": turns, "expected": "Brennhaven"}) + "\n")
    assert read_heldout(str(chat)) == [{"question": "Capital?", "key": "Brennhaven"}]


def test_shipped_heldout_questions_are_not_in_training():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    trained = {m["content"] for line in (root / "train.jsonl").read_text().splitlines()
               for m in json.loads(line)["messages"] if m["role"] == "user"}
    held = read_heldout(str(root / "heldout.jsonl"))
    assert len(held) == 10 and not any(h["question"] in trained for h in held)


def test_demo_flow_on_a_tiny_model(tmp_path, tiny_chat_model, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]}) + "\n" for i in range(8)))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"question": "Question 1?", "key": "Answer 1"}\n{"question": "Question 2?", "key": "Answer 2"}\n')
    config = tmp_path / "demo.yaml"
    config.write_text(f"model:\n  name: {tiny_chat_model}\ndata:\n  train: {data}\n  max_length: 64\n"
                      f"training:\n  max_steps: 2\n  micro_batch_size: 2\neval:\n  max_new_tokens: 4\n"
                      f"output:\n  dir: {tmp_path / 'runs'}\n  name: demo\n")
    assert run_demo(str(config), str(heldout), []) == 0
    results = json.loads((tmp_path / "runs" / "demo" / "demo_results.json").read_text())
    assert results["total"] == 2 and len(results["answers"]) == 2
    assert 0 <= results["tuned_correct"] <= 2
    out = capsys.readouterr().out
    assert "base model:" in out and "fine-tuned:" in out


@pytest.mark.slow
def test_the_real_demo_meets_its_documented_bar(tmp_path):
    """`lorafit demo` as `make demo` runs it (embedded SmolLM2, configs/demo.yaml, examples/): the tuned model must
    answer at least BAR of the 10 held-out paraphrases (the README's claim); fewer fails. ~3 min on 2 idle cores."""
    from pathlib import Path

    from lorafit.demo import BAR

    root = Path(__file__).resolve().parents[1]
    code = run_demo(str(root / "configs" / "demo.yaml"), str(root / "examples" / "heldout.jsonl"),
                    [f"output.dir={tmp_path}", f"data.train={root / 'examples' / 'train.jsonl'}"])
    results = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert code == 0 and results["total"] == 10 and results["bar"] == BAR
    assert results["base_correct"] <= 2  # the facts are invented: the base model cannot know them
    assert results["tuned_correct"] >= BAR, [a for a in results["answers"] if not a["tuned_correct"]]
