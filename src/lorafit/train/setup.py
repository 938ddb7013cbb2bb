"""One training run assembled: tokenizer, data, model with LoRA, and the Trainer with lorafit's callbacks.

`build_run` returns a `TrainingRun`; `run.run_training` drives it, and tests drive the Trainer through it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from lorafit.config import RunConfig
from lorafit.data.collate import make_collator
from lorafit.data.preference_data import looks_preference
from lorafit.data.prepare import prepare_data
from lorafit.errors import ConfigError
from lorafit.models.adapter import add_adapter, resolve_adapter_base
from lorafit.models.attention import training_attention
from lorafit.models.frozen import store_frozen_linears
from lorafit.models.lora import count_parameters, describe_parameters
from lorafit.models.sources import load_base_model
from lorafit.models.tokenizer import load_tokenizer
from lorafit.report import data_line
from lorafit.runtime import fsdp_size, is_main_process, pick_attention, pick_frozen_dtype, resolve_precision
from lorafit.train import checkpoints as ckpt
from lorafit.train.callbacks import (
    KeepBestAdapter,
    MetricsCallback,
    NanGuard,
    ProgressCallback,
    StopOnSignal,
    TokenCounter,
)
from lorafit.train.schedule import Schedule, add_layout, plan_schedule
from lorafit.train.status import RunStatus
from lorafit.train.trainer import LorafitTrainer, main_process_first, tensorboard_dir, training_arguments

log = logging.getLogger("lorafit")


@dataclass
class TrainingRun:
    """Everything one training run is made of."""

    cfg: RunConfig
    run_dir: Path
    last: Path | None  # the checkpoint resumed from
    tokenizer: object
    prepared: object  # data.prepare.PreparedData
    model: object  # the PEFT model
    trainable: int
    total: int
    trainer: object  # trainer.LorafitTrainer
    tokens: TokenCounter
    progress: ProgressCallback
    guard: NanGuard
    stopper: StopOnSignal
    best: KeepBestAdapter | None  # with early stopping: the best adapter seen
    schedule: Schedule | None = None  # samples, samples per step, optimizer steps, epochs, learning rate

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


@dataclass
class RunCallbacks:
    """lorafit's own Trainer callbacks for one run."""

    tokens: TokenCounter
    metrics: MetricsCallback
    progress: ProgressCallback
    guard: NanGuard
    stopper: StopOnSignal
    best: KeepBestAdapter | None
    patience: int | None  # early stopping's, when it is on
    status: RunStatus | None = None  # status.json for `lorafit ui`

    def all(self) -> list:
        from transformers import EarlyStoppingCallback

        own = [self.metrics, self.progress, self.guard, self.stopper] + ([self.status] if self.status else [])
        if self.best is None:
            return own
        patience = EarlyStoppingCallback(early_stopping_patience=self.patience)
        return own + [patience, self.best]


def make_callbacks(cfg: RunConfig, run_dir: Path, quiet: bool) -> RunCallbacks:
    main, patience = is_main_process(), cfg.training.early_stopping_patience
    tokens = TokenCounter()
    return RunCallbacks(
        tokens=tokens,
        metrics=MetricsCallback(run_dir / "metrics.jsonl", tokens, enabled=main),
        progress=ProgressCallback(tokens, mode="lines" if quiet else "auto", enabled=main),
        guard=NanGuard(cfg.training.max_bad_steps),
        stopper=StopOnSignal(),
        best=KeepBestAdapter() if patience is not None else None,
        patience=patience,
        status=RunStatus(run_dir, enabled=main),
    )


def build_run(
    cfg: RunConfig, run_dir: Path, resume: bool = False, quiet: bool = False, callbacks=None, say=print
) -> TrainingRun:
    """Tokenizer, data, model with LoRA, Trainer with our callbacks; restores counters when resuming."""
    from transformers import set_seed

    last = ckpt.latest_checkpoint(run_dir / "checkpoints") if resume else None
    adapter = starting_adapter(cfg)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.tokenizer, cfg.model.trust_remote_code, cfg.model.revision)
    # Data first: bad rows stop the run before minutes are spent loading weights.
    with main_process_first(cfg, run_dir):
        prepared = prepare_data(cfg.data, tokenizer, cfg.training.seed)
    check_training_config(cfg, prepared.validation is not None)
    add_layout(cfg, prepared)  # how packing lays the micro-batches out, for the data line
    say(data_line(prepared.stats))
    model = load_base_model(cfg.model)
    schedule = plan_schedule(cfg.training, len(prepared.train), hidden_size=getattr(model.config, "hidden_size", None))
    attention = training_attention(model, pick_attention(cfg.model.attn_implementation))  # no L x L masks
    set_seed(cfg.training.seed)  # the LoRA init depends on the seed alone, not on what ran before
    model = add_adapter(model, adapter, cfg.lora, cfg.training.gradient_checkpointing)
    trainable, total = count_parameters(model)
    _say_plan(say, describe_parameters(trainable, total) + _store_frozen(cfg, model), schedule)
    own = make_callbacks(cfg, run_dir, quiet)
    collator = make_collator(
        tokenizer, packed=cfg.data.packing, max_length=cfg.data.max_length, attn_implementation=attention
    )
    args = training_arguments(cfg, run_dir, prepared.validation is not None, schedule)
    trainer = _make_trainer(cfg, run_dir, model, tokenizer, prepared, collator, args, own, callbacks)
    if cfg.lora.init == "eva" and last is None:
        init_eva(model, trainer, tokenizer.pad_token_id)
    restore_counters(own, last, resume)
    return training_run(cfg, run_dir, last, tokenizer, prepared, model, (trainable, total), trainer, own, schedule)


def training_run(cfg, run_dir, last, tokenizer, prepared, model, counts, trainer, own, schedule) -> TrainingRun:
    """The TrainingRun of a built run (SFT here, DPO in train/dpo.py); `counts` = (trainable, total) parameters."""
    return TrainingRun(
        cfg=cfg,
        run_dir=run_dir,
        last=last,
        tokenizer=tokenizer,
        prepared=prepared,
        model=model,
        trainable=counts[0],
        total=counts[1],
        trainer=trainer,
        tokens=own.tokens,
        progress=own.progress,
        guard=own.guard,
        stopper=own.stopper,
        best=own.best,
        schedule=schedule,
    )


def _make_trainer(cfg, run_dir: Path, model, tokenizer, prepared, collator, args, own, callbacks):
    from transformers.trainer_callback import PrinterCallback

    with tensorboard_dir(run_dir / "tensorboard"):
        trainer = LorafitTrainer(
            model=model,
            args=args,
            train_dataset=prepared.train,
            eval_dataset=prepared.validation,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=own.all() + list(callbacks or []),
            loss_mode=cfg.training.loss,
            pad_token_id=tokenizer.pad_token_id,
            tokens=own.tokens,
            nan_guard=own.guard,
            checkpoint_dir=run_dir / "checkpoints",
            checkpoint_keep=cfg.training.save_total_limit,
        )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; ProgressCallback shows the same, readably
    return trainer


def _store_frozen(cfg: RunConfig, model) -> str:
    """Keeps the frozen linear layers in bf16 where `model.frozen_dtype` resolves to it (models/frozen.py), called
    after the parameters are counted (a tied head gets its own copy); returns the note for the parameters line."""
    dtype = pick_frozen_dtype(cfg.model, cfg.training.precision)
    if dtype is None or not store_frozen_linears(model, dtype):
        return ""
    unit = "" if cfg.model.frozen_dtype == "bf16" else " on this CPU's bf16 matrix unit"
    return f"; frozen linear layers in bf16{unit}, LoRA and activations fp32"


def _say_plan(say, parameters: str, schedule: Schedule) -> None:
    """The trainable parameters and the schedule (steps, epochs, learning rate), warnings logged."""
    say(parameters)
    say(schedule.line())
    for warning in schedule.warnings:
        log.warning("warning: %s", warning)


def restore_counters(own: RunCallbacks, last: Path | None, resume: bool) -> None:
    """On resume: token counts from the checkpoint's manifest; the metrics curve continues from its step."""
    if last is not None:
        manifest = ckpt.read_manifest(last)
        own.tokens.restore(manifest.get("tokens", 0), manifest.get("trained_tokens", 0))
    if resume:  # records of steps after the checkpoint are redone
        own.metrics.truncate_after(ckpt.checkpoint_step(last) if last is not None else 0)


def starting_adapter(cfg: RunConfig) -> Path | None:
    """The adapter `model.adapter` continues (cfg.model.name becomes its run's base), None for a new one. Preference
    pairs are refused: supervised training on them would train one side and drop the other."""
    for source in cfg.data.train:
        if looks_preference(source):
            raise ConfigError(
                f"{source.path} holds preference pairs (`chosen` / `rejected`), and `training.method` is sft.",
                "Set `training.method: dpo` to tune on the pairs, or train on conversations.",
            )
    return resolve_adapter_base(cfg)


def check_training_config(cfg: RunConfig, has_validation: bool) -> None:
    """Problems only visible once the data and the installed packages are known (before loading weights)."""
    import torch

    t, problems = cfg.training, []
    if resolve_precision(t.precision) == "fp16" and not torch.cuda.is_available():
        problems.append("`training.precision: fp16` needs a CUDA GPU; on CPU use fp32 (or bf16).")
    if t.early_stopping_patience is not None and not (has_validation and t.eval_every > 0):
        problems.append(
            "`training.early_stopping_patience` needs validation data (`data.validation` or "
            "`data.val_fraction`) and `training.eval_every` > 0."
        )
    if fsdp_size() > 1 and cfg.lora.modules_to_save:
        problems.append(
            "`lora.modules_to_save` cannot be trained under FSDP: its full copies would be sharded too, "
            "and lorafit saves only whole trainable weights. Remove it, or launch plain DDP (torchrun)."
        )
    needs = {"paged_adamw_8bit": "bitsandbytes"} if t.optimizer == "paged_adamw_8bit" else {}
    needs.update({name: name for name in t.report_to})
    for what, package in needs.items():
        if importlib.util.find_spec(package) is None:
            problems.append(f"`{what}` needs the `{package}` package: pip install {package}.")
    if problems:
        raise ConfigError("\n".join(problems))


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

    initialize_lora_eva_weights(
        model,
        dataloader=trainer.get_train_dataloader(),
        forward_fn=forward,
        prepare_model_inputs_fn=positions,
        show_progress_bar=False,
    )
