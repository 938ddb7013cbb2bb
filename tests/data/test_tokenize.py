"""Labels come from token ids: the trained spans decode to exactly the assistant contents plus their end tokens."""

from __future__ import annotations

import json

import pytest
from helpers import MULTI_TURN, chat_template

from lorafit.data.encode import Encoder, fit_length, tokenize_rows
from lorafit.data.special_tokens import IGNORE_INDEX
from lorafit.data.templates import LLAMA31_CHAT_TEMPLATE
from lorafit.errors import DataError


def trained_spans(tokenizer, ids, labels) -> list[str]:
    spans, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i  # labels are aligned with input_ids; the loss shifts them
            current.append(i)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def encode(tokenizer, template, messages=MULTI_TURN, text=None, **kwargs):
    return Encoder(tokenizer, template, **kwargs).encode_batch([messages], [text])[0]


def test_llama31_trained_spans_are_the_answers(llama3_tokenizer):
    ids, labels = encode(llama3_tokenizer, "llama3")
    answers = [m["content"].strip() + "<|eot_id|>" for m in MULTI_TURN if m["role"] == "assistant"]
    assert trained_spans(llama3_tokenizer, ids, labels) == answers
    assert ids[0] == 128000 and ids.count(128000) == 1


def test_smollm2_template_trained_spans_are_the_answers(smollm2_tokenizer):
    ids, labels = encode(smollm2_tokenizer, "model")
    answers = [m["content"] + "<|im_end|>" for m in MULTI_TURN if m["role"] == "assistant"]
    assert trained_spans(smollm2_tokenizer, ids, labels) == answers
    assert smollm2_tokenizer.decode(ids) == smollm2_tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)


def test_train_on_last_assistant_and_all(llama3_tokenizer):
    ids, labels = encode(llama3_tokenizer, "llama3", train_on="last_assistant")
    assert trained_spans(llama3_tokenizer, ids, labels) == ["You're welcome.<|eot_id|>"]
    ids, labels = encode(llama3_tokenizer, "llama3", train_on="all")
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]


def test_template_with_bos_and_a_bos_adding_tokenizer_gives_one_bos(llama3_tokenizer):
    """The official Llama 3.1 template writes BOS and the tokenizer adds one too: BOS must still appear once."""
    expected = encode(llama3_tokenizer, "llama3")
    with chat_template(llama3_tokenizer, LLAMA31_CHAT_TEMPLATE) as tok:
        assert tok("x")["input_ids"][0] == 128000  # the tokenizer does add BOS on its own
        assert encode(tok, "model") == expected


def test_raw_text_is_bos_text_end_all_trained(llama3_tokenizer, smollm2_tokenizer):
    ids, labels = encode(llama3_tokenizer, "llama3", messages=[], text="Once upon a time")
    assert ids == [128000] + llama3_tokenizer("Once upon a time", add_special_tokens=False)["input_ids"] + [128001]
    assert labels == [IGNORE_INDEX] + ids[1:]
    ids, _ = encode(smollm2_tokenizer, "model", messages=[], text="Once")  # no BOS: SmolLM2 never uses one
    assert (
        ids[-1] == smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>") and ids[0] != smollm2_tokenizer.bos_token_id
    )


def test_system_prompt_is_added_when_missing(llama3_tokenizer):
    ids, _ = encode(llama3_tokenizer, "llama3", messages=MULTI_TURN[1:3], system_prompt="Be kind.")
    assert "Today Date: 26 Jul 2024\n\nBe kind.<|eot_id|>" in llama3_tokenizer.decode(ids)
    ids, _ = encode(llama3_tokenizer, "llama3", messages=MULTI_TURN[:3], system_prompt="Be kind.")
    assert "Be kind." not in llama3_tokenizer.decode(ids)


def test_length_policy():
    ids, labels = list(range(10)), [IGNORE_INDEX] * 6 + list(range(6, 10))
    assert fit_length(ids, labels, 10, "drop") == (ids, labels, "ok")
    assert fit_length(ids, labels, 8, "drop")[2] == "too_long"
    cut = fit_length(ids, labels, 8, "right")
    assert cut == (ids[:8], labels[:8], "truncated")
    assert fit_length(ids, labels, 6, "right")[2] == "no_trained"  # truncation keeps >= 1 trained token or drops
    assert fit_length(ids, [IGNORE_INDEX] * 10, 10, "drop")[2] == "no_trained"


def test_tokenize_rows_reports_status(llama3_tokenizer):
    encoder = Encoder(llama3_tokenizer, "llama3")
    batch = {"messages": [json.dumps(MULTI_TURN), json.dumps(MULTI_TURN[1:3])], "text": [None, None]}
    out = tokenize_rows(batch, encoder, max_length=60, truncation="drop")
    assert out["status"] == ["too_long", "ok"] and out["input_ids"][0] == []
    assert out["length"][0] > 60 and out["trained"][1] == 3  # "Paris." + "<|eot_id|>"


def test_a_template_that_is_not_prefix_stable_is_refused(smollm2_tokenizer):
    unstable = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}{{ messages | length }}"
    )
    with chat_template(smollm2_tokenizer, unstable) as tok, pytest.raises(DataError, match="prefixes"):
        encode(tok, "model", messages=MULTI_TURN[1:3])


def test_encoder_survives_pickling(smollm2_tokenizer):
    import pickle

    encoder = Encoder(smollm2_tokenizer, "model")
    assert encoder._jinja is not None  # the fast path is in use for SmolLM2's template
    clone = pickle.loads(pickle.dumps(encoder))
    assert clone._jinja is not None
    assert clone.encode_batch([MULTI_TURN], [None]) == encoder.encode_batch([MULTI_TURN], [None])


def test_fast_render_matches_a_template_that_reads_tools(llama3_tokenizer):
    """Templates such as the official Llama 3.1 one test `tools is not none`; the fast path must pass tools=None."""
    template = "{% if tools is not none %}TOOLS{% endif %}" + LLAMA31_CHAT_TEMPLATE
    with chat_template(llama3_tokenizer, template) as tok:
        encoder = Encoder(tok, "model")
        assert encoder._jinja is not None
        assert encoder.encode_batch([MULTI_TURN], [None])[0] == encode(llama3_tokenizer, "llama3")
