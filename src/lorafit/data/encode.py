"""Turn normalised rows into (input_ids, labels): labels are -100 where no loss is taken.

Masks come from token ids, never from searching decoded text: the conversation is rendered, and so are
its prefixes up to each assistant turn (with and without the generation prompt). The character offsets
of those prefixes cut the rendered text into segments that are tokenized separately, so every token
belongs to exactly one segment and each assistant segment is known to be trained or not. This is also
how inference sees the text: the prompt (up to the generation prompt) is tokenized on its own, and the
answer follows. Each trained turn keeps its end-of-turn token; anything the template writes after it
(ChatML's newline) is not trained.
"""

from __future__ import annotations

import json
import re

from lorafit.data.special_tokens import (
    IGNORE_INDEX,
    adds_bos,
    special_token_strings,
    text_end_id,
    with_bos,
)
from lorafit.data.templates import end_of_turn_ids, render, with_system
from lorafit.errors import DataError
from lorafit.hf_compat import compile_chat_template


class Encoder:
    """Tokenizes batches of normalised rows. Picklable, so `datasets.map(num_proc=N)` can ship it."""

    def __init__(
        self,
        tokenizer,
        template: str,
        train_on: str = "assistant",
        system_prompt: str | None = None,
        tools_in_user_message: bool = True,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.system_prompt = system_prompt
        self.tools_in_user_message = tools_in_user_message
        self.bos = adds_bos(tokenizer)
        self.end_ids = set(end_of_turn_ids(tokenizer, template)) if template else set()
        self.text_end = text_end_id(tokenizer)
        self._special = dict(tokenizer.special_tokens_map)
        self._jinja = self._fast_jinja()
        specials = sorted(special_token_strings(tokenizer), key=len, reverse=True)
        self._special_firsts = "".join(sorted({t[0] for t in specials}))
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def __getstate__(self):  # compiled jinja templates do not pickle; datasets ships the encoder to workers
        state = dict(self.__dict__)
        state["_jinja"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._jinja = self._fast_jinja()

    def render(self, messages: list[dict], add_generation_prompt: bool, tools: dict | None = None) -> str:
        if tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):  # tool rows: see tool_render.py
            return render(
                self.tokenizer, messages, self.template, add_generation_prompt, tools, self.tools_in_user_message
            )
        if self._jinja is not None:
            return self._jinja.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special,
            )
        return render(self.tokenizer, messages, self.template, add_generation_prompt)

    def _fast_jinja(self):
        """The compiled chat template, rendered directly: apply_chat_template costs ~0.5 ms of checks per call,
        which dominates at a million rows. Used only if it renders a probe exactly like apply_chat_template."""
        if self.template != "model":
            return None
        try:
            compiled = compile_chat_template(self.tokenizer.chat_template)
            probe = [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
            for gen, msgs in ((False, probe), (True, probe[:2])):
                fast = compiled.render(
                    messages=msgs, tools=None, documents=None, add_generation_prompt=gen, **self._special
                )
                if fast != render(self.tokenizer, msgs, self.template, gen):
                    return None
            return compiled
        except Exception:  # any change in transformers' internals: use the public path
            return None

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special-token insertion, through the Rust tokenizer directly when there is one."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def special_text(self, messages: list[dict] | None, text: str | None) -> str:
        """The first special-token string written literally in the data ('' if none). The tokenizer turns such
        text into the special token itself: a `<|eot_id|>` inside an answer ends the turn early in training."""
        if self._special_re is None:
            return ""
        for content in [_text_of(m) for m in messages] if messages else [text or ""]:
            if any(c in content for c in self._special_firsts):  # cheap pre-check: most text has no `<`
                found = self._special_re.search(content)
                if found:
                    return found.group(0)
        return ""

    # -- one conversation -------------------------------------------------------------------------
    def segments(self, messages: list[dict], tools: dict | None = None) -> list[tuple[str, bool]]:
        """(text, trained) pieces whose concatenation is the rendered conversation."""
        messages = with_system(messages, self.system_prompt)
        full = self.render(messages, False, tools)
        if self.train_on == "all":
            return [(full, True)]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        pieces, cursor = [], 0
        for i in turns:
            start = self.render(messages[:i], True, tools)
            end = full if i == len(messages) - 1 else self.render(messages[: i + 1], False, tools)
            if not (full.startswith(start) and full.startswith(end) and cursor <= len(start) < len(end)):
                raise DataError(
                    "the chat template does not render a conversation as the sum of its prefixes, so assistant "
                    "turns cannot be located for masking.",
                    "Use `data.template: llama3` or `train_on: all`.",
                )
            pieces += [(full[cursor : len(start)], False), (full[len(start) : len(end)], True)]
            cursor = len(end)
        pieces.append((full[cursor:], False))
        return [(t, trained) for t, trained in pieces if t]

    def encode_batch(
        self, messages_list: list, texts: list, tools_list: list | None = None
    ) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per row; all segments of the batch go through the tokenizer in one call."""
        plan, flat = [], []
        for messages, text, tools in zip(messages_list, texts, tools_list or [None] * len(texts)):
            if messages:
                segs = self.segments(messages, tools)
                plan.append(("chat", len(flat), segs))
                flat += [t for t, _ in segs]
            else:
                plan.append(("text", len(flat), None))
                flat.append(text)
        encoded = self.encode_texts(flat) if flat else []
        out = []
        for kind, at, segs in plan:
            if kind == "text":
                ids = with_bos(self.tokenizer, encoded[at], self.bos) + [self.text_end]
                labels = list(ids)
            else:
                ids, labels = [], []
                for k, (_, trained) in enumerate(segs):
                    piece = encoded[at + k]
                    ids += piece
                    labels += self._trained_labels(piece) if trained else [IGNORE_INDEX] * len(piece)
                bos = with_bos(self.tokenizer, ids, self.bos)
                ids, labels = bos, [IGNORE_INDEX] * (len(bos) - len(ids)) + labels
            if labels:
                labels[0] = (
                    IGNORE_INDEX  # never predicted; in a packed row it would be predicted from the previous sample
                )
            out.append((ids, labels))
        return out

    def _trained_labels(self, piece: list[int]) -> list[int]:
        """Train up to and including the last end-of-turn token; what follows it is template glue."""
        if self.train_on == "all":
            return list(piece)
        last = max((k for k, t in enumerate(piece) if t in self.end_ids), default=len(piece) - 1)
        return list(piece[: last + 1]) + [IGNORE_INDEX] * (len(piece) - last - 1)


def _text_of(message: dict) -> str:
    """Everything of a message the tokenizer reads: its content and, for a call, the call's name and arguments."""
    content = message["content"]
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    for call in message.get("tool_calls") or []:
        text += json.dumps(call["function"], ensure_ascii=False)
    return text


def fit_length(ids: list[int], labels: list[int], max_length: int, truncation: str) -> tuple[list[int], list[int], str]:
    """Apply the length policy: (ids, labels, status) with status ok, truncated, too_long or no_trained."""
    status = "ok"
    if len(ids) > max_length:
        if truncation != "right":
            return [], [], "too_long"
        ids, labels, status = ids[:max_length], labels[:max_length], "truncated"
    if not any(t != IGNORE_INDEX for t in labels):
        return [], [], "no_trained"
    return ids, labels, status


def token_features(extra: dict | None = None):
    """int32 token columns: half the disk and page cache of datasets' default int64."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")), **(extra or {})})


def tokenize_rows(batch: dict, encoder: Encoder, max_length: int, truncation: str) -> dict:
    """`datasets.map(batched=True)` function: normalised rows -> token columns + status for the report.

    length = tokens before the length policy; n_tokens = after it (0 when dropped)."""
    messages = [json.loads(m) if m else None for m in batch["messages"]]
    tools = [json.loads(t) if t else None for t in batch.get("tools") or [None] * len(messages)]
    out = {
        "input_ids": [],
        "labels": [],
        "length": [],
        "n_tokens": [],
        "trained": [],
        "status": [],
        "digest": [],
        "special": [encoder.special_text(m, t) for m, t in zip(messages, batch["text"])],
    }
    for ids, labels in encoder.encode_batch(messages, batch["text"], tools):
        full_length = len(ids)
        out["digest"].append(hash(tuple(ids)))  # exact-duplicate detection (int hashing is not salted per process)
        ids, labels, status = fit_length(ids, labels, max_length, truncation)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(full_length)
        out["n_tokens"].append(len(ids))
        out["trained"].append(sum(1 for t in labels if t != IGNORE_INDEX))
        out["status"].append(status)
    return out
