"""lorafit chat: the REPL commands, streaming equal to batch generation, context trimming, run / GGUF targets."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def loaded(tiny_run_dir):
    from lorafit.inference.generate import load_for_inference

    return load_for_inference(str(tiny_run_dir))


def _chat(loaded, text, **kw):
    from lorafit.inference.chat import chat

    out = io.StringIO()
    chat(
        "tiny",
        input_stream=io.StringIO(text),
        output=out,
        loaded=loaded,
        max_new_tokens=kw.pop("max_new_tokens", 6),
        **kw,
    )
    return out.getvalue()


def test_streamed_answer_is_the_greedy_answer(loaded):
    from lorafit.inference.generate import generate_batch

    transcript = _chat(loaded, "Hi\n/exit\n")
    answer = generate_batch(loaded, [[{"role": "user", "content": "Hi"}]], max_new_tokens=6)[0]
    assert answer and f">>> {answer}" in transcript.replace(">>> \n", ">>> ").replace(">>>  ", ">>> ")


def test_second_turn_sees_the_first_and_reset_forgets_it(loaded):
    """Asking the same question after a first exchange conditions on it; after /reset it is a fresh start."""
    fresh = _chat(loaded, "Why?\n").split(">>> ")[1].strip()
    transcript = _chat(loaded, "Hi\nWhy?\n/reset\nWhy?\n")
    turns = [t.strip() for t in transcript.split(">>> ")[1:]]
    second, after_reset = turns[1], turns[3]
    assert turns[2] == "(conversation cleared)"
    assert after_reset == fresh
    assert second != fresh  # with the first exchange in the prompt the answer differs (random tiny model)


def test_system_command_and_unknown_command(loaded):
    transcript = _chat(loaded, "/system You are terse.\n/bogus\n/system\n/exit\nnever read\n")
    assert "(system message set; conversation cleared)" in transcript
    assert "(system message removed; conversation cleared)" in transcript
    assert "(unknown command /bogus)" in transcript and "/reset" in transcript
    assert transcript.count(">>> ") == 4  # stops reading at /exit


def test_old_turns_are_dropped_to_fit_the_context(loaded):
    from lorafit.inference.chat import fit_history

    history = []
    for k in range(6):
        history += [
            {"role": "user", "content": f"question {k} " * 5},
            {"role": "assistant", "content": f"answer {k} " * 5},
        ]
    history.append({"role": "user", "content": "last question"})
    full_kept, full_ids = fit_history(loaded.tokenizer, history, None, loaded.template, 10_000)
    kept, ids = fit_history(loaded.tokenizer, history, None, loaded.template, len(full_ids) // 2)
    assert full_kept == history
    assert len(ids) <= len(full_ids) // 2
    assert kept[-1]["content"] == "last question" and kept == history[-len(kept) :] and kept[0]["role"] == "user"


def test_chat_cli_reads_stdin(tiny_run_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafit.cli",
            "chat",
            str(tiny_run_dir),
            "--max-new-tokens",
            "3",
            "--system",
            "Be brief.",
        ],
        input="Hello\n/reset\n/exit\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "(run, model format)" in result.stdout and "(system: Be brief.)" in result.stdout
    assert "(conversation cleared)" in result.stdout and "Traceback" not in result.stderr


def test_chat_on_a_gguf_export(tiny_gguf):
    from lorafit.inference.generate import load_for_inference

    gguf = load_for_inference(str(tiny_gguf))
    assert gguf.kind == "gguf" and gguf.template == "model"
    assert gguf.end_ids[0] == gguf.tokenizer.convert_tokens_to_ids("<|im_end|>")
    transcript = _chat(gguf, "Hi\n")
    assert "(gguf, model format)" in transcript and len(transcript.split(">>> ")[1].strip()) > 0
