"""Training: data -> model -> transformers' Trainer -> run directory. No home-made loop.

`run_training` is the whole of `lorafit train`: open the run directory, build the run (setup.py), answer the
eval prompts with the base model, train, keep the best adapter, evaluate, save, summarise.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import time
from pathlib import Path

from lorafit.config import RunConfig, dump_config
from lorafit.errors import RunDirError
from lorafit.inference import heldout as held
from lorafit.inference.eval_prompts import base_answers, read_generations, tuned_answers, write_after, write_before
from lorafit.models.tokenizer import save_tokenizer
from lorafit.report import summarize, write_report
from lorafit.report_screen import summary_screen
from lorafit.rundir import create_run_dir, run_dir_path, write_json, write_text_atomic
from lorafit.runtime import deepspeed_collectives_over_gloo, is_main_process, sharded_launch, take_over_fsdp
from lorafit.train import checkpoints as ckpt
from lorafit.train import faults
from lorafit.train.checkpoints import (
    atomic_dir,
    complete_checkpoints,
    is_write_failure,
    save_error,
)
from lorafit.train.dpo import build_dpo_run
from lorafit.train.setup import TrainingRun, build_run

log = logging.getLogger("lorafit")


def run_training(cfg: RunConfig, resume: bool = False, quiet: bool = False, callbacks=None) -> Path:
    """Train a LoRA adapter as the config says; returns the run directory.

    `callbacks`: extra TrainerCallbacks. Raises TrainingError (exit 1) on a fault it stopped for (NaN
    losses, out of memory, a failed save), and with exit code 128+signal after saving a checkpoint on
    SIGTERM/SIGINT.
    """
    import torch
    from transformers import set_seed

    started = time.time()
    main = is_main_process()
    take_over_fsdp()  # before anything loads: lorafit, not accelerate, shards an FSDP launch
    deepspeed_collectives_over_gloo()  # before the Trainer starts DeepSpeed's communication backend
    set_seed(cfg.training.seed)
    run_dir = _open_run_dir(cfg, resume) if main else run_dir_path(cfg.output.dir, cfg.output.name)
    say = print if main else (lambda *a: None)
    if main:  # what a killed save left: never complete, never used
        for leftover in ckpt.clear_temporaries(run_dir):
            log.warning("removed %s: a save was interrupted there", leftover)
        ckpt.clear_staging(run_dir / "checkpoints")
    build = build_dpo_run if cfg.training.method == "dpo" else build_run
    run = build(cfg, run_dir, resume, quiet, callbacks, say)
    if main:
        _start_message(resume, run.last, run_dir, say)
        _write_config(run_dir, cfg, resume)
    result, final_eval, after, heldout_after = _train_and_evaluate(run, main, say)
    adapter_state = ckpt.final_adapter_state(run.trainer)  # ZeRO-3: a collective, every rank takes part
    if main:
        _save_final(run.model, run.tokenizer, run.prepared.template, run_dir, run.checkpoints, adapter_state)
        if after is not None:
            write_after(run_dir, list(cfg.eval.prompts), after)
        if heldout_after is not None:
            held.write_after(run_dir, run.prepared.heldout, heldout_after)
        summary = summarize(cfg, run, result, final_eval, started)
        write_json(run_dir / "summary.json", summary)
        try:
            write_report(run_dir)
        except Exception as err:  # the report is a convenience: the adapter is already saved
            log.warning("could not write report.html: %s (rebuild it with `lorafit report %s`)", err, run_dir)
        say(summary_screen(run_dir, summary))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return run_dir


def _train_and_evaluate(run: TrainingRun, main: bool, say):
    """(train result, final eval metrics, tuned answers to eval.prompts or None, tuned answers to the validation
    questions or None); faults become clear errors."""
    import torch

    cfg, trainer = run.cfg, run.trainer
    prompts, after, heldout_after = list(cfg.eval.prompts), None, None
    phase = "the base model's answers to eval.prompts"
    # A sharded model (FSDP, ZeRO-3) answers only when every rank runs it, each forward gathering the weights:
    # then all ranks generate and rank 0 writes.
    answer = main or sharded_launch() is not None
    try:
        if prompts and answer and not (run.last and read_generations(run.run_dir)):
            say(f"answering {len(prompts)} eval prompt(s) with the base model (adapter off)")
            before = base_answers(
                run.model,
                run.tokenizer,
                prompts,
                run.prepared.template,
                cfg.eval.max_new_tokens,
                cfg.data.system_prompt,
            )
            if main:
                write_before(run.run_dir, prompts, before)
        questions = _heldout_before(run, answer, main, say)
        phase = "training"
        result = trainer.train(resume_from_checkpoint=str(run.last) if run.last else None)
        run.progress.close()
        _raise_on_stop(run)
        restored = _keep_best(run, say)
        phase = "the final evaluation"
        final_eval = _final_eval(trainer, run.prepared.validation is not None, fresh=restored is not None)
        phase = "the tuned model's answers to eval.prompts"
        after = _tuned(run, prompts) if prompts and answer else None
        heldout_after = _tuned(run, questions) if questions else None
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a checkpoint file
        if not run.last or phase != "training":
            raise
        raise RunDirError(
            f"checkpoint {run.last} holds a file that is not plain tensors, so it was not loaded "
            f"({str(err).splitlines()[0][:200]}): lorafit did not write it that way, or it was altered.",
            f"Delete {run.last} to resume from the checkpoint before it, or start a new run.",
        ) from None
    except torch.OutOfMemoryError as err:
        if phase == "training":
            phase = f"step {trainer.state.global_step + 1}"
        raise faults.oom_error(err, cfg, phase, run.checkpoints) from None
    finally:
        run.progress.close()
    return result, final_eval, after, heldout_after


def _tuned(run: TrainingRun, prompts: list) -> list[str]:
    """The tuned model's greedy answers, rendered as in training."""
    cfg = run.cfg
    return tuned_answers(
        run.model, run.tokenizer, prompts, run.prepared.template, cfg.eval.max_new_tokens, cfg.data.system_prompt
    )


def _heldout_before(run: TrainingRun, answer: bool, main: bool, say) -> list:
    """The validation questions the report shows (inference/heldout.py), answered now by the base model unless a
    resumed run already has those answers; returns them, to be answered again after training. Like the eval
    prompts, every rank of a sharded launch answers (`answer`) and rank 0 writes."""
    questions = [h["messages"] for h in run.prepared.heldout] if answer else []
    if questions and not (run.last and held.read_answers(run.run_dir)):
        say(f"answering {len(questions)} validation question(s) with the base model (adapter off)")
        before = base_answers(
            run.model,
            run.tokenizer,
            questions,
            run.prepared.template,
            run.cfg.eval.max_new_tokens,
            run.cfg.data.system_prompt,
        )
        if main:
            held.write_before(run.run_dir, run.prepared.heldout, before)
    return questions


def _raise_on_stop(run: TrainingRun) -> None:
    """Training ended early: too many NaN steps, or a signal (after its checkpoint was saved)."""
    if run.guard.failed:
        raise faults.nan_error(run.guard.failed, run.cfg, run.checkpoints)
    if run.stopper.received is not None:
        raise faults.interrupted_error(run.stopper.received, run.trainer.state.global_step, run.checkpoints)


def _keep_best(run: TrainingRun, say) -> int | None:
    """After early stopping, put the best evaluated adapter back; returns its step (None if nothing changed)."""
    state = run.trainer.state
    if run.best is None or state.global_step >= state.max_steps:
        return None
    restored = run.best.restore(run.model)
    if restored is not None:
        say(f"early stopping: keeping the adapter of step {restored} (best eval_loss {run.best.best:.4f})")
    return restored


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
    path = run_dir_path(cfg.output.dir, cfg.output.name)
    try:
        return create_run_dir(path, cfg.output.overwrite, resume=resume)
    except OSError as err:
        raise RunDirError(
            f"cannot create the run directory {path}: {err.strerror or err}.",
            "Choose a writable `output.dir` (and check the disk is not full).",
        ) from None


def _start_message(resume: bool, last: Path | None, run_dir: Path, say) -> None:
    if resume and last is not None:
        say(f"resuming from {last}")
    elif resume:
        log.warning("--resume: no complete checkpoint in %s; starting from the beginning", run_dir / "checkpoints")


def _write_config(run_dir: Path, cfg: RunConfig, resume: bool) -> None:
    path, text = run_dir / "config.yaml", dump_config(cfg)
    if resume and path.exists():
        old = path.read_text(encoding="utf-8")
        changed = [
            line[1:].strip()
            for line in difflib.unified_diff(old.splitlines(), text.splitlines(), lineterm="", n=0)
            if line.startswith("+") and not line.startswith("+++")
        ]
        if changed:
            log.warning("--resume with a config that differs from the run's: %s", "; ".join(changed[:8]))
    write_text_atomic(path, text)


def _save_final(
    model, tokenizer, template: str, run_dir: Path, checkpoints: Path, adapter_state: dict | None = None
) -> None:
    """Tokenizer first, adapter last: a run directory counts as finished once adapter/ exists (rundir.is_run_dir).
    `adapter_state`: the weights to save where rank 0's model cannot give them (checkpoints.final_adapter_state)."""

    def save_adapter(folder):
        # only the trained adapter: DPO's frozen reference copy (train/dpo.py) is not part of the result
        model.save_pretrained(folder, state_dict=adapter_state, safe_serialization=True, selected_adapters=["default"])

    for name, save in (("tokenizer", lambda d: save_tokenizer(tokenizer, d, template)), ("adapter", save_adapter)):
        try:
            with atomic_dir(run_dir / name) as tmp:
                save(tmp)
        except Exception as err:
            if not is_write_failure(err):
                raise
            done = complete_checkpoints(checkpoints)
            raise save_error(err, f"the final {name}", run_dir / name, done[-1] if done else None) from err
