"""Chat formats: the tokenizer's own chat template, or the built-in Llama 3.1 Instruct format.

The built-in format reproduces the official Llama-3.1-8B-Instruct template exactly: the system block is
always emitted, opened by the knowledge-date preamble, and every content is trimmed; conversations with
tools follow tool_render.py. `LLAMA31_CHAT_TEMPLATE` is the same format in Jinja (saved with merged models
so other tools render identically); tests check all of them agree with the official template.
"""

from __future__ import annotations

from lorafit.data.special_tokens import (
    LLAMA31_END_TOKENS,
    encode_rendered,
    end_token_ids,
    special_token_strings,
    token_id,
)
from lorafit.data.tool_render import LLAMA31_TOOLS_JINJA, has_tools, model_tool_inputs, render_llama31_tools
from lorafit.errors import DataError

DATE_STRING = "26 Jul 2024"  # the official template's default `date_string`
LLAMA31_PREAMBLE = f"Cutting Knowledge Date: December 2023\nToday Date: {DATE_STRING}\n\n"
LLAMA31_CHAT_TEMPLATE = LLAMA31_TOOLS_JINJA  # the same format in Jinja, tools included (see tool_render.py)


def resolve_template(tokenizer, setting: str = "auto") -> str:
    """`model` when the tokenizer has a chat template (or `model` is asked for), else the built-in `llama3`."""
    if setting == "llama3":
        missing = [
            t
            for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
            if token_id(tokenizer, t) is None
        ]
        if missing:
            raise DataError(
                f"`data.template: llama3` needs the Llama 3 special tokens; this tokenizer lacks {', '.join(missing)}.",
                "Use `template: model` (the tokenizer's own chat template) or a Llama 3 tokenizer.",
            )
        return "llama3"
    if setting == "model" or (setting == "auto" and tokenizer.chat_template):
        if not tokenizer.chat_template:
            raise DataError(
                "`data.template: model` but the tokenizer has no chat template.",
                "Use `template: llama3` (built-in Llama 3.1 format) or a tokenizer with a chat template.",
            )
        return "model"
    if token_id(tokenizer, "<|start_header_id|>") is not None:
        return "llama3"
    raise DataError(
        "the tokenizer has no chat template and is not a Llama 3 tokenizer, so chat data cannot be rendered.",
        "Use a chat model's tokenizer, or train on raw `text` rows.",
    )


def render(
    tokenizer,
    messages: list[dict],
    template: str,
    add_generation_prompt: bool = False,
    tools: dict | None = None,
    tools_in_user_message: bool = True,
) -> str:
    """The conversation as text, special tokens included (BOS too when the format has it).

    `tools` is a row's {"tools": [...], "builtin_tools": [...]} (see data/tools.py); tool conversations are
    rendered as data/tool_render.py describes."""
    if template not in ("model", "llama3"):  # "auto" from a config: resolve it the way training did
        template = resolve_template(tokenizer, template)
    with_tools = has_tools(messages, tools)
    if template == "llama3":
        bos = tokenizer.bos_token or "<|begin_of_text|>"
        if with_tools:
            return render_llama31_tools(messages, tools, bos, add_generation_prompt, tools_in_user_message)
        return render_llama31(messages, bos, add_generation_prompt)
    kwargs: dict = {}
    if with_tools:
        messages, kwargs = model_tool_inputs(tokenizer, messages, tools, tools_in_user_message)
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as err:  # a template can raise anything (jinja TemplateError, its own raise_exception)
        raise DataError(
            f"the tokenizer's chat template failed to render a conversation: {type(err).__name__}: {str(err)[:300]}",
            "Try `data.template: llama3`, or check the roles your data uses.",
        ) from None


def render_llama31(messages: list[dict], bos: str = "<|begin_of_text|>", add_generation_prompt: bool = False) -> str:
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    parts = [bos, "<|start_header_id|>system<|end_header_id|>\n\n", LLAMA31_PREAMBLE, system, "<|eot_id|>"]
    for m in messages:
        parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """The conversation with `system` as its system message, unless it already has one (the row's own wins)."""
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def render_prompt(
    tokenizer, messages: list[dict], template: str, tools: dict | None = None, tools_in_user_message: bool = True
) -> str:
    """Text up to and including the generation prompt, exactly as in training.

    It already holds BOS when the format has one: encode it with `encode_prompt` (or
    add_special_tokens=False), never with a plain `tokenizer(text)` that would add a second BOS.
    """
    return render(tokenizer, messages, template, True, tools, tools_in_user_message)


def encode_prompt(
    tokenizer, messages: list[dict], template: str, tools: dict | None = None, tools_in_user_message: bool = True
) -> list[int]:
    """Token ids of `render_prompt`, with BOS exactly once (as the training examples have it)."""
    return encode_rendered(tokenizer, render_prompt(tokenizer, messages, template, tools, tools_in_user_message))


def end_of_turn_ids(tokenizer, template: str) -> list[int]:
    """Tokens that end an assistant turn, the one the template writes first; all of them stop generation."""
    if template not in ("model", "llama3"):
        template = resolve_template(tokenizer, template)
    if template == "llama3":
        return [i for i in (token_id(tokenizer, t) for t in LLAMA31_END_TOKENS) if i is not None]
    ids: list[int] = []
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "lorafit-probe"}]
    prompt = render(tokenizer, probe[:1], template, add_generation_prompt=True)
    full = render(tokenizer, probe, template)
    if full.startswith(prompt):
        answer = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        special = {tokenizer.convert_tokens_to_ids(t) for t in special_token_strings(tokenizer)}
        ids += [i for i in answer if i in special][:1]
    for i in [tokenizer.eos_token_id] + end_token_ids(tokenizer):
        if i is not None and i not in ids:
            ids.append(i)
    return ids
