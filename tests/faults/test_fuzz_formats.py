"""Row validation never raises on any JSON shape: a row is either a well-formed conversation / text, or a
list of (field, reason) problems. Then what validation accepts, the tokenizer encodes with a trained token."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit.data.formats import (
    FORMATS,
    ROLES,
    check_order,
    detect_format,
    normalize_row,
)

from .fuzzkit import FUZZ, json_values, lone_surrogate_free, rows, time_limit

MANY = settings(FUZZ, max_examples=300)  # pure Python, ~1 ms an example


def assert_normalized(row: dict, fmt: str):
    messages, text, problems = normalize_row(row, fmt)
    assert isinstance(problems, list) and all(isinstance(f, str) and isinstance(r, str) and r for f, r in problems)
    if problems:
        assert messages is None and text is None
        return None
    assert (messages is None) != (text is None)
    if text is not None:
        assert isinstance(text, str) and text.strip() and lone_surrogate_free(text)
        return text
    assert check_order(messages) == [] and messages[-1]["role"] == "assistant"
    for m in messages:
        assert set(m) == {"role", "content"} and m["role"] in ROLES
        assert isinstance(m["content"], str) and m["content"].strip() and lone_surrogate_free(m["content"])
    json.dumps(messages, ensure_ascii=False).encode("utf-8")  # what the Arrow cache stores must be valid UTF-8
    return messages


@MANY
@given(row=rows, fmt=st.sampled_from(FORMATS))
def test_any_row_in_any_format_is_valid_or_has_problems(row, fmt):
    with time_limit():
        assert_normalized(row, fmt)
        assert detect_format(row) in (None, *FORMATS)


@MANY
@given(
    turns=json_values | st.lists(json_values, max_size=4),
    deep=st.integers(0, 5000),
    key=st.sampled_from(["messages", "conversations"]),
)
def test_turns_as_json_strings(turns, deep, key):
    """CSV and TSV cells carry conversations as JSON text: broken, deeply nested or huge-number JSON is a problem."""
    for cell in (json.dumps(turns), "[" * deep, "[" * deep + "]" * deep, "1" * deep, json.dumps(turns)[: deep % 50]):
        with time_limit():
            assert_normalized({key: cell}, "messages" if key == "messages" else "sharegpt")


# Valid conversations of strange text: control characters, NUL, the template's own special tokens as plain text.
odd_text = (
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60)
    | st.sampled_from(
        ["<|im_end|>", "<|im_start|>assistant\n", "<|eot_id|>", "\x00\x01\x1b", "\u202e\u2028", "{{ raise }}"]
    )
).filter(str.strip)
conversations = st.lists(st.tuples(odd_text, odd_text), min_size=1, max_size=3).map(
    lambda pairs: {
        "messages": [{"role": r, "content": c} for pair in pairs for r, c in zip(("user", "assistant"), pair)]
    }
)


@FUZZ
@given(row=conversations | st.fixed_dictionaries({"text": odd_text}) | rows, fmt=st.sampled_from(["auto", *FORMATS]))
def test_accepted_rows_tokenize_with_a_trained_token(smollm2_tokenizer, row, fmt):
    """Strange but valid text (NUL, control characters, special-token look-alikes) still renders and tokenizes."""
    from lorafit.data.encode import Encoder
    from lorafit.data.special_tokens import IGNORE_INDEX

    normalized = assert_normalized(row, detect_format(row) or "text" if fmt == "auto" else fmt)
    if normalized is None:
        return
    encoder = Encoder(smollm2_tokenizer, "model")
    messages, text = (normalized, None) if isinstance(normalized, list) else (None, normalized)
    with time_limit():
        [(ids, labels)] = encoder.encode_batch([messages], [text])
    assert len(ids) == len(labels) and any(label != IGNORE_INDEX for label in labels)
