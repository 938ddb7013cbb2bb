"""Preference tuning (`training.method: dpo`) through TRL's DPOTrainer, on lorafit's data, run directory,
checkpoints, metrics and report. The DPO loss itself is TRL's.

The reference model is what the policy starts from, kept frozen:
- from the base model (a new LoRA adapter): the base. TRL copies the new adapter (B = 0, so the base) as `ref`.
- from a finished SFT run (`model.adapter`): that SFT adapter. TRL copies the loaded adapter into a frozen `ref`
  adapter, and the reference forward runs with it. Disabling the adapter instead would make the reference the bare
  base, a model the SFT policy is already far from: the loss starts below ln 2 and the "accuracy" looks good before
  anything is learned (tests/test_dpo.py shows both).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from lorafit.config import RunConfig
from lorafit.data.preference_data import prepare_preferences
from lorafit.errors import ConfigError
from lorafit.hf_compat import check_dpo_trainer
from lorafit.models.adapter import add_adapter, resolve_adapter_base
from lorafit.models.lora import count_parameters, describe_parameters
from lorafit.models.sources import load_base_model
from lorafit.models.tokenizer import load_tokenizer
from lorafit.report import data_line
from lorafit.train import checkpoints as ckpt
from lorafit.train.callbacks import GuardedGradNorm
from lorafit.train.schedule import plan_schedule
from lorafit.train.setup import TrainingRun, check_training_config, make_callbacks, restore_counters, training_run
from lorafit.train.trainer import main_process_first, tensorboard_dir, training_argument_values

REFERENCE = "ref"  # the name TRL gives the frozen copy of the adapter


def check_dpo_config(cfg: RunConfig) -> None:
    """What DPO cannot do in lorafit, said before any weights load."""
    problems = []
    if importlib.util.find_spec("trl") is None:
        problems.append("`training.method: dpo` needs TRL: pip install 'lorafit[dpo]'.")
    if any(s.weight != 1.0 for s in cfg.data.train):
        problems.append("`data.train[].weight` is not supported with `training.method: dpo`; remove it.")
    if cfg.model.quantization != "none" and cfg.model.adapter:
        problems.append("`model.adapter` with `model.quantization` is not supported yet; use `quantization: none`.")
    if problems:
        raise ConfigError("\n".join(problems))


def dpo_arguments(cfg: RunConfig, run_dir: Path, has_eval: bool, schedule=None):
    """lorafit's TrainingArguments plus DPO's settings. Lengths were applied by lorafit's data pipeline."""
    from trl import DPOConfig

    values = training_argument_values(cfg, run_dir, has_eval, schedule)
    return DPOConfig(
        **values,
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss],
        precompute_ref_log_probs=cfg.dpo.precompute_reference,
        max_length=None,
        disable_dropout=True,  # policy and reference must agree exactly at step 0 (loss ln 2)
    )


@functools.cache
def dpo_trainer_class():
    """TRL's DPOTrainer with lorafit's atomic checkpoints, token counts and NaN guard (built on first use: TRL is
    an optional dependency)."""
    from trl import DPOTrainer

    class LorafitDPOTrainer(ckpt.AtomicCheckpoints, GuardedGradNorm, DPOTrainer):
        def __init__(self, *args, tokens, nan_guard, checkpoint_dir, checkpoint_keep, **kwargs):
            check_dpo_trainer()
            self.tokens, self.nan_guard = tokens, nan_guard
            self.checkpoint_dir, self.checkpoint_keep = Path(checkpoint_dir), checkpoint_keep
            self.checkpoint_extra = tokens.state
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized by lorafit's templates, BOS once (data/preference_data.py)

        def _send_telemetry(self):
            return None  # lorafit sends nothing anywhere

        def create_model_card(self, *args, **kwargs):
            return None  # it would write README.md into the checkpoint staging folder

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                trained = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
                self.tokens.add({**inputs, "labels": trained}, self.processing_class.pad_token_id)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.nan_guard.observe_loss(loss)
            return loss

    return LorafitDPOTrainer


def freeze_reference(model) -> int:
    """Make sure TRL's reference adapter never trains (nor counts as trainable); returns its parameter count."""
    count = 0
    for name, param in model.named_parameters():
        if f".{REFERENCE}." in name:
            param.requires_grad_(False)
            count += param.numel()
    return count


def dpo_schedule(cfg: RunConfig, pairs: int, model):
    """The small-data step floor was measured for supervised runs (bench/small_data.py), not for pairs: DPO runs
    take their epochs (or max_steps). `learning_rate: auto` scales with the width as for SFT."""
    no_floor = cfg.training.model_copy(update={"min_steps": 0})
    return plan_schedule(no_floor, pairs, hidden_size=getattr(model.config, "hidden_size", None))


def build_dpo_run(
    cfg: RunConfig, run_dir: Path, resume: bool = False, quiet: bool = False, callbacks=None, say=print
) -> TrainingRun:
    """Tokenizer, preference pairs, model with its adapter, DPOTrainer with lorafit's callbacks."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    check_dpo_config(cfg)
    last = ckpt.latest_checkpoint(run_dir / "checkpoints") if resume else None
    adapter = resolve_adapter_base(cfg)  # cfg.model.name becomes the SFT run's base
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.tokenizer, cfg.model.trust_remote_code, cfg.model.revision)
    with main_process_first(cfg, run_dir):
        prepared = prepare_preferences(cfg.data, tokenizer, cfg.training.seed)
    check_training_config(cfg, prepared.validation is not None)
    say(data_line(prepared.stats))
    if adapter is not None:
        say(f"continuing the adapter {adapter}; the reference model is that adapter, frozen")
    model = load_base_model(cfg.model)
    schedule = dpo_schedule(cfg, len(prepared.train), model)
    say(schedule.line())
    set_seed(cfg.training.seed)
    # TRL's disable_dropout finds torch Dropout modules: PEFT's own dropout, so that it can switch it off
    model = add_adapter(model, adapter, cfg.lora, cfg.training.gradient_checkpointing, fused=False)
    own = make_callbacks(cfg, run_dir, quiet)
    with tensorboard_dir(run_dir / "tensorboard"):
        trainer = dpo_trainer_class()(
            model=model,
            args=dpo_arguments(cfg, run_dir, prepared.validation is not None, schedule),
            train_dataset=prepared.train,
            eval_dataset=prepared.validation,
            processing_class=tokenizer,
            callbacks=own.all() + list(callbacks or []),
            tokens=own.tokens,
            nan_guard=own.guard,
            checkpoint_dir=run_dir / "checkpoints",
            checkpoint_keep=cfg.training.save_total_limit,
        )
    trainer.remove_callback(PrinterCallback)
    reference = freeze_reference(model)
    trainable, total = count_parameters(model)
    total -= reference  # the reference copy is bookkeeping, not part of the model
    say(describe_parameters(trainable, total))
    restore_counters(own, last, resume)
    return training_run(cfg, run_dir, last, tokenizer, prepared, model, (trainable, total), trainer, own, schedule)
