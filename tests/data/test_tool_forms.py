"""Tool-use rows: every common spelling becomes one normal form; what cannot be rendered faithfully is a row error."""

from __future__ import annotations

import copy
import json

import pytest
from helpers import write_jsonl

from lorafit.config import DataSource
from lorafit.data.formats import normalize
from lorafit.data.sources import read_source

from .tool_rows import AREA_TOOL, GLAIVE_NORMAL, GLAIVE_ROWS, OPENAI_NORMAL, OPENAI_ROW, WEATHER_TOOL, call


def test_glaive_sharegpt_rows():
    plain, tools, refusal = (normalize(r, "sharegpt") for r in GLAIVE_ROWS)
    assert plain.problems == [] and plain.tools is None and plain.unused == []  # "[]" is no tools, not a loss
    assert tools.problems == [] and tools.messages == GLAIVE_NORMAL
    assert tools.tools == {"tools": [AREA_TOOL], "builtin_tools": None}
    assert refusal.problems == [] and refusal.tools["tools"] == [AREA_TOOL]  # tools shown, answered without a call


def test_openai_rows_with_string_and_object_arguments_and_content_parts():
    n = normalize(OPENAI_ROW, "messages")
    assert n.problems == [] and n.messages == OPENAI_NORMAL
    assert n.tools == {"tools": [WEATHER_TOOL], "builtin_tools": None}
    assert n.unused == ["id"]


def test_llama_ipython_role_legacy_function_call_and_builtin_tools():
    row = {
        "messages": [
            {"role": "user", "content": "Search the news."},
            {"role": "assistant", "function_call": {"name": "brave_search", "arguments": '{"query": "news"}'}},
            {"role": "ipython", "content": "headlines"},
            {"role": "assistant", "content": "Here they are."},
        ],
        "builtin_tools": ["brave_search", "code_interpreter"],
    }
    n = normalize(row, "messages")
    assert n.problems == []
    assert n.messages[1] == call("brave_search", {"query": "news"}) and n.messages[2] == {
        "role": "tool",
        "content": "headlines",
    }
    assert n.tools == {"tools": None, "builtin_tools": ["brave_search", "code_interpreter"]}
    result = {
        "messages": [
            {"role": "user", "content": "q"},
            call("get_weather", {"city": "X"}),
            {"role": "tool", "content": {"temp_c": 3}},
        ],
        "tools": [WEATHER_TOOL],
    }
    assert normalize(result, "messages").problems == [
        ("turn 2", "roles out of order: the conversation must end with an assistant answer or call")
    ]
    result["messages"].append({"role": "assistant", "content": "3 C."})
    assert normalize(result, "messages").messages[2]["content"] == {"temp_c": 3}  # a JSON result stays JSON


def with_turn(row: dict, index: int, **changes) -> dict:
    row = copy.deepcopy(row)
    row["messages"][index].update(changes)
    return row


PARALLEL = with_turn(OPENAI_ROW, 2, tool_calls=OPENAI_ROW["messages"][2]["tool_calls"] * 2)


@pytest.mark.parametrize(
    "row, fmt, field, reason",
    [
        (PARALLEL, "messages", "messages[2].tool_calls", "2 parallel calls in one assistant turn"),
        (
            with_turn(OPENAI_ROW, 2, content="Let me look."),
            "messages",
            "messages[2].tool_calls",
            "text next to a tool call",
        ),
        (with_turn(OPENAI_ROW, 3, tool_call_id="call_9"), "messages", "turn 3.tool_call_id", "does not match the call"),
        (with_turn(OPENAI_ROW, 3, name="get_time"), "messages", "turn 3.name", "does not match the call"),
        (
            {"messages": [{"role": "user", "content": "q"}, call("get_time", {})], "tools": [WEATHER_TOOL]},
            "messages",
            "turn 1",
            "not among the row's tools (get_weather)",
        ),
        (
            with_turn(OPENAI_ROW, 2, tool_calls=[{"function": {"name": "get_weather", "arguments": "{city: Oslo}"}}]),
            "messages",
            "messages[2].tool_calls[0].arguments",
            "broken JSON",
        ),
        (
            with_turn(OPENAI_ROW, 2, tool_calls=[{"function": {"name": "get_weather", "arguments": "[1]"}}]),
            "messages",
            "messages[2].tool_calls[0].arguments",
            "got list",
        ),
        (
            with_turn(OPENAI_ROW, 2, tool_calls=[{"function": {"arguments": "{}"}}]),
            "messages",
            "messages[2].tool_calls[0].name",
            "missing",
        ),
        ({**OPENAI_ROW, "tools": None}, "messages", "turn 2", "the row has no `tools`"),
        ({**OPENAI_ROW, "tools": "[{broken"}, "messages", "tools", "not a JSON list of tool definitions"),
        (
            {**OPENAI_ROW, "tools": [{"description": "no name"}]},
            "messages",
            "tools[0]",
            "a function schema with a `name`",
        ),
        ({**OPENAI_ROW, "builtin_tools": ["photoshop"]}, "messages", "builtin_tools", "Llama 3.1 built-in tools"),
        (with_turn(OPENAI_ROW, 4, role="tool"), "messages", "turn 4", "parallel tool results"),
        (
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "function_call", "value": "calculate_area(2)"},
                ],
                "tools": [AREA_TOOL],
            },
            "sharegpt",
            "conversations[1].value",
            "a function call must be JSON",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "function_call", "value": json.dumps([{"name": "calculate_area", "arguments": {}}] * 2)},
                ],
                "tools": [AREA_TOOL],
            },
            "sharegpt",
            "conversations[1].value",
            "2 parallel",
        ),
        (
            {
                "messages": [{"role": "user", "content": "q"}, call("brave_search", {"query": 3})],
                "builtin_tools": ["brave_search"],
            },
            "messages",
            "turn 1",
            "takes string arguments",
        ),
        (
            {"instruction": "q", "output": "a", "tools": [AREA_TOOL]},
            "alpaca",
            "tools",
            "the alpaca form has no tool turns",
        ),
        (
            {"prompt": "q", "completion": "a", "tools": json.dumps([AREA_TOOL])},
            "prompt_completion",
            "tools",
            "would be dropped",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "value": "hi"}, {"type": "image_url", "image_url": "x"}],
                    },
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages",
            "messages[0].content",
            "part 1 is not text (type 'image_url')",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]},
            "messages",
            "messages[0].content",
            "part 0 has type 'text' but no string `text` or `value`",
        ),
    ],
)
def test_row_errors_name_field_and_reason(row, fmt, field, reason):
    n = normalize(row, fmt)
    assert n.messages is None and any(f == field and reason in r for f, r in n.problems), n.problems


def test_text_parts_with_value_are_text():
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "Hel"}, {"type": "text", "text": "lo"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "Hi"}]},
        ]
    }
    assert normalize(row, "messages").messages == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
    ]


def test_unused_columns_and_turn_keys_are_counted_per_source(tmp_path):
    rows = [
        dict(OPENAI_ROW, source="web"),
        {
            "messages": [
                {"role": "user", "content": "q", "weight": 0},
                {"role": "assistant", "content": "a", "reasoning_content": "hm"},
            ]
        },
    ]
    src = read_source(DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert src.invalid == 0
    assert src.unused == {"id": 1, "messages[].reasoning_content": 1, "messages[].weight": 1, "source": 1}
    stored = src.dataset[0]
    assert json.loads(stored["tools"]) == {"tools": [WEATHER_TOOL], "builtin_tools": None}
    assert src.dataset[1]["tools"] is None
