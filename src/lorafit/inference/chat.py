"""`lorafit chat`: a streaming multi-turn REPL on a run directory, a merged model folder or a GGUF file.

The prompt is rendered with the format training used (template, system prompt) and generation stops at
the end-of-turn token, so the conversation looks exactly like the training data did.
"""

from __future__ import annotations

import sys
from typing import TextIO

from lorafit.data.templates import encode_prompt, with_system
from lorafit.inference.generate import cut_at_end, load_for_inference

HELP = "Commands: /reset (forget the conversation), /system TEXT (set the system message), /exit."


def _streamer(tokenizer, out: TextIO):
    from transformers import TextStreamer

    class ToStream(TextStreamer):
        """TextStreamer prints to stdout; write to our stream instead (tests and pipes)."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text)
            out.flush()

    return ToStream(tokenizer, skip_prompt=True, skip_special_tokens=True)


def fit_history(tokenizer, history: list[dict], system: str | None, template: str, budget: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest exchanges until the prompt leaves room for the answer; (kept history, prompt ids)."""

    while True:
        ids = encode_prompt(tokenizer, with_system(history, system), template)
        if len(ids) <= budget or len(history) <= 1:
            return history, ids
        history = history[2:]  # one user turn and its answer


def reply(loaded, history: list[dict], system: str | None, max_new_tokens: int, temperature: float, out: TextIO) -> tuple[str, list[dict]]:
    """Stream the assistant's answer to the conversation; (answer, history actually kept)."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    context = getattr(model.config, "max_position_embeddings", None) or 4096
    history, ids = fit_history(tok, history, system, loaded.template, context - max_new_tokens)
    if len(ids) > context - max_new_tokens:
        out.write(f"(the message is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it does not fit the "
                  f"model's {context}-token context. Shorten it.)\n")
        return "", history[:-1]
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=loaded.end_ids, pad_token_id=tok.pad_token_id,
                  streamer=_streamer(tok, out))
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=0.9)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([ids], device=device),
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device), **kwargs)
    out.write("\n")
    answer = tok.decode(cut_at_end(generated[0, len(ids):].tolist(), loaded.end_ids, tok.pad_token_id), skip_special_tokens=True)
    return answer.strip(), history


def chat(target: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
         input_stream: TextIO | None = None, output: TextIO | None = None, loaded=None) -> None:
    """Read user turns from INPUT_STREAM (stdin) until /exit or end of input; stream answers to OUTPUT."""

    inp = input_stream or sys.stdin
    out = output or sys.stdout
    loaded = loaded or load_for_inference(target)
    system = system if system is not None else loaded.system_prompt
    out.write(f"lorafit chat: {target} ({loaded.kind}, {loaded.template} format). {HELP}\n")
    if system:
        out.write(f"(system: {system})\n")
    history: list[dict] = []
    while True:
        out.write("\n>>> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input (Ctrl-D or a finished pipe)
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            out.write("(conversation cleared)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            history = []
            out.write(f"(system message {'set' if system else 'removed'}; conversation cleared)\n")
            continue
        if text.startswith("/"):
            out.write(f"(unknown command {text.split()[0]}) {HELP}\n")
            continue
        history = history + [{"role": "user", "content": text}]
        answer, history = reply(loaded, history, system, max_new_tokens, temperature, out)
        if history and history[-1]["role"] == "user":
            history = history + [{"role": "assistant", "content": answer}]
