"""Tool conversations render token for token like the official Llama 3.1 template; calls are trained, results never.

The reference is Meta's own template (../shared/llama3/chat_template.jinja) run by transformers'
apply_chat_template on the Llama 3 tokenizer lorafit builds; lorafit's ids must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import chat_template

from lorafit.data.encode import Encoder
from lorafit.data.templates import LLAMA31_CHAT_TEMPLATE, encode_prompt, render
from lorafit.data.tool_render import tool_style
from lorafit.errors import DataError

from .test_tokenize import trained_spans
from .tool_rows import AREA_TOOL, GLAIVE_NORMAL, OPENAI_NORMAL, WEATHER_TOOL, call

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "llama3" / "chat_template.jinja"
BUILTIN = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Latest news on Mars, then weather in Nice?"},
    call("brave_search", {"query": "Mars news"}),
    {"role": "tool", "content": "Rover finds ice."},
    call("get_weather", {"city": "Nice"}),
    {"role": "tool", "content": {"temp_c": 19, "sky": "clear — sunny"}},
    {"role": "assistant", "content": "Ice on Mars; 19 C and clear in Nice."},
]
CASES = [  # (messages, tools, builtin_tools, tools_in_user_message)
    (GLAIVE_NORMAL, [AREA_TOOL], None, True),
    (OPENAI_NORMAL, [WEATHER_TOOL], None, True),
    (OPENAI_NORMAL, [WEATHER_TOOL, AREA_TOOL], None, False),
    (BUILTIN, [WEATHER_TOOL], ["brave_search", "wolfram_alpha", "code_interpreter"], True),
    (BUILTIN[:4] + BUILTIN[-1:], None, ["brave_search"], True),
]


@pytest.fixture(scope="module")
def official():
    if not OFFICIAL.exists():
        pytest.skip(f"the official Llama 3.1 template is not at {OFFICIAL}")
    return OFFICIAL.read_text(encoding="utf-8")


def official_ids(tokenizer, template, messages, tools, builtin, in_user, gen=False) -> list[int]:
    kwargs = {"builtin_tools": builtin} if builtin is not None else {}
    with chat_template(tokenizer, template) as tok:
        return tok.apply_chat_template(
            messages, tools=tools, add_generation_prompt=gen, tokenize=True, tools_in_user_message=in_user, **kwargs
        )["input_ids"]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_token_ids_equal_the_official_template(llama3_tokenizer, official, case):
    messages, tools, builtin, in_user = CASES[case]
    spec = {"tools": tools, "builtin_tools": builtin}
    ids, _ = Encoder(llama3_tokenizer, "llama3", tools_in_user_message=in_user).encode_batch(
        [messages], [None], [spec]
    )[0]
    assert ids == official_ids(llama3_tokenizer, official, messages, tools, builtin, in_user)
    for end in range(2, len(messages)):  # every prompt a conversation can be cut at, as inference renders it
        if messages[end]["role"] == "assistant":
            prompt = encode_prompt(llama3_tokenizer, messages[:end], "llama3", spec, in_user)
            assert prompt == official_ids(llama3_tokenizer, official, messages[:end], tools, builtin, in_user, gen=True)
    # The Jinja template lorafit saves with merged models renders the same.
    assert ids == official_ids(llama3_tokenizer, LLAMA31_CHAT_TEMPLATE, messages, tools, builtin, in_user)


def test_calls_are_trained_with_their_end_token_results_and_tools_never(llama3_tokenizer):
    spec = {"tools": [AREA_TOOL], "builtin_tools": None}
    ids, labels = Encoder(llama3_tokenizer, "llama3").encode_batch([GLAIVE_NORMAL], [None], [spec])[0]
    assert trained_spans(llama3_tokenizer, ids, labels) == [
        '{"name": "calculate_area", "parameters": {"shape": "rectangle", "dimensions": [5, 3]}}<|eot_id|>',
        "The area is 15 square units.<|eot_id|>",
        '{"name": "calculate_area", "parameters": {"shape": "circle", "dimensions": [4]}}<|eot_id|>',
        "About 50.24 square units.<|eot_id|>",
    ]
    text = llama3_tokenizer.decode(ids)
    assert (
        "Environment: ipython\n" in text
        and '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"area\\": 15}"<|eot_id|>' in text
    )
    assert text.index('"name": "calculate_area",\n    "description"') < text.index(
        "I need the area"
    )  # in the user turn


def test_builtin_calls_end_with_eom(llama3_tokenizer):
    spec = {"tools": [WEATHER_TOOL], "builtin_tools": ["brave_search"]}
    ids, labels = Encoder(llama3_tokenizer, "llama3").encode_batch([BUILTIN], [None], [spec])[0]
    assert trained_spans(llama3_tokenizer, ids, labels) == [
        '<|python_tag|>brave_search.call(query="Mars news")<|eom_id|>',
        '{"name": "get_weather", "parameters": {"city": "Nice"}}<|eom_id|>',  # built-ins on: every call ends with eom
        "Ice on Mars; 19 C and clear in Nice.<|eot_id|>",
    ]


def test_a_model_template_that_takes_tools_is_used(llama3_tokenizer, official):
    """A real Llama 3.1 Instruct tokenizer carries the official template: template `model` renders tools with it."""
    spec = {"tools": [AREA_TOOL], "builtin_tools": None}
    expected = Encoder(llama3_tokenizer, "llama3").encode_batch([GLAIVE_NORMAL], [None], [spec])[0]
    with chat_template(llama3_tokenizer, official) as tok:
        assert tool_style(tok) == "native"
        assert Encoder(tok, "model").encode_batch([GLAIVE_NORMAL], [None], [spec])[0] == expected


HERMES = """<|im_start|>system
Be brief.

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", \
"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
<|im_start|>user
Weather in Oslo?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city": "Oslo"}}
</tool_call><|im_end|>
<|im_start|>tool
<tool_response>
{"temp_c": 4}
</tool_response><|im_end|>
<|im_start|>assistant
It is 4 C in Oslo.<|im_end|>
"""


def test_chatml_without_tool_support_uses_hermes(smollm2_tokenizer):
    assert tool_style(smollm2_tokenizer) == "hermes"
    messages = [{"role": "system", "content": "Be brief."}] + OPENAI_NORMAL[1:5]
    spec = {"tools": [WEATHER_TOOL], "builtin_tools": None}
    assert render(smollm2_tokenizer, messages, "model", tools=spec) == HERMES
    ids, labels = Encoder(smollm2_tokenizer, "model").encode_batch([messages], [None], [spec])[0]
    assert trained_spans(smollm2_tokenizer, ids, labels) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "It is 4 C in Oslo.<|im_end|>",
    ]
    no_system = render(smollm2_tokenizer, OPENAI_NORMAL[1:3], "model", tools=spec)
    assert no_system.startswith("<|im_start|>system\n# Tools\n")  # the tools replace the template's default system text
    with pytest.raises(DataError, match="built-in tools"):
        render(smollm2_tokenizer, OPENAI_NORMAL[1:3], "model", tools={"tools": None, "builtin_tools": ["brave_search"]})


def test_a_template_that_would_drop_tools_is_an_error(llama3_tokenizer):
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    with chat_template(llama3_tokenizer, plain) as tok:
        assert tool_style(tok) is None
        with pytest.raises(DataError, match="cannot render tools"):
            render(tok, OPENAI_NORMAL[1:3], "model", tools={"tools": [WEATHER_TOOL], "builtin_tools": None})
        assert render(tok, OPENAI_NORMAL[:2], "model") == "system: You help with weather.\nuser: Weather in Oslo?\n"


def test_data_check_on_glaive_and_openai_files_with_the_llama3_tokenizer(tmp_path, llama3_tokenizer, capsys):
    """The done-criterion of tool support: both public spellings pass with no rejected row, and the example shows
    the official tool layout, trained spans bracketed."""
    from lorafit.data.check import data_check

    from .tool_rows import GLAIVE_ROWS, OPENAI_ROW

    glaive = tmp_path / "glaive_toolcall.json"
    glaive.write_text(json.dumps(GLAIVE_ROWS, indent=2))
    openai = tmp_path / "openai_tools.jsonl"
    openai.write_text(json.dumps(OPENAI_ROW) + "\n")
    tokenizer = Path(__file__).resolve().parents[2].parent / "shared" / "llama3"
    for path in (glaive, openai):
        assert data_check(str(path), str(tokenizer), None, as_json=False) == 0
        out = capsys.readouterr().out
        assert "invalid rows" not in out and "template llama3" in out
        assert "Environment: ipython\nCutting Knowledge Date" in out and "Given the following functions" in out
        assert '[[{"name": "' in out and '"parameters": {' in out and "}<|eot_id|>]]" in out
    assert "not used by training (ignored): `id` (1 row)" in out
