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
    trained = {
        m["content"]
        for line in (root / "train.jsonl").read_text().splitlines()
        for m in json.loads(line)["messages"]
        if m["role"] == "user"
    }
    held = read_heldout(str(root / "heldout.jsonl"))
    assert len(held) == 10 and not any(h["question"] in trained for h in held)


def test_demo_flow_on_a_tiny_model(tmp_path, tiny_chat_model, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Question {i}?"},
                        {"role": "assistant", "content": f"Answer {i}."},
                    ]
                }
            )
            + "\n"
            for i in range(8)
        )
    )
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        '{"question": "Question 1?", "key": "Answer 1"}\n{"question": "Question 2?", "key": "Answer 2"}\n'
    )
    config = tmp_path / "demo.yaml"
    config.write_text(
        f"model:\n  name: {tiny_chat_model}\ndata:\n  train: {data}\n  max_length: 64\n"
        f"training:\n  max_steps: 2\n  micro_batch_size: 2\neval:\n  max_new_tokens: 4\n"
        f"output:\n  dir: {tmp_path / 'runs'}\n  name: demo\n"
    )
    assert run_demo(str(config), str(heldout), []) == 0
    results = json.loads((tmp_path / "runs" / "demo" / "demo_results.json").read_text())
    assert results["total"] == 2 and len(results["answers"]) == 2
    assert 0 <= results["tuned_correct"] <= 2
    out = capsys.readouterr().out
    assert "base model:" in out and "fine-tuned:" in out


@pytest.mark.slow
def test_the_real_demo_meets_its_documented_bar(tmp_path_factory):
    """`lorafit demo` as `make demo` runs it (embedded SmolLM2, configs/demo.yaml, examples/): the tuned model must
    answer at least BAR of the 10 held-out paraphrases (the README's claim); fewer fails. The run is the one the
    llama.cpp and verify tests serve (tests/servekit.py), trained once per session."""
    import servekit

    from lorafit.demo import BAR

    results = servekit.served(tmp_path_factory).demo
    assert results["total"] == 10 and results["bar"] == BAR
    assert results["base_correct"] <= 2  # the facts are invented: the base model cannot know them
    assert results["tuned_correct"] >= BAR, [a for a in results["answers"] if not a["tuned_correct"]]


def _tool_demo_config(tmp_path, model: str, **training) -> str:
    import yaml
    from helpers import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "demo_tools.yaml").read_text())
    cfg["model"]["name"] = model
    cfg["data"]["train"] = str(ROOT / "examples" / "tools" / "train.jsonl")
    cfg["training"].update(training)
    cfg["output"].update(dir=str(tmp_path / "runs"))
    path = tmp_path / "demo_tools.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_shipped_tool_data_is_what_the_script_writes_and_heldout_is_unseen(tmp_path):
    import runpy

    from helpers import ROOT

    names = ("tools.json", "train.jsonl", "heldout.jsonl")
    shipped = {name: (ROOT / "examples" / "tools" / name).read_text() for name in names}
    script = runpy.run_path(str(ROOT / "examples" / "make_tool_data.py"))
    script["main"].__globals__["OUT"] = tmp_path
    script["main"]()
    assert {name: (tmp_path / name).read_text() for name in shipped} == shipped
    requests = lambda text: {json.loads(line)["messages"][0]["content"] for line in text.splitlines()}  # noqa: E731
    heldout, train = requests(shipped["heldout.jsonl"]), requests(shipped["train.jsonl"])
    assert len(heldout) == 10 and not heldout & train


def test_tool_demo_flow_on_a_tiny_model(tmp_path, tiny_chat_model, capsys):
    from helpers import ROOT

    from lorafit.demo_tools import run_tool_demo

    config = _tool_demo_config(tmp_path, str(tiny_chat_model), max_steps=1)
    assert run_tool_demo(config, str(ROOT / "examples" / "tools" / "heldout.jsonl"), ["eval.max_new_tokens=4"]) == 0
    results = json.loads((tmp_path / "runs" / "demo_tools" / "demo_results.json").read_text())
    assert results["base"]["expected_calls"] == results["tuned"]["expected_calls"] == 10
    first = {"name": "ferry_times", "arguments": {"island": "Pellmoor", "day": "Friday"}}
    assert results["answers"][0]["expected"] == first
    assert "exact calls" in capsys.readouterr().out


@pytest.mark.slow
def test_tool_demo_meets_its_bar(tmp_path):
    """The README's claim: the base SmolLM2 makes (almost) no right call to the invented tools; after `lorafit demo
    --tools` training (a few CPU minutes) at least 9 of the 10 held-out calls are exactly right."""
    from helpers import ROOT

    from lorafit.demo_tools import run_tool_demo

    config = _tool_demo_config(tmp_path, "smollm2-135m-instruct")
    assert run_tool_demo(config, str(ROOT / "examples" / "tools" / "heldout.jsonl"), []) == 0
    results = json.loads((tmp_path / "runs" / "demo_tools" / "demo_results.json").read_text())
    assert results["base"]["exact_calls"] <= 1
    assert results["tuned"]["exact_calls"] >= 9, results["answers"]
