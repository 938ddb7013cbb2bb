"""Training: data → model → transformers' Trainer → run directory. No home-made loop.

The one thing we change in Trainer is the loss (`compute_loss`): a memory-lean cross-entropy that is
normalised by the trained tokens of the whole optimizer step, so gradient accumulation is exact.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from lorafit.callbacks import TokenCounter
from lorafit.config import RunConfig, dump_config
from lorafit.rundir import create_run_dir, write_json

log = logging.getLogger("lorafit")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _trainer_class():
    from transformers import Trainer

    from lorafit.loss import causal_lm_loss

    class LorafitTrainer(Trainer):
        loss_mode = "chunked"
        tokens: TokenCounter

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            inputs.pop("seq_lengths", None)
            if model.training:
                self.tokens.add(inputs, self.processing_class.pad_token_id)
            loss, _ = causal_lm_loss(model, inputs, num_items_in_batch=num_items_in_batch, mode=self.loss_mode)
            # Mirror Trainer.compute_loss: with tokens averaged across ranks, DDP's gradient mean must be undone.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

    return LorafitTrainer


def training_arguments(cfg: RunConfig, run_dir: Path, has_eval: bool):
    from transformers import TrainingArguments

    from lorafit.model import pick_dtype

    t = cfg.training
    precision = t.precision if t.precision != "auto" else {"bfloat16": "bf16", "float16": "fp16"}.get(
        str(pick_dtype("auto")).removeprefix("torch."), "fp32")
    evaluate_steps = has_eval and t.eval_every > 0
    saving = t.save_every > 0
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
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
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if evaluate_steps else "no",
        eval_steps=t.eval_every if evaluate_steps else None,
        save_strategy="steps" if saving else "no",
        save_steps=t.save_every if saving else None,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=False,
        report_to=list(t.report_to) or "none",
        remove_unused_columns=False,  # our collator needs seq_lengths; Trainer would drop it
        dataloader_num_workers=0,
        disable_tqdm=True,  # our own progress bar
        gradient_checkpointing=False,  # enabled on the model before PEFT wraps it (model.attach_lora)
        ddp_find_unused_parameters=False,
    )


def run_training(cfg: RunConfig, resume: bool = False, quiet: bool = False) -> Path:
    """Train a LoRA adapter as the config says; returns the run directory."""
    import torch
    from transformers import set_seed

    from lorafit.callbacks import MetricsCallback, ProgressCallback
    from lorafit.data import make_collator, prepare_data
    from lorafit.model import (
        attach_lora,
        count_parameters,
        describe_parameters,
        load_base_model,
        load_tokenizer,
        pick_attention,
    )

    started = time.time()
    set_seed(cfg.training.seed)
    run_dir = Path(cfg.output.dir) / (cfg.output.name or "run")
    if is_main_process():
        run_dir = create_run_dir(cfg.output.dir, cfg.output.name or "run", cfg.output.overwrite, resume=resume)
    say = (lambda *a: None) if quiet or not is_main_process() else print

    tokenizer = load_tokenizer(cfg.model.name, cfg.model.tokenizer, cfg.model.trust_remote_code, cfg.model.revision)
    # Data first: bad rows stop the run before minutes are spent loading weights.
    prepared = prepare_data(cfg.data, tokenizer, cfg.training.seed)
    say(_data_line(prepared.stats))
    model = load_base_model(cfg.model)
    model = attach_lora(model, cfg.lora, cfg.training.gradient_checkpointing)
    trainable, total = count_parameters(model)
    say(describe_parameters(trainable, total))

    if is_main_process():
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    attn = pick_attention(cfg.model.attn_implementation)
    collator = make_collator(tokenizer, packed=cfg.data.packing, attn_implementation=attn)
    args = training_arguments(cfg, run_dir, prepared.validation is not None)
    tokens = TokenCounter()
    metrics = MetricsCallback(run_dir / "metrics.jsonl", tokens, enabled=is_main_process())
    trainer_cls = _trainer_class()
    trainer_cls.loss_mode = cfg.training.loss
    trainer_cls.tokens = tokens
    trainer = trainer_cls(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.validation,
                          data_collator=collator, processing_class=tokenizer,
                          callbacks=[metrics, ProgressCallback(tokens, enabled=not quiet and is_main_process())])
    last = _latest_checkpoint(run_dir / "checkpoints") if resume else None
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)

    final_eval = trainer.evaluate() if prepared.validation is not None else {}
    if is_main_process():
        model.save_pretrained(run_dir / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(run_dir / "tokenizer")
        summary = {
            "parameters": {"trainable": trainable, "total": total},
            "data": prepared.stats,
            "template": prepared.template,
            "train_loss": result.training_loss,
            "eval_loss": final_eval.get("eval_loss"),
            "eval_perplexity": math.exp(final_eval["eval_loss"]) if final_eval.get("eval_loss") is not None else None,
            "steps": trainer.state.global_step,
            "tokens": tokens.real,
            "trained_tokens": tokens.trained,
            "tokens_per_second": round(tokens.per_second(), 1),
            "peak_memory_bytes": _peak_memory(),
            "seconds": round(time.time() - started, 1),
        }
        write_json(run_dir / "summary.json", summary)
        say(_summary_screen(run_dir, summary))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return run_dir


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _peak_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _data_line(stats: dict) -> str:
    parts = [f"{stats.get('train_samples', '?')} training samples"]
    if stats.get("validation_samples"):
        parts.append(f"{stats['validation_samples']} validation")
    if stats.get("packing_efficiency") is not None:
        parts.append(f"packed into {stats.get('train_rows', '?')} rows ({stats['packing_efficiency']:.1%} real tokens)")
    dropped = stats.get("dropped", 0)
    if dropped:
        parts.append(f"{dropped} dropped (see `lorafit data check`)")
    return "data: " + ", ".join(parts)


def _summary_screen(run_dir: Path, s: dict) -> str:
    lines = [
        "",
        f"run directory   {run_dir}",
        f"adapter         {run_dir / 'adapter'}  (PEFT format)",
        f"steps           {s['steps']}   train loss {s['train_loss']:.4f}"
        + (f"   eval loss {s['eval_loss']:.4f} (ppl {s['eval_perplexity']:.2f})" if s.get("eval_loss") is not None else ""),
        f"tokens          {s['tokens']:,} seen, {s['trained_tokens']:,} trained   {s['tokens_per_second']:,.0f} tokens/s",
        f"peak memory     {s['peak_memory_bytes'] / 2**30:.2f} GiB   time {s['seconds']:.0f} s",
        f"next            lorafit chat {run_dir}",
    ]
    return "\n".join(lines)
