"""Tool calls at inference: the model's call is parsed in every format lorafit trains, generation stops at both Llama
end tokens, prompts carry their tools, chat takes a pasted result, and calls are scored."""

from __future__ import annotations

import io
import json
import re

import pytest

from lorafit.errors import DataError
from lorafit.inference.tool_calls import ToolScore, parse_tool_call, read_tools_file

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize(
    "text, call, problem",
    [
        (
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
            {"name": "get_weather", "arguments": {"city": "Oslo"}},
            None,
        ),
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
            {"name": "get_weather", "arguments": {"city": "Oslo"}},
            None,
        ),
        (
            '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}',
            {"name": "get_weather", "arguments": {"city": "Oslo"}},
            None,
        ),
        (
            '<|python_tag|>brave_search.call(query="news \\"today\\"", n="3")',
            {"name": "brave_search", "arguments": {"query": 'news "today"', "n": "3"}},
            None,
        ),
        ('wolfram_alpha.call(query="2+2")', {"name": "wolfram_alpha", "arguments": {"query": "2+2"}}, None),
        ("It is sunny in Oslo.", None, None),
        ('{"name": "get_weather", "parameters": {"city": "Oslo"', None, "not valid JSON"),
        ('{"city": "Oslo"}', None, "JSON without a `name`"),
        ('{"name": "get_weather", "parameters": [1]}', None, "arguments are a list"),
        ("brave_search.call(query=news)", None, "unreadable built-in call arguments"),
    ],
)
def test_parse_tool_call(text, call, problem):
    got, why = parse_tool_call(text)
    assert got == call
    assert (why is None) if problem is None else (problem in why)


def test_tool_score_counts_each_criterion():
    score = ToolScore()
    expected = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    score.add(expected, '{"name": "get_weather", "parameters": {"city": "Oslo"}}')  # exact
    score.add(expected, '{"name": "get_weather", "parameters": {"city": "oslo"}}')  # right tool, wrong argument
    score.add(expected, '{"name": "get_time", "parameters": {}}')  # valid, wrong tool
    score.add(expected, '{"name": "get_weather", "parameters": {')  # broken JSON
    score.add(None, "Hello!")  # no call expected, none made
    score.add(None, '{"name": "get_weather", "parameters": {}}')  # a call where none was expected
    assert score.summary() == {
        "expected_calls": 4,
        "valid_calls": 3,
        "right_tool": 2,
        "exact_calls": 1,
        "no_call_expected": 2,
        "no_call": 1,
    }


def test_tools_file(tmp_path):
    plain = tmp_path / "tools.json"
    plain.write_text(json.dumps([WEATHER]))
    assert read_tools_file(str(plain)) == {"tools": [WEATHER], "builtin_tools": None}
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"tools": [WEATHER], "builtin_tools": ["brave_search"]}))
    assert read_tools_file(str(both))["builtin_tools"] == ["brave_search"]
    for content, message in (
        ("[{", "broken JSON"),
        ('[{"description": "x"}]', "`tools[0]`: expected a function schema"),
        ("[]", "no tools in it"),
    ):
        plain.write_text(content)
        with pytest.raises(DataError, match=re.escape(message)):
            read_tools_file(str(plain))
    with pytest.raises(DataError, match="does not exist"):
        read_tools_file(str(tmp_path / "missing.json"))


def test_prompts_carry_their_tools(tmp_path):
    from lorafit.inference.generate import read_prompts

    prompts = tmp_path / "p.jsonl"
    own = {"tools": [{"name": "ferry_times", "parameters": {}}], "builtin_tools": None}
    prompts.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "Weather in Oslo?"},
                {"prompt": "Ferries to Osk?", "tools": json.dumps(own["tools"])},
                {
                    "messages": [
                        {"role": "user", "content": "Weather in Oslo?"},
                        {
                            "role": "assistant",
                            "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}],
                        },
                        {"role": "tool", "content": "4 C"},
                    ]
                },
            ]
        )
        + "\n"
    )
    default = {"tools": [WEATHER], "builtin_tools": None}
    rows = read_prompts(str(prompts), default)
    assert [r["tools"] for r in rows] == [default, own, default]
    assert rows[2]["prompt"] == "Weather in Oslo?" and rows[2]["messages"][-1] == {"role": "tool", "content": "4 C"}
    assert rows[2]["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    prompts.write_text(json.dumps({"prompt": "x", "tools": "[{oops"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: `tools`: not a JSON list"):
        read_prompts(str(prompts))


class ScriptedModel:
    """Stands in for a model: answers with the next scripted token ids, and records every prompt it was given."""

    def __init__(self, answers: list[list[int]]):
        import torch

        self.answers, self.prompts, self.kwargs = list(answers), [], []
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"max_position_embeddings": 4096})()

    def parameters(self):
        return iter([self.weight])

    def generate(self, input_ids, attention_mask, streamer=None, **kwargs):
        import torch

        self.prompts.append(input_ids[0].tolist())
        self.kwargs.append(kwargs)
        answer = torch.tensor([self.answers.pop(0)])
        if streamer is not None:
            streamer.put(input_ids)
            streamer.put(answer[0])
            streamer.end()
        return torch.cat([input_ids, answer], dim=1)


def scripted(tokenizer, template: str, texts: list[str]):
    from lorafit.data.templates import end_of_turn_ids
    from lorafit.inference.generate import InferenceModel

    answers = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return InferenceModel(ScriptedModel(answers), tokenizer, template, end_of_turn_ids(tokenizer, template))


def test_llama_generation_stops_at_eot_and_eom_and_renders_the_tools(llama3_tokenizer):
    """After a custom call the turn ends with <|eot_id|>, after a built-in call with <|eom_id|>: both stop it."""
    from lorafit.data.templates import encode_prompt
    from lorafit.inference.generate import generate_batch

    loaded = scripted(
        llama3_tokenizer,
        "llama3",
        [
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>never',
            '<|python_tag|>brave_search.call(query="Oslo news")<|eom_id|>never',
        ],
    )
    conversation = [{"role": "user", "content": "Weather in Oslo?"}]
    spec = {"tools": [WEATHER], "builtin_tools": ["brave_search"]}
    answers = [generate_batch(loaded, [conversation], 16, tools=[spec])[0] for _ in range(2)]
    assert [parse_tool_call(a)[0] for a in answers] == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "brave_search", "arguments": {"query": "Oslo news"}},
    ]
    assert {128008, 128009} <= set(loaded.model.kwargs[0]["eos_token_id"])
    assert loaded.model.prompts[0] == encode_prompt(llama3_tokenizer, conversation, "llama3", spec)
    assert "Environment: ipython\nTools: brave_search" in llama3_tokenizer.decode(loaded.model.prompts[0])


def test_generate_writes_the_parsed_call(smollm2_tokenizer, tmp_path):
    from lorafit.inference.generate import generate

    loaded = scripted(
        smollm2_tokenizer,
        "model",
        [
            "Hello!<|im_end|>",  # generate answers the shortest prompt first
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        ],
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("Weather in Oslo?\nHi\n")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    out = generate(
        "scripted", str(prompts), str(tmp_path / "out.jsonl"), batch_size=1, loaded=loaded, tools_file=str(tools)
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_prompt = {r["prompt"]: r for r in rows}
    assert by_prompt["Hi"]["response"] == "Hello!" and "tool_call" not in by_prompt["Hi"]
    assert by_prompt["Weather in Oslo?"]["tool_call"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert "<tools>" in smollm2_tokenizer.decode(loaded.model.prompts[1])  # Hermes tools in the system turn


def test_chat_prints_the_call_and_takes_the_pasted_result(llama3_tokenizer, tmp_path):
    from lorafit.inference.chat import chat

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    loaded = scripted(
        llama3_tokenizer,
        "llama3",
        [
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>',
            "It is 4 C in Oslo.<|eot_id|>",
            "Bye!<|eot_id|>",
        ],
    )
    out = io.StringIO()
    chat(
        "scripted",
        input_stream=io.StringIO('Weather in Oslo?\n{"temp_c": 4}\nThanks\n'),
        output=out,
        loaded=loaded,
        tools_file=str(tools),
    )
    transcript = out.getvalue()
    assert "(tools: get_weather)" in transcript
    assert 'tool call: {"name": "get_weather", "arguments": {"city": "Oslo"}}' in transcript
    assert "result> " in transcript and "It is 4 C in Oslo." in transcript and transcript.count(">>> ") == 3
    second = llama3_tokenizer.decode(loaded.model.prompts[1])
    assert second.endswith(
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temp_c\\": 4}"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    third = llama3_tokenizer.decode(loaded.model.prompts[2])
    assert third.endswith(
        "It is 4 C in Oslo.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nThanks<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_compare_scores_tool_calls(tiny_run_dir, tmp_path):
    from helpers import write_jsonl

    from lorafit.inference.compare import compare

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Weather in {city}?"},
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": city}}}],
                },
            ],
            "tools": [WEATHER],
        }
        for city in ("Oslo", "Bergen", "Tromso")
    ]
    rows.append(
        {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
            "tools": [WEATHER],
        }
    )
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    result = compare(str(tiny_run_dir), str(data), limit=1, max_new_tokens=4, as_json=True)
    tools = result["tool_calls"]
    assert tools["rows"] == 4 and tools["base"]["expected_calls"] == 3 and tools["base"]["no_call_expected"] == 1
    assert result["answers"][0]["reference"] == '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert 0 <= tools["tuned"]["exact_calls"] <= tools["tuned"]["valid_calls"] <= 3


def test_cli_tools_options(tiny_run_dir, tmp_path):
    from helpers import run_cli

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Weather in Oslo?"}) + "\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(
        "generate",
        str(tiny_run_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--tools",
        str(tools),
        "--max-new-tokens",
        "3",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["prompt"] == "Weather in Oslo?"
    missing = run_cli("chat", str(tiny_run_dir), "--tools", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "tools file" in missing.stderr and "Traceback" not in missing.stderr
