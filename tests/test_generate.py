"""lorafit generate: prompt files, batched left-padded generation equal to one-by-one, stopping at end tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def loaded(tiny_run_dir):
    from lorafit.inference.generate import load_for_inference

    return load_for_inference(str(tiny_run_dir))


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_prompt_files_jsonl_messages_and_text(tmp_path):
    from lorafit.inference.generate import read_prompts

    jsonl = _write(
        tmp_path / "p.jsonl",
        [
            json.dumps({"prompt": "Hi"}),
            "",
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "S"},
                        {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "reference answer"},
                    ]
                }
            ),
            json.dumps({"question": "Held out?", "key": "fact"}),
        ],
    )  # examples/heldout.jsonl's form
    rows = read_prompts(str(jsonl))
    assert [r["prompt"] for r in rows] == ["Hi", "Q", "Held out?"]
    assert rows[1]["messages"][-1] == {"role": "user", "content": "Q"}  # the reference answer is not part of the prompt
    text = _write(tmp_path / "p.txt", ["first question", "", "second question"])
    assert [r["prompt"] for r in read_prompts(str(text))] == ["first question", "second question"]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{broken", "p.jsonl:2: broken JSON"),
        (
            json.dumps({"query": "x"}),
            "p.jsonl:2: expected a `prompt` (or `question`) string or a `messages` list, got ['query']",
        ),
        (
            json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
            "p.jsonl:2: the conversation must end with a `user` turn",
        ),
    ],
)
def test_bad_prompt_lines_name_file_and_line(tmp_path, line, expected):
    from lorafit.errors import DataError
    from lorafit.inference.generate import read_prompts

    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "ok"}), line])
    with pytest.raises(DataError) as err:
        read_prompts(str(path))
    assert expected in str(err.value)


def test_run_uses_the_end_of_turn_token_and_left_padding(loaded):
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert loaded.kind == "run" and loaded.template == "model"
    assert loaded.end_ids[0] == im_end
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token_id not in loaded.end_ids


def test_batched_generation_equals_one_by_one(loaded, tmp_path):
    """With right padding (or a wrong attention mask) the short prompts of a batch would get other answers."""
    from lorafit.inference.generate import generate

    prompts = _write(tmp_path / "p.txt", ["Hi", "Tell me a long story about a cat, a dog and a parrot please", "2+2?"])
    batched = generate(
        str(tmp_path), str(prompts), str(tmp_path / "b.jsonl"), max_new_tokens=8, batch_size=3, loaded=loaded
    )
    single = generate(
        str(tmp_path), str(prompts), str(tmp_path / "s.jsonl"), max_new_tokens=8, batch_size=1, loaded=loaded
    )
    rows = [json.loads(line) for line in batched.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hi", "Tell me a long story about a cat, a dog and a parrot please", "2+2?"]
    assert all(r["response"] for r in rows)
    assert batched.read_text() == single.read_text()


def test_generation_stops_at_the_end_token(loaded):
    """Make the third greedy token an end token: the answer must be exactly the two tokens before it."""
    import dataclasses

    from lorafit.inference.generate import generate_batch

    tok = loaded.tokenizer
    conversation = [[{"role": "user", "content": "Hi"}]]
    free = dataclasses.replace(loaded, end_ids=[])
    long_ids = tok(generate_batch(free, conversation, max_new_tokens=6)[0], add_special_tokens=False)["input_ids"]
    stopper = dataclasses.replace(loaded, end_ids=[long_ids[2]])
    short = generate_batch(stopper, conversation, max_new_tokens=6)[0]
    assert short == tok.decode(long_ids[:2], skip_special_tokens=True).strip()


def test_sampling_is_seeded(loaded, tmp_path):
    from lorafit.inference.generate import generate

    prompts = _write(tmp_path / "p.txt", ["Hi", "Hello there"])
    runs = [
        generate(
            str(tmp_path),
            str(prompts),
            str(tmp_path / f"{k}.jsonl"),
            max_new_tokens=6,
            do_sample=True,
            temperature=1.0,
            top_p=0.95,
            seed=7,
            loaded=loaded,
        ).read_text()
        for k in range(2)
    ]
    assert runs[0] == runs[1]


def test_merged_folder_answers_like_the_run(tiny_run_dir, loaded, tmp_path):
    from lorafit.export.merge import merge_run
    from lorafit.inference.generate import generate

    merged = merge_run(tiny_run_dir, tmp_path / "merged", dtype="fp32")
    prompts = _write(tmp_path / "p.txt", ["Hi", "What is LoRA?"])
    from_run = generate(str(tiny_run_dir), str(prompts), str(tmp_path / "r.jsonl"), max_new_tokens=6, loaded=loaded)
    from_merged = generate(str(merged), str(prompts), str(tmp_path / "m.jsonl"), max_new_tokens=6)
    assert from_run.read_text() == from_merged.read_text()


def test_cli_generate_and_its_errors(tiny_run_dir, tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "Hi"})])
    out = tmp_path / "o.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "lorafit.cli",
        "generate",
        str(tiny_run_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["prompt"] == "Hi"
    bad = subprocess.run(
        cmd[:5] + ["--prompts", str(tmp_path / "none.jsonl"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
