"""Trainer callbacks: metrics.jsonl and a live rich progress bar (step, loss, lr, tokens/s, ETA)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback


class TokenCounter:
    """Real (non-pad) and trained tokens seen in training, counted by the trainer's loss step."""

    def __init__(self) -> None:
        self.real = 0
        self.trained = 0
        self.started: float | None = None

    def add(self, inputs: dict, pad_id: int | None) -> None:
        if self.started is None:
            self.started = time.time()
        ids = inputs["input_ids"]
        self.real += int(ids.numel() if pad_id is None else ids.ne(pad_id).sum())
        self.trained += int(inputs["labels"][..., 1:].ne(-100).sum())

    def per_second(self) -> float:
        if self.started is None:
            return 0.0
        return self.real / max(time.time() - self.started, 1e-9)


class MetricsCallback(TrainerCallback):
    """One JSON object per log event: training steps and evaluations, appended as they happen."""

    def __init__(self, path: Path, tokens: TokenCounter, enabled: bool = True):
        self.path = Path(path)
        self.tokens = tokens
        self.enabled = enabled

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key, value in logs.items():
            if key in ("loss", "eval_loss", "learning_rate", "grad_norm", "eval_perplexity") or key.startswith("eval_"):
                record[key] = value
        if "loss" in logs:
            record["tokens"] = self.tokens.real
            record["trained_tokens"] = self.tokens.trained
            record["tokens_per_second"] = round(self.tokens.per_second(), 1)
        if len(record) <= 2:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class ProgressCallback(TrainerCallback):
    """A single live line: step/total, loss, learning rate, tokens/s and ETA."""

    def __init__(self, tokens: TokenCounter, enabled: bool = True):
        self.tokens = tokens
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.last: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.last.update({k: v for k, v in logs.items() if k in ("loss", "learning_rate", "eval_loss")})
        if self.progress is not None:
            self.progress.update(self.task, info=self._info())

    def _info(self) -> str:
        parts = []
        if "loss" in self.last:
            parts.append(f"loss {self.last['loss']:.4f}")
        if "eval_loss" in self.last:
            parts.append(f"eval {self.last['eval_loss']:.4f}")
        if "learning_rate" in self.last:
            parts.append(f"lr {self.last['learning_rate']:.2e}")
        parts.append(f"{self.tokens.per_second():,.0f} tok/s")
        return "  ".join(parts)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
