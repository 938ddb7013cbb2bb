"""The Chat view: one run's base model and tuned model answer the same conversation, streamed token by token.

The model is loaded once per run with the adapter kept separate (not merged): the tuned answer is the PEFT model,
the base answer the same model inside `disable_adapter()`. Answers come from inference/chat.py's `reply`, so the
prompt format, system prompt and stopping rule are the ones `lorafit chat` uses; tools (a file's path or pasted
JSON, checked as `lorafit chat --tools FILE` checks its file) are rendered into the prompt the same way too.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

from lorafit.data.tools import tool_name
from lorafit.errors import DataError, LorafitError
from lorafit.inference.tool_calls import parse_tool_call, prompt_conversation, read_tools_file, tools_from_text
from lorafit.paths import user_path
from lorafit.ui.runs import run_path

SIDES = ("base", "tuned")


class _QueueOut:
    """The text stream `reply` writes to, feeding a queue the HTTP response reads."""

    def __init__(self, q: queue.Queue):
        self.q = q

    def write(self, text: str) -> int:
        if text:
            self.q.put(("text", text))
        return len(text)

    def flush(self) -> None:
        pass


def check_history(history) -> list[dict]:
    """The conversation to answer, normalised as training normalises turns (tool calls and results included)."""
    if not isinstance(history, list) or not history:
        raise DataError("`history` must be a non-empty list of {role, content} messages.")
    for m in history:
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant", "tool")):
            raise DataError("every message needs a `role` (user, assistant or tool) and a string `content`.")
    if history[-1]["role"] not in ("user", "tool"):
        raise DataError("the conversation must end with a user (or tool) message to answer.")
    return prompt_conversation(history, "`history`")


def load_tools(value, root: Path) -> dict | None:
    """The Chat view's tools box: empty (no tools), pasted JSON, or a JSON file's path (relative to ROOT), read and
    checked exactly as `lorafit chat --tools FILE` reads its file."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError("`tools` must be text: the path of a JSON file of tool schemas, or that JSON itself.")
    text = value.strip()
    if not text:
        return None
    if text[0] in "[{":
        return tools_from_text(text, "the pasted tools")
    path = user_path(text)
    path = path if path.is_absolute() else root / path
    try:
        return read_tools_file(str(path))
    except UnicodeDecodeError:
        raise DataError(f"tools file {path} is not UTF-8 text.", "Pass a JSON file of tool schemas.") from None


def tool_names(tools: dict | None) -> list[str]:
    """What the page lists under the tools box (the CLI prints the same line when it starts)."""
    if not tools:
        return []
    return [tool_name(t) or "?" for t in tools.get("tools") or []] + list(tools.get("builtin_tools") or [])


def training_tools(cfg) -> tuple[str, int]:
    """(the first tool row's tools as JSON text, how many different tool sets the rows offer) for a run trained on
    rows with `tools`; ("", 0) for a run trained without tools, or whose training data is no longer there."""
    from lorafit.data.sources import read_source, valid_rows

    if cfg is None or not cfg.data.train:
        return "", 0
    try:
        rows = valid_rows([read_source(s, i) for i, s in enumerate(cfg.data.train)])
        sets = list(dict.fromkeys(t for t in rows["tools"] if t))
    except (LorafitError, OSError, ValueError, KeyError):  # data moved or gone: the chat still works without
        return "", 0
    return (sets[0] if sets else ""), len(sets)


def end_message(side: str, answer: str) -> dict:
    """The stream's last line: the whole answer and, when it is a tool call, the call parsed as `lorafit chat` and
    `lorafit generate` parse it ({"name", "arguments"}), or why a call-like answer cannot be read."""
    call, problem = parse_tool_call(answer)
    return {"done": True, "side": side, "answer": answer, "tool_call": call, "tool_problem": problem}


class ChatModels:
    def __init__(self, runs: Path):
        self.runs = runs
        self.loaded: dict[str, object] = {}
        self.lock = threading.Lock()  # one generation at a time: base and tuned share the weights

    def _get(self, name: str):
        from lorafit.inference.generate import load_for_inference

        if name not in self.loaded:
            self.loaded[name] = load_for_inference(str(run_path(self.runs, name)), merge=False)
        return self.loaded[name]

    def info(self, name: str) -> dict:
        """The run's prompt settings; `tools`: what its training data offered (the page fills the tools box)."""
        with self.lock:
            loaded = self._get(name)
            tools, tool_sets = training_tools(loaded.cfg)
        return {
            "name": name,
            "system": loaded.system_prompt or "",
            "template": loaded.template,
            "tools": tools,
            "tool_sets": tool_sets,
        }

    def stream(
        self, name: str, side: str, history, system: str | None, max_new_tokens: int, tools: dict | None = None
    ) -> Iterator[str]:
        """NDJSON lines: {"text": ...} as tokens arrive, then `end_message`'s {"done": true, "answer", "tool_call"}."""
        if side not in SIDES:
            raise DataError(f"`side` must be base or tuned, got {side!r}.")
        history = check_history(history)
        run_path(self.runs, name)  # refuse an unknown run before starting a thread
        q: queue.Queue = queue.Queue()
        worker = threading.Thread(
            target=self._answer, args=(name, side, history, system, max_new_tokens, tools, q), daemon=True
        )
        worker.start()
        return _drain(q)

    def _answer(self, name, side, history, system, max_new_tokens, tools, q: queue.Queue) -> None:
        from lorafit.inference.chat import reply

        try:
            with self.lock:
                loaded = self._get(name)
                adapter_off = loaded.model.disable_adapter() if side == "base" else nullcontext()
                with adapter_off:
                    answer, _ = reply(loaded, history, system or None, max_new_tokens, 0.0, _QueueOut(q), tools)
            q.put(("end", end_message(side, answer)))
        except Exception as err:  # shown in the chat pane, not lost in a thread
            q.put(("end", {"done": True, "side": side, "error": f"{type(err).__name__}: {err}"}))


def _drain(q: queue.Queue) -> Iterator[str]:
    while True:
        kind, value = q.get()
        if kind == "text":
            yield json.dumps({"text": value}) + "\n"
        else:
            yield json.dumps(value) + "\n"
            return
