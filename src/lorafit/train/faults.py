"""Runtime faults as messages a user can act on: NaN/inf steps, out of memory, an interrupting signal.

Each names the step, what is still safe on disk (the last complete checkpoint) and what to change. Write
failures (full disk, unwritable folder) are in checkpoint.save_error, next to the saves they guard.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from lorafit.config import RunConfig
from lorafit.errors import TrainingError
from lorafit.plan.planner import suggest_for_oom
from lorafit.runtime import resolve_precision
from lorafit.train.checkpoints import complete_checkpoints

log = logging.getLogger("lorafit")


def last_checkpoint_sentence(checkpoints: Path) -> str:
    done = complete_checkpoints(checkpoints)
    return f"The last good checkpoint is {done[-1]}." if done else "No checkpoint had been written yet."


def nan_error(failed: dict, cfg: RunConfig, checkpoints: Path) -> TrainingError:
    t = cfg.training
    causes = [f"a learning rate too high for this model (training.learning_rate={t.learning_rate:g}; try 10× lower)"]
    if resolve_precision(t.precision) == "fp16":
        causes.append("fp16 overflow (use training.precision=bf16 on GPUs that have it, or fp32)")
    if t.max_grad_norm == 0:
        causes.append("no gradient clipping (training.max_grad_norm=0; 1.0 is the usual value)")
    causes.append("a broken sample (check the data with `lorafit data check`)")
    return TrainingError(
        f"training stopped at step {failed['step']}: {t.max_bad_steps} optimizer step(s) in a row (from step "
        f"{failed['first_step']}) had a NaN/inf {failed['reason']}; those updates were skipped. "
        f"{last_checkpoint_sentence(checkpoints)} Likely causes: " + "; ".join(causes) + ".",
        "Fix the cause, then start again, or continue from the last checkpoint with `--resume`.",
    )


def interrupted_error(signum: int, step: int, checkpoints: Path) -> TrainingError:
    done = complete_checkpoints(checkpoints)
    where = f"checkpoint saved at {done[-1]}" if done else "no checkpoint could be saved"
    err = TrainingError(
        f"training interrupted by {signal.Signals(signum).name} at step {step}; {where}.",
        "Continue with the same command plus --resume: `lorafit train CONFIG --resume`.",
    )
    err.exit_code = 128 + signum  # the shell convention for "killed by this signal"
    return err


def oom_error(err: BaseException, cfg: RunConfig, where: str, checkpoints: Path) -> TrainingError:
    """`where`: what ran out of memory, e.g. "step 12" or "the final evaluation"."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    advice = planner_advice(cfg) or generic_oom_advice(cfg)
    first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else "out of memory"
    return TrainingError(
        f"out of GPU memory during {where} ({first_line}). {last_checkpoint_sentence(checkpoints)}",
        "To fit this run:\n" + advice,
    )


def planner_advice(cfg: RunConfig) -> str | None:
    """The memory planner's suggestion for this config; None if it has none or fails (advice never hides the error)."""

    try:
        text = suggest_for_oom(cfg)
    except Exception as err:
        log.debug("planner failed: %s", err)
        return None
    return str(text) if text else None


def generic_oom_advice(cfg: RunConfig) -> str:
    t, tips = cfg.training, []
    if cfg.model.quantization == "none":
        tips.append("QLoRA: model.quantization=4bit (the frozen base in 4-bit NF4, about a quarter of the memory)")
    if not t.gradient_checkpointing:
        tips.append("training.gradient_checkpointing=true (recompute activations in backward)")
    if t.micro_batch_size > 1:
        tips.append(
            f"training.micro_batch_size={max(1, t.micro_batch_size // 2)} "
            f"training.gradient_accumulation={t.gradient_accumulation * 2} (same effective batch)"
        )
    tips.append(f"data.max_length={max(8, cfg.data.max_length // 2)} (shorter rows)")
    return (
        "\n".join(f"  - {tip}" for tip in tips)
        + "\n`lorafit plan CONFIG` estimates the memory of a config before you run it."
    )
