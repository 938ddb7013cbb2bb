"""`lorafit chat`: a streaming multi-turn REPL on a run directory, a merged model folder or a GGUF file.

The prompt is rendered with the format training used (template, system prompt) and generation stops at
the end-of-turn token, so the conversation looks exactly like the training data did.

With `--tools FILE` the tools are rendered into the prompt as in training. When the model answers with a
call, the call is printed as {"name", "arguments"} and the next line you type is the tool's result (paste
what the tool returned); the model then continues from it.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from lorafit.data.templates import encode_prompt, with_system
from lorafit.data.tools import tool_name
from lorafit.inference.generate import cut_at_end, load_for_inference
from lorafit.inference.tool_calls import call_message, parse_tool_call, read_tools_file

HELP = "Commands: /reset (forget the conversation), /system TEXT (set the system message), /exit."


def _streamer(tokenizer, out: TextIO):
    from transformers import TextStreamer

    class ToStream(TextStreamer):
        """TextStreamer prints to stdout; write to our stream instead (tests and pipes)."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text)
            out.flush()

    return ToStream(tokenizer, skip_prompt=True, skip_special_tokens=True)


def fit_history(
    tokenizer,
    history: list[dict],
    system: str | None,
    template: str,
    budget: int,
    tools: dict | None = None,
    tools_in_user_message: bool = True,
) -> tuple[list[dict], list[int]]:
    """Drop the oldest exchanges until the prompt leaves room for the answer; (kept history, prompt ids)."""

    while True:
        ids = encode_prompt(tokenizer, with_system(history, system), template, tools, tools_in_user_message)
        later_user = next((k for k in range(1, len(history)) if history[k]["role"] == "user"), None)
        if len(ids) <= budget or later_user is None:
            return history, ids
        history = history[later_user:]  # one user turn and all that answered it (calls and results too)


def reply(
    loaded,
    history: list[dict],
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    out: TextIO,
    tools: dict | None = None,
) -> tuple[str, list[dict]]:
    """Stream the assistant's answer to the conversation; (answer, history actually kept)."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    context = getattr(model.config, "max_position_embeddings", None) or 4096
    history, ids = fit_history(
        tok, history, system, loaded.template, context - max_new_tokens, tools, loaded.tools_in_user_message
    )
    if len(ids) > context - max_new_tokens:
        out.write(
            f"(the message is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it does not fit the "
            f"model's {context}-token context. Shorten it.)\n"
        )
        return "", history[:-1]
    device = next(model.parameters()).device
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=loaded.end_ids,
        pad_token_id=tok.pad_token_id,
        streamer=_streamer(tok, out),
    )
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=0.9)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        generated = model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            **kwargs,
        )
    out.write("\n")
    answer = tok.decode(
        cut_at_end(generated[0, len(ids) :].tolist(), loaded.end_ids, tok.pad_token_id), skip_special_tokens=True
    )
    return answer.strip(), history


class Session:
    """What the REPL remembers: the conversation, system message and tools, and whether a call awaits its result."""

    def __init__(self, system: str | None, tools: dict | None):
        self.system, self.tools, self.history, self.awaiting_result = system, tools, [], False

    def command(self, text: str, out: TextIO) -> bool:
        """Handle a /command; False to leave the chat."""
        if text in ("/exit", "/quit"):
            return False
        if text == "/reset":
            self.history, self.awaiting_result = [], False
            out.write("(conversation cleared)\n")
        elif text == "/system" or text.startswith("/system "):
            self.system = text[len("/system") :].strip() or None
            self.history, self.awaiting_result = [], False
            out.write(f"(system message {'set' if self.system else 'removed'}; conversation cleared)\n")
        else:
            out.write(f"(unknown command {text.split()[0]}) {HELP}\n")
        return True

    def answered(self, answer: str, out: TextIO) -> None:
        """Keep the answer; a tool call is printed as {"name", "arguments"} and waits for its result."""
        call, problem = parse_tool_call(answer) if self.tools else (None, None)
        if call is not None:
            out.write(
                f"tool call: {json.dumps(call, ensure_ascii=False)}\n(paste the tool's result as the next line)\n"
            )
            self.history = self.history + [call_message(call)]
            self.awaiting_result = True
            return
        if problem:
            out.write(f"(the answer looks like a tool call but cannot be read: {problem})\n")
        self.history = self.history + [{"role": "assistant", "content": answer}]


def chat(
    target: str,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    input_stream: TextIO | None = None,
    output: TextIO | None = None,
    loaded=None,
    tools_file: str | None = None,
) -> None:
    """Read user turns from INPUT_STREAM (stdin) until /exit or end of input; stream answers to OUTPUT."""

    inp = input_stream or sys.stdin
    out = output or sys.stdout
    tools = read_tools_file(tools_file) if tools_file else None  # a bad file fails before the model loads
    loaded = loaded or load_for_inference(target)
    session = Session(system if system is not None else loaded.system_prompt, tools)
    out.write(f"lorafit chat: {target} ({loaded.kind}, {loaded.template} format). {HELP}\n")
    if session.system:
        out.write(f"(system: {session.system})\n")
    if tools:
        names = [tool_name(t) for t in tools["tools"] or []] + list(tools["builtin_tools"] or [])
        out.write(f"(tools: {', '.join(names)})\n")
    while True:
        out.write("\nresult> " if session.awaiting_result else "\n>>> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input (Ctrl-D or a finished pipe)
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not session.command(text, out):
                break
            continue
        role = "tool" if session.awaiting_result else "user"
        session.awaiting_result = False
        session.history = session.history + [{"role": role, "content": text}]
        answer, session.history = reply(
            loaded, session.history, session.system, max_new_tokens, temperature, out, tools
        )
        if session.history and session.history[-1]["role"] in ("user", "tool"):
            session.answered(answer, out)
