"""The Chat view: one run's base model and tuned model answer the same conversation, streamed token by token.

The model is loaded once per run with the adapter kept separate (not merged): the tuned answer is the PEFT model,
the base answer the same model inside `disable_adapter()`. Answers come from inference/chat.py's `reply`, so the
prompt format, system prompt and stopping rule are the ones `lorafit chat` uses.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

from lorafit.errors import DataError
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
    if not isinstance(history, list) or not history:
        raise DataError("`history` must be a non-empty list of {role, content} messages.")
    for m in history:
        if not (
            isinstance(m, dict) and m.get("role") in ("user", "assistant", "tool") and isinstance(m.get("content"), str)
        ):
            raise DataError("every message needs a `role` (user, assistant or tool) and a string `content`.")
    if history[-1]["role"] not in ("user", "tool"):
        raise DataError("the conversation must end with a user (or tool) message to answer.")
    return history


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
        with self.lock:
            loaded = self._get(name)
        return {"name": name, "system": loaded.system_prompt or "", "template": loaded.template}

    def stream(self, name: str, side: str, history, system: str | None, max_new_tokens: int) -> Iterator[str]:
        """NDJSON lines: {"text": ...} as tokens arrive, then {"done": true, "answer", "tool_call"}."""
        if side not in SIDES:
            raise DataError(f"`side` must be base or tuned, got {side!r}.")
        history = check_history(history)
        run_path(self.runs, name)  # refuse an unknown run before starting a thread
        q: queue.Queue = queue.Queue()
        worker = threading.Thread(
            target=self._answer, args=(name, side, history, system, max_new_tokens, q), daemon=True
        )
        worker.start()
        return _drain(q)

    def _answer(self, name, side, history, system, max_new_tokens, q: queue.Queue) -> None:
        from lorafit.inference.chat import reply
        from lorafit.inference.tool_calls import parse_tool_call

        try:
            with self.lock:
                loaded = self._get(name)
                adapter_off = loaded.model.disable_adapter() if side == "base" else nullcontext()
                with adapter_off:
                    answer, _ = reply(loaded, history, system or None, max_new_tokens, 0.0, _QueueOut(q))
            call, problem = parse_tool_call(answer)
            q.put(("end", {"done": True, "side": side, "answer": answer, "tool_call": call, "tool_problem": problem}))
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
