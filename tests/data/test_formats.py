"""Each row form is detected, normalised to messages/text, and every kind of bad row is named."""

from __future__ import annotations

import pytest

from lorafit.data.formats import detect_format, normalize_row


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
        ({"messages": [{"from": "human", "value": "a"}]}, "sharegpt"),
        ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"text": "a"}, "text"),
        ({"question": "a", "answer": "b"}, None),
    ],
)
def test_detect(row, fmt):
    assert detect_format(row) == fmt


def test_every_form_normalises_to_the_same_conversation():
    expected = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    rows = {
        "messages": {"messages": expected},
        "sharegpt": {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ]
        },
        "alpaca": {"system": "S", "instruction": "Q", "input": "", "output": "A"},
    }
    for fmt, row in rows.items():
        messages, text, problems = normalize_row(row, fmt)
        assert (messages, text, problems) == (expected, None, []), fmt
    messages, _, _ = normalize_row({"prompt": "Q", "completion": "A"}, "prompt_completion")
    assert messages == expected[1:]
    assert normalize_row({"text": "hello"}, "text") == (None, "hello", [])


def test_alpaca_input_is_appended_and_content_parts_are_joined():
    messages, _, _ = normalize_row({"instruction": "Translate", "input": "chat", "output": "cat"}, "alpaca")
    assert messages[0]["content"] == "Translate\n\nchat"
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
            {"role": "assistant", "content": "Hi"},
        ]
    }
    messages, _, problems = normalize_row(parts, "messages")
    assert problems == [] and messages[0]["content"] == "Hello"


@pytest.mark.parametrize(
    "row, fmt, field, reason",
    [
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            "messages",
            "messages[1].role",
            "unknown role",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
            "messages",
            "messages[1].content",
            "empty content",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
            "messages",
            "messages[1].content",
            "expected a string",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
            "messages",
            "messages[1].content",
            "missing",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages",
            "messages[0].content",
            "not text",
        ),
        ({"messages": "oops"}, "messages", "messages", "not a JSON list"),
        ({"messages": []}, "messages", "messages", "empty conversation"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "messages", "no assistant turn"),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            "messages",
            "turn 0",
            "roles out of order",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages",
            "turn 1",
            "roles out of order",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages",
            "turn 1",
            "system message after",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"},
                ]
            },
            "messages",
            "turn 2",
            "ends with a user turn",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
            "sharegpt",
            "conversations[1].from",
            "unknown role",
        ),
        ({"instruction": "q", "output": ""}, "alpaca", "output", "empty content"),
        ({"instruction": ["q"], "output": "a"}, "alpaca", "instruction", "expected a string"),
        ({"prompt": "q"}, "prompt_completion", "completion", "missing"),
        ({"text": None}, "text", "text", "missing"),
        ({"text": 12}, "text", "text", "expected a string"),
    ],
)
def test_invalid_rows_name_field_and_reason(row, fmt, field, reason):
    messages, text, problems = normalize_row(row, fmt)
    assert messages is None and text is None
    assert any(f == field and reason in r for f, r in problems), problems
