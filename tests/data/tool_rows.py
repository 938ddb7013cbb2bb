"""Tool-use rows in the spellings real datasets use (glaive/LLaMA-Factory ShareGPT, OpenAI) and their normal form."""

from __future__ import annotations

import json

AREA_TOOL = {
    "name": "calculate_area",
    "description": "Calculate the area of a shape",
    "parameters": {
        "type": "object",
        "properties": {"shape": {"type": "string"}, "dimensions": {"type": "array", "items": {"type": "number"}}},
        "required": ["shape", "dimensions"],
    },
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(name: str, arguments: dict) -> dict:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
    }


# The glaive function-calling sample LLaMA-Factory ships: `tools` is a JSON string ("[]" on rows without tools).
GLAIVE_ROWS = [
    {
        "conversations": [
            {"from": "human", "value": "Write a haiku about rain."},
            {"from": "gpt", "value": "Soft rain on the roof."},
        ],
        "tools": "[]",
    },
    {
        "conversations": [
            {"from": "human", "value": "I need the area of a rectangle, 5 by 3."},
            {
                "from": "function_call",
                "value": json.dumps(
                    {"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}
                ),
            },
            {"from": "observation", "value": json.dumps({"area": 15})},
            {"from": "gpt", "value": "The area is 15 square units."},
            {"from": "human", "value": "And a circle of radius 4?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "calculate_area", "arguments": {"shape": "circle", "dimensions": [4]}}),
            },
            {"from": "observation", "value": json.dumps({"area": 50.24})},
            {"from": "gpt", "value": "About 50.24 square units."},
        ],
        "tools": json.dumps([AREA_TOOL]),
    },
    {
        "conversations": [
            {"from": "human", "value": "Book me a flight to London."},
            {"from": "gpt", "value": "I can only calculate areas, not book flights."},
        ],
        "tools": json.dumps([AREA_TOOL]),
    },
]
GLAIVE_NORMAL = [
    {"role": "user", "content": "I need the area of a rectangle, 5 by 3."},
    call("calculate_area", {"shape": "rectangle", "dimensions": [5, 3]}),
    {"role": "tool", "content": '{"area": 15}'},
    {"role": "assistant", "content": "The area is 15 square units."},
    {"role": "user", "content": "And a circle of radius 4?"},
    call("calculate_area", {"shape": "circle", "dimensions": [4]}),
    {"role": "tool", "content": '{"area": 50.24}'},
    {"role": "assistant", "content": "About 50.24 square units."},
]

# OpenAI chat-completions style: arguments as a JSON string, results linked by tool_call_id, extra columns.
OPENAI_ROW = {
    "id": "conv-7",
    "messages": [
        {"role": "system", "content": "You help with weather."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "value": "Oslo?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp_c": 4}'},
        {"role": "assistant", "content": "It is 4 C in Oslo."},
        {"role": "user", "content": "And in Bergen?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Bergen"}},
                }
            ],
        },
    ],
    "tools": [WEATHER_TOOL],
}
OPENAI_NORMAL = [
    {"role": "system", "content": "You help with weather."},
    {"role": "user", "content": "Weather in Oslo?"},
    call("get_weather", {"city": "Oslo"}),
    {"role": "tool", "content": '{"temp_c": 4}'},
    {"role": "assistant", "content": "It is 4 C in Oslo."},
    {"role": "user", "content": "And in Bergen?"},
    call("get_weather", {"city": "Bergen"}),
]
