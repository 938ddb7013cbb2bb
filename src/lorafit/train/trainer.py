"""lorafit's Trainer: transformers' Trainer with four small changes, each tested.

- `compute_loss`: the memory-lean loss of loss.py, normalised by the trained tokens of the whole optimizer
  step, so gradient accumulation is exact (tests/test_train.py compares 1x4 with 4x1);
- `training_step`: hands each micro-step's loss to the NaN guard (callbacks.NanGuard), and `_get_grad_norm`
  (callbacks.GuardedGradNorm) each step's gradient norm;
- `log`: adds validation perplexity next to validation loss;
- `_save_checkpoint` (checkpoints.AtomicCheckpoints): a checkpoint is renamed into place only when complete.
Everything else (evaluation, early stopping, signals, progress, metrics) is a callback.

This module imports transformers at the top: only `lorafit train` and the tests load it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from lorafit.config import RunConfig
from lorafit.hf_compat import check_trainer
from lorafit.metrics import perplexity
from lorafit.runtime import fsdp_size, resolve_precision
from lorafit.train.callbacks import GuardedGradNorm, NanGuard, TokenCounter
from lorafit.train.checkpoints import AtomicCheckpoints, staging_dir
from lorafit.train.loss import trainer_compute_loss
from lorafit.train.schedule import BASE_RATE, Schedule, resolve_learning_rate


class LorafitTrainer(AtomicCheckpoints, GuardedGradNorm, Trainer):
    """Trainer plus lorafit's loss, NaN guard, perplexity and atomic checkpoints; settings come in `__init__`."""

    def __init__(
        self,
        *args,
        loss_mode: str,
        pad_token_id: int,
        tokens: TokenCounter,
        nan_guard: NanGuard,
        checkpoint_dir: Path,
        checkpoint_keep: int | None,
        **kwargs,
    ):
        check_trainer()
        self.loss_mode = loss_mode  # chunked | plain | liger (loss.MODES)
        self.pad_token_id = pad_token_id  # pads are not counted as real tokens
        self.tokens = tokens  # real and trained tokens seen, summed over ranks
        self.nan_guard = nan_guard
        self.checkpoint_dir = Path(checkpoint_dir)  # where complete checkpoints live (run_dir/checkpoints)
        self.checkpoint_keep = checkpoint_keep
        self.checkpoint_extra = tokens.state  # stored in each manifest, for an exact resume of the counters
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("seq_lengths", None)
        if model.training:
            self.tokens.add(inputs, self.pad_token_id)
        return trainer_compute_loss(self, model, inputs, return_outputs, num_items_in_batch, self.loss_mode)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nan_guard.observe_loss(loss)
        return loss

    def log(self, logs, start_time=None):
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        super().log(logs, start_time)


def optimizer_name(setting: str) -> str:
    """transformers' name for the config's optimizer. `adamw_torch` runs torch's fused AdamW kernel (transformers'
    own default since torch 2.8; on CPU since torch 2.4): the same update as the loop over tensors, in one kernel
    for all the LoRA tensors instead of ~10 small ops each (the embedded SmolLM2's 420 LoRA tensors on 2 CPU cores:
    52 ms a step for the loop, 10 ms fused)."""
    return "adamw_torch_fused" if setting == "adamw_torch" else setting


def training_arguments(
    cfg: RunConfig, run_dir: Path, has_eval: bool, schedule: Schedule | None = None
) -> TrainingArguments:
    return TrainingArguments(**training_argument_values(cfg, run_dir, has_eval, schedule))


def training_argument_values(cfg: RunConfig, run_dir: Path, has_eval: bool, schedule: Schedule | None = None) -> dict:
    """The TrainingArguments of a run as keywords (TRL's configs for DPO extend them). `schedule`
    (train/schedule.py): the optimizer steps and the learning rate the run takes."""
    t = cfg.training
    precision = resolve_precision(t.precision)
    on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    evaluate_steps = has_eval and t.eval_every > 0
    early = t.early_stopping_patience is not None
    return dict(
        output_dir=str(staging_dir(run_dir / "checkpoints")),  # checkpoints are sealed and moved out (checkpoints.py)
        num_train_epochs=t.epochs,
        max_steps=schedule.steps if schedule else t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=(schedule.learning_rate if schedule else None)
        or resolve_learning_rate(t.learning_rate, None)[0]
        or BASE_RATE,  # no schedule (bench/gpu.py, main_process_first): the set rate, or auto's at hidden size 4096
        lr_scheduler_type=t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        optim=optimizer_name(t.optimizer),
        max_grad_norm=t.max_grad_norm,  # 0 = no clipping
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # On CPU: transformers refuses bf16 without a GPU unless told, and under torchrun accelerate only sets up
        # DDP over gloo (MULTI_CPU) when told it is on CPU; otherwise every rank trains alone on all the data.
        use_cpu=on_cpu,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN step must show in the logs, not be replaced by an average
        eval_strategy="steps" if evaluate_steps else "no",
        eval_steps=t.eval_every if evaluate_steps else None,
        prediction_loss_only=True,  # evaluation needs the loss only; never gather logits
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        restore_callback_states_from_checkpoint=early,  # the early-stopping patience counter survives a resume
        save_strategy="steps" if t.save_every > 0 else "no",
        save_steps=t.save_every if t.save_every > 0 else None,
        save_total_limit=None,  # we rotate ourselves, counting complete checkpoints only
        save_only_model=fsdp_size() > 1,  # sharded at load: checkpoints.save_training_state writes the rest
        load_best_model_at_end=False,  # callbacks.KeepBestAdapter does it without extra checkpoints
        report_to=list(t.report_to) or "none",
        remove_unused_columns=False,  # our collator needs seq_lengths; Trainer would drop it
        dataloader_num_workers=0,
        disable_tqdm=True,  # our own progress display
        ddp_find_unused_parameters=False,
    )


@contextmanager
def main_process_first(cfg: RunConfig, run_dir: Path):
    """Under torchrun/accelerate each node's main process prepares the data first; the other ranks then read its
    Arrow cache instead of tokenizing the same rows at once (ranks x num_proc workers) and racing on the cache files.

    TrainingArguments sets the process group up exactly as the Trainer will (backend, CPU or GPU), and its barrier
    sits in a `finally`: when the main process fails on bad data, the others are released and fail the same way."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    with training_arguments(cfg, run_dir, has_eval=False).main_process_first(desc="data preparation"):
        yield


@contextmanager
def tensorboard_dir(path: Path):
    """TensorBoard's callback reads its folder from the environment when the Trainer is built: the run's own,
    unless the user chose one (never inside checkpoints/, which is staged and rotated)."""
    key, previous = "TENSORBOARD_LOGGING_DIR", os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ[key] = previous or str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
