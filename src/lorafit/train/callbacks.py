"""Trainer callbacks: token counting, metrics.jsonl, live progress, the NaN guard and clean stops on signals.

Each is a plain `TrainerCallback`; the Trainer subclass in train.py only feeds them what callbacks cannot
see (the tokens of each micro-batch, the loss of each micro-step).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from lorafit.rundir import write_text_atomic

log = logging.getLogger("lorafit")


class TokenCounter:
    """Real (non-pad) and trained tokens seen in training, counted by the trainer's loss step.

    Under DDP/FSDP each rank counts its own micro-batches; `sync` (every optimizer step, on every rank) adds
    them up, so totals and the rate are those of the whole job. Totals survive a resume (restored from the
    checkpoint manifest); the rate counts this session only.
    """

    def __init__(self) -> None:
        self.real = 0
        self.trained = 0
        self._pending = [0, 0]  # this rank's counts not yet summed over ranks
        self._session_start_real = 0
        self.started: float | None = None

    def restore(self, real: int, trained: int) -> None:
        self.real, self.trained = int(real), int(trained)
        self._session_start_real = self.real

    def add(self, inputs: dict, pad_id: int | None) -> None:
        if self.started is None:
            self.started = time.time()
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == ids.dim():
            self._pending[0] += int(mask.sum())
        else:  # packed rows carry no padding mask; pad tokens are the only non-real ones
            self._pending[0] += int(ids.numel() if pad_id is None else ids.ne(pad_id).sum())
        self._pending[1] += int(inputs["labels"][..., 1:].ne(-100).sum())
        if not _distributed():
            self.sync()

    def sync(self) -> None:
        """Fold the counts since the last sync into the totals, summed over all ranks (a collective call)."""
        real, trained = over_ranks(self._pending, "sum")
        self.real += real
        self.trained += trained
        self._pending = [0, 0]

    def per_second(self) -> float:
        if self.started is None:
            return 0.0
        return (self.real - self._session_start_real) / max(time.time() - self.started, 1e-9)

    def state(self) -> dict:
        return {"tokens": self.real, "trained_tokens": self.trained}


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def over_ranks(values: list[int], op: str) -> list[int]:
    """`values` summed ("sum") or maxed ("max") over all ranks; as they are in a single process.
    A collective call under DDP/FSDP: every rank must make it at the same point."""
    if not _distributed():
        return list(values)
    import torch
    import torch.distributed as dist

    nccl = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()  # NCCL reduces CUDA tensors only
    tensor = torch.tensor(
        values, dtype=torch.int64, device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
    )
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]


class MetricsCallback(TrainerCallback):
    """One JSON object per log event (training steps and evaluations), appended as they happen."""

    KEYS = ("loss", "learning_rate", "grad_norm")
    # DPO's (TRL's names -> ours): the implicit rewards beta * log(policy / reference) of each side, their margin,
    # and the share of pairs where chosen out-scores rejected. Other TRL diagnostics (logps/, logits/) keep their
    # names with `_` for `/`.
    PREFERENCE = {
        "rewards/chosen": "rewards_chosen",
        "rewards/rejected": "rewards_rejected",
        "rewards/margins": "reward_margin",
        "rewards/accuracies": "preference_accuracy",
    }

    def __init__(self, path: Path, tokens: TokenCounter, enabled: bool = True):
        self.path = Path(path)
        self.tokens = tokens
        self.enabled = enabled
        self.failed = False

    def truncate_after(self, step: int) -> None:
        """On resume: forget records past the checkpoint, so the curve continues without duplicates."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _step_of(line) <= step
        ]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def on_step_end(self, args, state, control, **kwargs):
        self.tokens.sync()  # on every rank, enabled or not: it is a collective call under DDP/FSDP

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key, value in logs.items():
            plain = key.removeprefix("eval_")
            if plain in self.PREFERENCE:
                key = key[: len(key) - len(plain)] + self.PREFERENCE[plain]
            elif key.startswith("eval_"):
                key = key.replace("/", "_")
            if (
                key in self.KEYS
                or key.endswith(tuple(self.PREFERENCE.values()))
                or (key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")))
            ):
                # NaN/inf are not JSON: a bad step is logged as null (and named by the NaN guard's warning)
                record[key] = value if not isinstance(value, float) or math.isfinite(value) else None
        if "loss" in logs:
            record.update(self.tokens.state())
            record["tokens_per_second"] = round(self.tokens.per_second(), 1)
        if len(record) <= 2:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: keep training; the next checkpoint save reports it clearly
            if not self.failed:
                log.warning("could not append to %s: %s; metrics are not being recorded", self.path, err)
            self.failed = True


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # unreadable line (a killed writer): drop it


class ProgressCallback(TrainerCallback):
    """Live progress: a rich bar on a terminal, or one plain line per log event (`--quiet`, or not a terminal)."""

    def __init__(self, tokens: TokenCounter, mode: str = "auto", enabled: bool = True):
        self.tokens = tokens
        self.mode = "off" if not enabled else ("bar" if sys.stderr.isatty() else "lines") if mode == "auto" else mode
        self.progress = None
        self.task = None
        self.last: dict = {}
        self.t0 = 0.0
        self.step0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0 = time.time(), state.global_step
        if self.mode != "bar" or not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            shown = ("loss", "learning_rate", "eval_loss", "rewards/accuracies", "rewards/margins")
            self.last.update({k: v for k, v in logs.items() if k in shown})
        if self.progress is not None:
            self.progress.update(self.task, info=self._info())
        elif self.mode == "lines" and logs and state.is_world_process_zero and ("loss" in logs or "eval_loss" in logs):
            log.info("step %d/%d  %s  eta %s", state.global_step, state.max_steps, self._info(), self._eta(state))

    def _eta(self, state) -> str:
        done = state.global_step - self.step0
        if done <= 0:
            return "?"
        left = (time.time() - self.t0) / done * (state.max_steps - state.global_step)
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def _info(self) -> str:
        parts = []
        if "loss" in self.last:
            parts.append(f"loss {self.last['loss']:.4f}")
        if "eval_loss" in self.last:
            parts.append(f"eval {self.last['eval_loss']:.4f}")
        if "rewards/accuracies" in self.last:  # DPO: preference accuracy and reward margin of the last steps
            parts.append(f"acc {self.last['rewards/accuracies']:.2f}  margin {self.last['rewards/margins']:.3f}")
        if "learning_rate" in self.last:
            parts.append(f"lr {self.last['learning_rate']:.2e}")
        parts.append(f"{self.tokens.per_second():,.0f} tok/s")
        return "  ".join(parts)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class NanGuard(TrainerCallback):
    """Skip optimizer steps whose loss or gradients are NaN/inf; stop after `max_bad` in a row.

    A skipped step leaves the weights and optimizer state untouched (grads are dropped, and torch optimizers
    skip parameters without a gradient), so one bad batch does not poison the run. With fp16 the grad scaler
    already skips overflowing steps and lowers its scale, so only the loss is checked there.

    The gradients are judged by the norm the Trainer computes anyway (for clipping and the log), which
    `GuardedGradNorm` hands over: the norm is NaN/inf exactly when a gradient is (or when finite gradients are so
    large that their squares overflow: no usable step either). Where no norm came (DeepSpeed keeps the gradients
    inside its engine, which steps within accelerate's backward), every gradient is checked, as before; that check
    took ~3% of a CPU step of the embedded model (400+ LoRA tensors, five small ops each).
    """

    def __init__(self, max_bad: int):
        self.max_bad = max_bad
        self.bad_in_row = 0
        self.first_bad_step: int | None = None
        self.failed: dict | None = None  # {"step", "first_step", "reason"} once training was stopped
        self._loss_bad = None  # tensor flag over this step's micro-batches (no device sync per micro-step)
        self._grad_norm = None  # this step's gradient norm, from GuardedGradNorm

    def observe_grad_norm(self, norm) -> None:
        self._grad_norm = norm

    def observe_loss(self, loss) -> None:
        import torch

        flag = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = flag if self._loss_bad is None else (self._loss_bad | flag)

    def _grads_bad(self, args, model) -> bool:
        import torch

        norm, self._grad_norm = self._grad_norm, None
        if args.fp16 or model is None:  # fp16: the grad scaler skips overflowing steps itself
            return False
        if norm is not None:
            return not math.isfinite(float(norm))
        grads = [p.grad.detach().isfinite().all() for p in model.parameters() if p.grad is not None]
        return bool(grads) and not bool(torch.stack(grads).all())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        loss_bad = bool(self._loss_bad) if self._loss_bad is not None else False
        self._loss_bad = None
        grads_bad = self._grads_bad(args, model)
        step = state.global_step + 1  # the step being taken
        if not (loss_bad or grads_bad):
            self.bad_in_row = 0
            return
        for p in model.parameters() if model is not None else ():
            p.grad = None
        self.bad_in_row += 1
        if self.bad_in_row == 1:
            self.first_bad_step = step
        reason = "loss" if loss_bad else "gradients"
        log.warning(
            "step %d: %s is NaN/inf; the update was skipped (%d/%d in a row)",
            step,
            reason,
            self.bad_in_row,
            self.max_bad,
        )
        if self.bad_in_row >= self.max_bad:
            self.failed = {"step": step, "first_step": self.first_bad_step, "reason": reason}
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.bad_in_row:  # never checkpoint a step that went bad: the last good checkpoint stays the newest
            control.should_save = False
        if self.failed is not None:
            control.should_evaluate = False


class GuardedGradNorm:
    """Trainer mixin: hands the gradient norm the Trainer computed to its `nan_guard` (NanGuard's doc says why)."""

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if not getattr(self, "is_deepspeed_enabled", False):  # DeepSpeed steps inside backward (accelerate)
            self.nan_guard.observe_grad_norm(grad_norm)
        return grad_norm


class StopOnSignal(TrainerCallback):
    """SIGTERM (preemption) or SIGINT (Ctrl-C): finish the current step, save a checkpoint, stop.

    A second signal is not caught: Ctrl-C twice exits at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: the user means it
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning(
            "%s received: saving a checkpoint after this step, then stopping (send it again to stop now)",
            signal.Signals(signum).name,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # a preempted machine has seconds, not minutes

    def _agreed(self) -> bool:
        """Every rank must stop at the same step, or the others wait forever in the next all-reduce."""
        stop = over_ranks([int(self.received is not None)], "max")[0] > 0
        if stop and self.received is None:  # another rank was signalled
            self.received = signal.SIGTERM
        return stop

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class KeepBestAdapter(TrainerCallback):
    """With early stopping, the adapter to keep is the best evaluated one, not the last: copy it on improvement."""

    def __init__(self, metric: str = "eval_loss"):
        self.metric = metric
        self.best: float | None = None
        self.best_step: int | None = None
        self.weights: dict | None = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or not math.isfinite(value) or (self.best is not None and value >= self.best):
            return
        from peft import get_peft_model_state_dict

        self.best, self.best_step = value, state.global_step
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}

    def restore(self, model) -> int | None:
        """Load the best weights back into `model`; returns their step (None if nothing was kept)."""
        if self.weights is None:
            return None
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, self.weights)
        return self.best_step
