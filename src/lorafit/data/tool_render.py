"""Render tool-use conversations: the official Llama 3.1 layout, a model's own tool template, or Hermes.

`render_llama31_tools` reproduces the official Llama-3.1-8B-Instruct template with tools token for token:
`Environment: ipython` in the system block, the tool definitions (JSON, indent 4) in the first user message
by default (`tools_in_user_message`) or in the system block, a call as `{"name": ..., "parameters": ...}`
ended by <|eot_id|>, results under the `ipython` header serialised as JSON (the official template applies
`tojson` to every result, strings included), and built-in tools (`brave_search`, `wolfram_alpha`,
`code_interpreter`) listed on a `Tools:` line, called as `<|python_tag|>name.call(key="value")`; when
built-in tools are on, every call ends with <|eom_id|>.

A model whose own chat template renders tools, calls and results (probed once) gets them through
`apply_chat_template(tools=...)`. A ChatML model whose template cannot (like SmolLM2) gets the Hermes
convention that Qwen2.5, Hermes 2 Pro and vLLM's `hermes` parser use: the tool signatures inside <tools></tools>
in the system turn, each call as <tool_call>{"name": ..., "arguments": ...}</tool_call> in the assistant turn,
each result as <tool_response>...</tool_response> in a `tool` turn. Any other template would drop the tools:
that is an error, never a silent change.
"""

from __future__ import annotations

import json

from lorafit.errors import DataError

LLAMA31_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
LLAMA31_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
CALL_FORMAT = 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
TOOLS_IN_SYSTEM = (
    "You have access to the following functions. To call a function, please respond with JSON for a "
    "function call." + CALL_FORMAT + "Do not use variables.\n\n"
)
TOOLS_IN_USER = (
    "Given the following functions, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt.\n\n" + CALL_FORMAT + "Do not use variables.\n\n"
)
HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\nFor each function call, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
# The same format as Jinja, saved with merged models and GGUF files so other runtimes render tool rows the same way.
# Unlike the official template it treats a missing `tools` variable as none (llama.cpp and Ollama may not pass it).
LLAMA31_TOOLS_JINJA = (
    "{{- bos_token }}"
    "{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}"
    "{%- if tools is not defined %}{%- set tools = none %}{%- endif %}"
    "{%- if tools_in_user_message is not defined %}{%- set tools_in_user_message = true %}{%- endif %}"
    '{%- if date_string is not defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    '{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}'
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if builtin_tools is defined or tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{%- if builtin_tools is defined %}"
    "{{- 'Tools: ' + builtin_tools | reject('equalto', 'code_interpreter') | join(', ') + '\\n\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{%- if tools is not none and not tools_in_user_message %}{{- " + json.dumps(TOOLS_IN_SYSTEM) + " }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}{%- endif %}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- if tools_in_user_message and tools is not none %}"
    "{%- if messages | length == 0 %}"
    "{{- raise_exception('tools go in the first user message, and there is none') }}{%- endif %}"
    "{%- set first_user_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}{{- " + json.dumps(TOOLS_IN_USER) + " }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user_message + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if 'tool_calls' in message %}"
    "{%- if message.tool_calls | length != 1 %}{{- raise_exception('one tool call per assistant turn') }}{%- endif %}"
    "{%- set call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- if builtin_tools is defined and call.name in builtin_tools %}"
    "{{- '<|python_tag|>' + call.name + '.call(' }}"
    "{%- for name, value in call.arguments | items %}{{- name + '=\"' + value + '\"' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- ')' }}"
    '{%- else %}{{- \'{"name": "\' + call.name + \'", "parameters": \' }}'
    "{{- call.arguments | tojson }}{{- '}' }}{%- endif %}"
    "{%- if builtin_tools is defined %}{{- '<|eom_id|>' }}{%- else %}{{- '<|eot_id|>' }}{%- endif %}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}{{- message.content | tojson }}{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
_STYLES: dict[str, str | None] = {}  # chat template text -> native | hermes | None


def tools_of(spec: dict | None) -> tuple[list | None, list | None]:
    spec = spec or {}
    return spec.get("tools"), spec.get("builtin_tools")


def has_tools(messages: list[dict], spec: dict | None) -> bool:
    return bool(spec and (spec.get("tools") or spec.get("builtin_tools"))) or any(
        m["role"] == "tool" or "tool_calls" in m for m in messages
    )


# -- the official Llama 3.1 layout ------------------------------------------------------------------------------------
def render_llama31_tools(
    messages: list[dict],
    spec: dict | None,
    bos: str = "<|begin_of_text|>",
    add_generation_prompt: bool = False,
    tools_in_user_message: bool = True,
) -> str:
    tools, builtin = tools_of(spec)
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    parts = [bos, LLAMA31_HEADER.format("system")]
    if builtin is not None or tools is not None:
        parts.append("Environment: ipython\n")
    if builtin is not None:
        parts.append("Tools: " + ", ".join(b for b in builtin if b != "code_interpreter") + "\n\n")
    parts.append(LLAMA31_DATES)
    if tools is not None and not tools_in_user_message:
        parts += [TOOLS_IN_SYSTEM] + [_schema(t) + "\n\n" for t in tools]
    parts += [system, "<|eot_id|>"]
    if tools is not None and tools_in_user_message:
        if not messages:
            raise DataError(
                "tools go in the first user message (the Llama 3.1 default), but the conversation has none.",
                "Start the conversation with a user turn, or set `data.tools_in_user_message: false`.",
            )
        first, messages = messages[0]["content"].strip(), messages[1:]
        parts += (
            [LLAMA31_HEADER.format("user"), TOOLS_IN_USER]
            + [_schema(t) + "\n\n" for t in tools]
            + [first, "<|eot_id|>"]
        )
    for m in messages:
        parts.append(_llama31_turn(m, builtin))
    if add_generation_prompt:
        parts.append(LLAMA31_HEADER.format("assistant"))
    return "".join(parts)


def _schema(tool) -> str:
    return json.dumps(tool, ensure_ascii=False, indent=4)  # the template's `tojson(indent=4)`


def _llama31_turn(m: dict, builtin: list | None) -> str:
    if "tool_calls" in m:
        call = m["tool_calls"][0]["function"]
        if builtin is not None and call["name"] in builtin:
            args = ", ".join(f'{k}="{v}"' for k, v in call["arguments"].items())
            body = f"<|python_tag|>{call['name']}.call({args})"
        else:
            body = (
                '{"name": "'
                + call["name"]
                + '", "parameters": '
                + json.dumps(call["arguments"], ensure_ascii=False)
                + "}"
            )
        return LLAMA31_HEADER.format("assistant") + body + ("<|eom_id|>" if builtin is not None else "<|eot_id|>")
    if m["role"] in ("tool", "ipython"):
        # Jinja counts a string as iterable, so the official template writes every result through tojson.
        return LLAMA31_HEADER.format("ipython") + json.dumps(m["content"], ensure_ascii=False) + "<|eot_id|>"
    return LLAMA31_HEADER.format(m["role"]) + m["content"].strip() + "<|eot_id|>"


# -- Hermes, for ChatML templates without tools -----------------------------------------------------------------------
def hermes_messages(messages: list[dict], spec: dict | None) -> list[dict]:
    """The conversation with tools, calls and results written as Hermes text in plain turns."""
    tools, builtin = tools_of(spec)
    if builtin:
        raise DataError(
            f"built-in tools ({', '.join(builtin)}) are a Llama 3.1 feature; this model's chat format has none.",
            "Use `data.template: llama3` with a Llama 3 tokenizer, or describe the tools as `tools` schemas.",
        )
    out = [dict(m) for m in messages]
    if tools:
        block = HERMES_TOOLS.format("\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + block
        else:
            out.insert(0, {"role": "system", "content": block})
    for k, m in enumerate(out):
        if "tool_calls" in m:
            call = m["tool_calls"][0]["function"]
            text = (
                '{"name": "'
                + call["name"]
                + '", "arguments": '
                + json.dumps(call["arguments"], ensure_ascii=False)
                + "}"
            )
            out[k] = {"role": "assistant", "content": f"<tool_call>\n{text}\n</tool_call>"}
        elif m["role"] in ("tool", "ipython"):
            result = m["content"] if isinstance(m["content"], str) else json.dumps(m["content"], ensure_ascii=False)
            out[k] = {"role": "tool", "content": f"<tool_response>\n{result}\n</tool_response>"}
    return out


# -- which way a model's own template takes tools ---------------------------------------------------------------------
PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "lorafit_probe",
        "description": "lorafit-probe-description",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
    },
}
PROBE = [
    {"role": "user", "content": "Hi"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "lorafit_probe", "arguments": {"x": "lorafit-probe-argument"}}}
        ],
    },
    {"role": "tool", "content": "lorafit-probe-result"},
    {"role": "assistant", "content": "Done."},
]


def tool_style(tokenizer) -> str | None:
    """native (the template renders tools, calls and results), hermes (a ChatML template without them), or None."""
    template = tokenizer.chat_template or ""
    if template not in _STYLES:
        _STYLES[template] = _probe(tokenizer)
    return _STYLES[template]


def _probe(tokenizer) -> str | None:
    try:
        text = tokenizer.apply_chat_template(PROBE, tools=[PROBE_TOOL], tokenize=False)
        if all(
            mark in text for mark in ("lorafit-probe-description", "lorafit-probe-argument", "lorafit-probe-result")
        ):
            return "native"
    except Exception:  # a template may refuse tool roles outright (raise_exception): it has no tool support
        pass
    try:
        plain = tokenizer.apply_chat_template(PROBE[:1], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - the caller reports the template as unusable for tools
        return None
    return "hermes" if "<|im_start|>" in plain else None


def model_tool_inputs(
    tokenizer, messages: list[dict], spec: dict | None, tools_in_user_message: bool
) -> tuple[list, dict]:
    """(messages, extra apply_chat_template arguments) that render this tool conversation with the model's template."""
    style = tool_style(tokenizer)
    tools, builtin = tools_of(spec)
    if style == "native":
        kwargs = {"tools": tools, "tools_in_user_message": tools_in_user_message}
        if builtin:
            if "builtin_tools" not in (tokenizer.chat_template or ""):
                raise DataError(
                    "this model's chat template has no built-in tools, so `builtin_tools` would be dropped.",
                    "Remove `builtin_tools` from the rows, or use a Llama 3.1 template.",
                )
            kwargs["builtin_tools"] = builtin
        return messages, kwargs
    if style == "hermes":
        return hermes_messages(messages, spec), {}
    raise DataError(
        "this model's chat template cannot render tools, tool calls or tool results, and it is not a ChatML "
        "template (where lorafit uses the Hermes tool format): the tools would be dropped.",
        "Use `data.template: llama3` with a Llama 3 tokenizer, or a model whose chat template takes `tools`.",
    )
