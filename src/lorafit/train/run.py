"""Training: data → model → transformers' Trainer → run directory. No home-made loop.

What we change in Trainer, each small and tested:
- `compute_loss`: the memory-lean loss of loss.py, normalised by the trained tokens of the whole optimizer
  step, so gradient accumulation is exact (tests/test_train.py compares 1×4 with 4×1);
- `training_step`: hands each micro-step's loss to the NaN guard (callbacks.NanGuard);
- `log`: adds validation perplexity next to validation loss;
- `_save_checkpoint` (checkpoint.AtomicCheckpoints): a checkpoint is renamed into place only when complete.
Everything else (evaluation, early stopping, signals, progress, metrics) is a callback.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import pickle
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from lorafit.config import RunConfig, dump_config
from lorafit.errors import ConfigError, RunDirError
from lorafit.report import data_line, summarize, summary_screen, write_report
from lorafit.rundir import create_run_dir, write_json, write_text_atomic
from lorafit.runtime import is_main_process, resolve_precision
from lorafit.train.callbacks import TokenCounter, perplexity

log = logging.getLogger("lorafit")



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


def _trainer_class():
    from transformers import Trainer

    from lorafit.train.checkpoints import AtomicCheckpoints
    from lorafit.train.loss import trainer_compute_loss

    class LorafitTrainer(AtomicCheckpoints, Trainer):
        loss_mode = "chunked"
        tokens: TokenCounter | None = None
        nan_guard = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            inputs.pop("seq_lengths", None)
            if model.training and self.tokens is not None:
                self.tokens.add(inputs, self.processing_class.pad_token_id)
            return trainer_compute_loss(self, model, inputs, return_outputs, num_items_in_batch, self.loss_mode)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.nan_guard is not None:
                self.nan_guard.observe_loss(loss)
            return loss

        def log(self, logs, start_time=None):
            if "eval_loss" in logs:
                logs["eval_perplexity"] = perplexity(logs["eval_loss"])
            super().log(logs, start_time)

    return LorafitTrainer



def training_arguments(cfg: RunConfig, run_dir: Path, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    from lorafit.train.checkpoints import staging_dir

    t = cfg.training
    precision = resolve_precision(t.precision)
    on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    evaluate_steps = has_eval and t.eval_every > 0
    early = t.early_stopping_patience is not None
    return TrainingArguments(
        output_dir=str(staging_dir(run_dir / "checkpoints")),  # checkpoints are sealed and moved out (checkpoint.py)
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        optim=t.optimizer,
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
        load_best_model_at_end=False,  # callbacks.KeepBestAdapter does it without extra checkpoints
        report_to=list(t.report_to) or "none",
        remove_unused_columns=False,  # our collator needs seq_lengths; Trainer would drop it
        dataloader_num_workers=0,
        disable_tqdm=True,  # our own progress display
        gradient_checkpointing=False,  # enabled on the model before PEFT wraps it (model.attach_lora)
        ddp_find_unused_parameters=False,
    )


def check_training_config(cfg: RunConfig, has_validation: bool) -> None:
    """Problems only visible once the data and the installed packages are known (before loading weights)."""
    import torch

    t, problems = cfg.training, []
    if resolve_precision(t.precision) == "fp16" and not torch.cuda.is_available():
        problems.append("`training.precision: fp16` needs a CUDA GPU; on CPU use fp32 (or bf16).")
    if t.early_stopping_patience is not None and not (has_validation and t.eval_every > 0):
        problems.append("`training.early_stopping_patience` needs validation data (`data.validation` or "
                        "`data.val_fraction`) and `training.eval_every` > 0.")
    needs = {"paged_adamw_8bit": "bitsandbytes"} if t.optimizer == "paged_adamw_8bit" else {}
    needs.update({name: name for name in t.report_to})
    for what, package in needs.items():
        if importlib.util.find_spec(package) is None:
            problems.append(f"`{what}` needs the `{package}` package: pip install {package}.")
    if problems:
        raise ConfigError("\n".join(problems))


class Session(SimpleNamespace):
    """Everything one training run is made of, built by `build_session` (tests drive the Trainer through it)."""


@contextmanager
def _tensorboard_dir(path: Path):
    """TensorBoard's callback reads its folder from the environment when the Trainer is built: the run's own,
    unless the user chose one (never inside checkpoints/, which is staged and rotated)."""
    key, previous = "TENSORBOARD_LOGGING_DIR", os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ[key] = previous or str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)


def build_session(cfg: RunConfig, run_dir: Path, resume: bool = False, quiet: bool = False, callbacks=None,
                  say=print) -> Session:
    """Tokenizer, data, model with LoRA, Trainer with our callbacks; restores counters when resuming."""
    from transformers import EarlyStoppingCallback, set_seed
    from transformers.trainer_callback import PrinterCallback

    from lorafit.data.collate import make_collator
    from lorafit.data.prepare import prepare_data
    from lorafit.models.lora import attach_lora, count_parameters, describe_parameters
    from lorafit.models.sources import load_base_model
    from lorafit.models.tokenizer import load_tokenizer
    from lorafit.runtime import pick_attention
    from lorafit.train import checkpoints as ckpt
    from lorafit.train.callbacks import (
        KeepBestAdapter,
        MetricsCallback,
        NanGuard,
        ProgressCallback,
        StopOnSignal,
    )

    main = is_main_process()
    checkpoints = run_dir / "checkpoints"
    last = ckpt.latest_checkpoint(checkpoints) if resume else None
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.tokenizer, cfg.model.trust_remote_code, cfg.model.revision)
    # Data first: bad rows stop the run before minutes are spent loading weights.
    with main_process_first(cfg, run_dir):
        prepared = prepare_data(cfg.data, tokenizer, cfg.training.seed)
    check_training_config(cfg, prepared.validation is not None)
    say(data_line(prepared.stats))
    model = load_base_model(cfg.model)
    set_seed(cfg.training.seed)  # the LoRA init depends on the seed alone, not on what ran before
    model = attach_lora(model, cfg.lora, cfg.training.gradient_checkpointing)
    trainable, total = count_parameters(model)
    say(describe_parameters(trainable, total))

    collator = make_collator(tokenizer, packed=cfg.data.packing, attn_implementation=pick_attention(cfg.model.attn_implementation))
    args = training_arguments(cfg, run_dir, prepared.validation is not None)
    tokens = TokenCounter()
    metrics = MetricsCallback(run_dir / "metrics.jsonl", tokens, enabled=main)
    progress = ProgressCallback(tokens, mode="lines" if quiet else "auto", enabled=main)
    guard, stopper = NanGuard(cfg.training.max_bad_steps), StopOnSignal()
    best = KeepBestAdapter() if cfg.training.early_stopping_patience is not None else None
    extra = [EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience), best] if best else []
    with _tensorboard_dir(run_dir / "tensorboard"):
        trainer = _trainer_class()(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.validation,
                                   data_collator=collator, processing_class=tokenizer,
                                   callbacks=[metrics, progress, guard, stopper, *extra, *(callbacks or [])])
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; ProgressCallback shows the same, readably
    trainer.loss_mode, trainer.tokens, trainer.nan_guard = cfg.training.loss, tokens, guard
    trainer.checkpoint_dir, trainer.checkpoint_keep = checkpoints, cfg.training.save_total_limit
    trainer.checkpoint_extra = tokens.state
    if cfg.lora.init == "eva" and last is None:
        init_eva(model, trainer, tokenizer.pad_token_id)
    if last is not None:
        manifest = ckpt.read_manifest(last)
        tokens.restore(manifest.get("tokens", 0), manifest.get("trained_tokens", 0))
    if resume:  # the curve continues from the checkpoint: records of steps after it are redone
        metrics.truncate_after(ckpt.checkpoint_step(last) if last is not None else 0)
    return Session(cfg=cfg, run_dir=run_dir, checkpoints=checkpoints, last=last, tokenizer=tokenizer,
                   prepared=prepared, model=model, trainable=trainable, total=total, trainer=trainer, tokens=tokens,
                   metrics=metrics, progress=progress, guard=guard, stopper=stopper, best=best)


def init_eva(model, trainer, pad_id: int) -> None:
    """EVA initialises LoRA A from the SVD of each layer's inputs on training batches; PEFT needs the data for it.

    Our batches may carry a 4D packed-attention mask, so the positions used are the real, trained ones.
    """
    import torch
    from peft import initialize_lora_eva_weights

    def positions(inputs, peft_config):  # (N, 2) indices of the tokens the SVD sees
        keep = inputs["input_ids"] != pad_id
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            keep &= mask.bool()
        if peft_config.eva_config.use_label_mask and "labels" in inputs:
            keep &= inputs["labels"] != peft_config.eva_config.label_mask_value
        return keep.nonzero()

    def forward(m, inputs):
        with torch.no_grad():
            return m(**{k: v for k, v in inputs.items() if k not in ("labels", "seq_lengths")}, use_cache=False)

    initialize_lora_eva_weights(model, dataloader=trainer.get_train_dataloader(), forward_fn=forward,
                                prepare_model_inputs_fn=positions, show_progress_bar=False)


def run_training(cfg: RunConfig, resume: bool = False, quiet: bool = False, callbacks=None) -> Path:
    """Train a LoRA adapter as the config says; returns the run directory.

    `callbacks`: extra TrainerCallbacks. Raises TrainingError (exit 1) on a fault it stopped for (NaN
    losses, out of memory, a failed save), and with exit code 128+signal after saving a checkpoint on
    SIGTERM/SIGINT.
    """
    import torch
    from transformers import set_seed

    from lorafit.inference.eval_prompts import (
        base_answers,
        generate_answers,
        read_generations,
        write_after,
        write_before,
    )
    from lorafit.train import checkpoints as ckpt
    from lorafit.train import faults

    started = time.time()
    main = is_main_process()
    set_seed(cfg.training.seed)
    run_dir = _open_run_dir(cfg, resume) if main else Path(cfg.output.dir) / (cfg.output.name or "run")
    say = print if main else (lambda *a: None)
    if main:  # what a killed save left: never complete, never used
        for leftover in ckpt.clear_temporaries(run_dir):
            log.warning("removed %s: a save was interrupted there", leftover)
        ckpt.clear_staging(run_dir / "checkpoints")
    s = build_session(cfg, run_dir, resume, quiet, callbacks, say)
    if main:
        _start_message(resume, s.last, run_dir, say)
        _write_config(run_dir, cfg, resume)
    trainer, model, template = s.trainer, s.model, s.prepared.template

    prompts, after, phase = list(cfg.eval.prompts), None, "the base model's answers to eval.prompts"
    try:
        if prompts and main and not (s.last and read_generations(run_dir)):
            say(f"answering {len(prompts)} eval prompt(s) with the base model (adapter off)")
            write_before(run_dir, prompts, base_answers(model, s.tokenizer, prompts, template, cfg.eval.max_new_tokens,
                                                        cfg.data.system_prompt))
        phase = "training"
        result = trainer.train(resume_from_checkpoint=str(s.last) if s.last else None)
        s.progress.close()
        if s.guard.failed:
            raise faults.nan_error(s.guard.failed, cfg, s.checkpoints)
        if s.stopper.received is not None:
            raise faults.interrupted_error(s.stopper.received, trainer.state.global_step, s.checkpoints)
        restored = None
        if s.best is not None and trainer.state.global_step < trainer.state.max_steps:
            restored = s.best.restore(model)
            if restored is not None:
                say(f"early stopping: keeping the adapter of step {restored} (best eval_loss {s.best.best:.4f})")
        phase = "the final evaluation"
        final_eval = _final_eval(trainer, s.prepared.validation is not None, fresh=restored is not None)
        phase = "the tuned model's answers to eval.prompts"
        if prompts and main:
            after = generate_answers(model, s.tokenizer, prompts, template, cfg.eval.max_new_tokens, cfg.data.system_prompt)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a checkpoint file
        if not s.last or phase != "training":
            raise
        raise RunDirError(f"checkpoint {s.last} holds a file that is not plain tensors, so it was not loaded "
                          f"({str(err).splitlines()[0][:200]}): lorafit did not write it that way, or it was altered.",
                          f"Delete {s.last} to resume from the checkpoint before it, or start a new run.") from None
    except torch.OutOfMemoryError as err:
        if phase == "training":
            phase = f"step {trainer.state.global_step + 1}"
        raise faults.oom_error(err, cfg, phase, s.checkpoints) from None
    finally:
        s.progress.close()

    if main:
        _save_final(model, s.tokenizer, template, run_dir, s.checkpoints)
        if after is not None:
            write_after(run_dir, prompts, after)
        summary = summarize(cfg, s, result, final_eval, started)
        write_json(run_dir / "summary.json", summary)
        try:
            write_report(run_dir)
        except Exception as err:  # the report is a convenience: the adapter is already saved
            log.warning("could not write report.html: %s (rebuild it with `lorafit report %s`)", err, run_dir)
        say(summary_screen(run_dir, summary))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return run_dir


def _final_eval(trainer, has_validation: bool, fresh: bool) -> dict:
    """Validation metrics of the final adapter; the Trainer's own evaluation of the last step is reused."""
    if not has_validation:
        return {}
    if not fresh:
        for record in reversed(trainer.state.log_history):
            if "eval_loss" in record and record.get("step") == trainer.state.global_step:
                return record
    return trainer.evaluate()


def _open_run_dir(cfg: RunConfig, resume: bool) -> Path:
    name = cfg.output.name or "run"
    try:
        return create_run_dir(cfg.output.dir, name, cfg.output.overwrite, resume=resume)
    except OSError as err:
        raise RunDirError(f"cannot create the run directory {Path(cfg.output.dir) / name}: {err.strerror or err}.",
                          "Choose a writable `output.dir` (and check the disk is not full).") from None


def _start_message(resume: bool, last: Path | None, run_dir: Path, say) -> None:
    if resume and last is not None:
        say(f"resuming from {last}")
    elif resume:
        log.warning("--resume: no complete checkpoint in %s; starting from the beginning", run_dir / "checkpoints")


def _write_config(run_dir: Path, cfg: RunConfig, resume: bool) -> None:
    path, text = run_dir / "config.yaml", dump_config(cfg)
    if resume and path.exists():
        old = path.read_text(encoding="utf-8")
        changed = [line[1:].strip() for line in difflib.unified_diff(old.splitlines(), text.splitlines(), lineterm="", n=0)
                   if line.startswith("+") and not line.startswith("+++")]
        if changed:
            log.warning("--resume with a config that differs from the run's: %s", "; ".join(changed[:8]))
    write_text_atomic(path, text)


def _save_final(model, tokenizer, template: str, run_dir: Path, checkpoints: Path) -> None:
    """Tokenizer first, adapter last: a run directory counts as finished once adapter/ exists (rundir.is_run_dir)."""
    from lorafit.models.tokenizer import save_tokenizer
    from lorafit.train.checkpoints import (
        atomic_dir,
        complete_checkpoints,
        is_write_failure,
        save_error,
    )

    for name, save in (("tokenizer", lambda d: save_tokenizer(tokenizer, d, template)),
                       ("adapter", lambda d: model.save_pretrained(d, safe_serialization=True))):
        try:
            with atomic_dir(run_dir / name) as tmp:
                save(tmp)
        except Exception as err:
            if not is_write_failure(err):
                raise
            done = complete_checkpoints(checkpoints)
            raise save_error(err, f"the final {name}", run_dir / name, done[-1] if done else None) from err
