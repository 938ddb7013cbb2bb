"""What was trained is what llama.cpp serves: GGUF exports run in real llama.cpp (llama-cpp-python, part of the
test install), prompts rendered with the chat template inside the file, answers compared with transformers."""

from __future__ import annotations

import copy
from pathlib import Path

import llama_cpp  # noqa: F401  (a missing llama.cpp fails these tests: it is part of `make test`)
import numpy as np
import pytest
import servekit
from helpers import save_tiny_llama

from lorafit.export.llamacpp import LlamaCppModel
from lorafit.export.verify import TOLERANCE

OFFICIAL_TEMPLATE = Path(__file__).resolve().parents[2] / "shared" / "llama3" / "chat_template.jinja"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return servekit.served(tmp_path_factory)


def _conversations(served):
    return [row["messages"] for row in served.prompts]


def _llama_cpp_answers(gguf: Path, conversations, tokenizer=None):
    from lorafit.data.templates import encode_prompt

    model = LlamaCppModel(gguf, n_ctx=512)
    try:
        out = []
        for messages in conversations:
            ids = model.prompt_ids(messages)
            if tokenizer is not None:  # the prompt llama.cpp builds from the GGUF is token for token training's
                assert ids == encode_prompt(tokenizer, messages, "model")
            out.append(model.complete(ids, servekit.MAX_NEW_TOKENS))
        return out
    finally:
        model.close()


def test_f16_gguf_in_llama_cpp_answers_exactly_like_transformers(served, smollm2_tokenizer):
    answers = _llama_cpp_answers(served.f16, _conversations(served), smollm2_tokenizer)
    want = served.merged_answers
    assert all(w["stop"] == "stop" for w in want)  # the tuned model ends its turns (else the test proves little)
    assert [a.finish_reason for a in answers] == ["stop"] * len(want)  # llama.cpp stopped on <|im_end|> every time
    assert [a.text.strip() for a in answers] == [w["text"] for w in want]  # identical answers, all 10
    assert len({w["text"] for w in want}) == len(want)  # ten different answers, not one canned reply


def test_q8_0_gguf_agrees_on_the_stated_fraction(served):
    answers = _llama_cpp_answers(served.q8_0, _conversations(served))
    want = served.merged_answers
    identical = sum(a.text.strip() == w["text"] for a, w in zip(answers, want))
    assert identical >= TOLERANCE["q8_0"] * len(want), (identical, [a.text for a in answers])
    assert all(a.finish_reason == "stop" for a in answers)
    assert served.q8_0.stat().st_size < 0.6 * served.f16.stat().st_size


def test_a_q8_0_gguf_loads_without_amx_buffers_where_the_cpu_has_amx(tiny_run_dir, tmp_path, monkeypatch):
    """llama.cpp's AMX matmul crashes the process on q8_0 weights (`load_llama`'s doc; every q8_0 test here did on a
    Sapphire Rapids VM): where AMX is found, the model loads without extra buffers and answers, and
    llama-cpp-python's default is restored afterwards."""
    import llama_cpp.llama_cpp as low

    from lorafit.export import llamacpp
    from lorafit.export.gguf import export_gguf

    q8 = export_gguf(tiny_run_dir, tmp_path / "tiny-q8_0.gguf", outtype="q8_0")
    default = low.llama_model_default_params
    monkeypatch.setattr(llamacpp, "has_amx", lambda: True)
    model = LlamaCppModel(q8, n_ctx=128)
    try:
        assert model.llm.model_params.use_extra_bufts is False
        answer = model.complete(model.prompt_ids([{"role": "user", "content": "Hi"}]), max_tokens=4)
        assert answer.tokens + (answer.finish_reason == "stop") >= 1
    finally:
        model.close()
    assert low.llama_model_default_params is default and default().use_extra_bufts is True


def test_llama_cpp_pythons_own_chat_completion_uses_the_embedded_template(served):
    """A plain `Llama(...).create_chat_completion` (template and eos from the file) gives the same answers."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(served.f16), n_ctx=512, verbose=False)
    try:
        assert llm.chat_format == "chat_template.default"  # the GGUF's template, not a guessed built-in one
        for row, want in list(zip(served.prompts, served.merged_answers))[:2]:
            out = llm.create_chat_completion(row["messages"], temperature=0.0, max_tokens=servekit.MAX_NEW_TOKENS)
            choice = out["choices"][0]
            assert choice["finish_reason"] == "stop" and choice["message"]["content"].strip() == want["text"]
    finally:
        llm.close()


def _tiny_llama31(tmp_path, llama3_tokenizer, **rope) -> Path:
    """Random tiny Llama with the real 128k tokenizer, the official template and Llama 3.1 RoPE scaling whose
    original context is short, so the scaled frequencies change the logits at these short lengths."""

    tok = copy.deepcopy(llama3_tokenizer)
    tok.chat_template = OFFICIAL_TEMPLATE.read_text()
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return save_tiny_llama(tmp_path, tok, rope_theta=500000.0, rope_scaling=scaling | rope)


CHATS = [
    [{"role": "user", "content": "Hello world! 1234567 don't  spaces\ttab\n\n\nünïcödé 😀"}],
    [
        {"role": "system", "content": "  You answer in one line.  "},
        {"role": "user", "content": "What's up?"},
        {"role": "assistant", "content": "Not much."},
        {"role": "user", "content": "<|eot_id|> is text here"},
    ],
]


def test_llama3_gguf_in_llama_cpp_tokenizes_like_lorafit_and_applies_rope_scaling(tmp_path, llama3_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.data.templates import encode_prompt
    from lorafit.export.gguf import export_gguf

    folder = _tiny_llama31(tmp_path / "model", llama3_tokenizer)
    gguf = export_gguf(folder, tmp_path / "l3.gguf", "f16")
    model = LlamaCppModel(gguf, n_ctx=256, logits_all=True)
    try:
        assert model.llm.n_vocab() == 128256 and model.add_bos and model.eos_text == "<|eot_id|>"
        assert model.chat_template == OFFICIAL_TEMPLATE.read_text()
        for messages in CHATS:
            ids = model.prompt_ids(messages)
            assert ids == encode_prompt(llama3_tokenizer, messages, "llama3")  # lorafit's built-in format
            assert ids[0] == 128000 and ids.count(128000) == 1 and ids[-4:] == [128006, 78191, 128007, 271]
        ids = model.prompt_ids(CHATS[1])
        got = model.logits(ids)
    finally:
        model.close()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    unscaled = AutoModelForCausalLM.from_pretrained(
        _tiny_llama31(tmp_path / "plain", llama3_tokenizer, factor=1.0, low_freq_factor=1.0, high_freq_factor=1.0),
        dtype=torch.float32,
    ).eval()
    with torch.no_grad():
        plain = unscaled(torch.tensor([ids])).logits[0].numpy()
    error = np.abs(got - want).max()
    assert error < 2e-2 * np.abs(want).max()  # f16 weights: only rounding separates llama.cpp from transformers
    assert np.abs(plain - want).max() > 5 * error  # and the rope_freqs llama.cpp read really matter
