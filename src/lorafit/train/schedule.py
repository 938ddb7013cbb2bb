"""How many optimizer steps a run takes, and whether that is enough to learn: one rule for train, plan and data check.

A batch is counted in samples (conversations), with and without packing: an optimizer step trains on
`micro_batch_size × gradient_accumulation × devices` samples; packing only lays a micro-batch's samples out in
fewer rows (collate.py). The step count follows transformers' Trainer exactly (per device: ceil(samples / devices)
samples, ceil(that / micro_batch_size) micro-batches, ceil(that / gradient_accumulation) steps per epoch), then:

- `training.max_steps > 0`: exactly that many steps;
- else ceil(epochs × steps per epoch), raised to `training.min_steps` when the data is small, so a run on a few
  dozen conversations still takes enough steps to learn (more epochs, the same samples per step).

The learning rate `auto` scales with the model's width: 2e-4 × 4096 / hidden size, at most 2e-3. That is the
usual LoRA rate for Llama 3.1 8B (hidden 4096) and the QLoRA paper's 1e-4 for 65-70B models (hidden 8192); a small
model needs a larger one (1.4e-3 for the embedded SmolLM2, hidden 576: at 2e-4 it learned 0 of 10 facts in the
sweep, see BENCHMARKS.md).

The floor and the warning threshold come from the small-data sweep in BENCHMARKS.md (bench/small_data.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from lorafit.data.packing import layout_stats
from lorafit.data.prepare import prepare_data
from lorafit.data.readers import expand_source
from lorafit.errors import DataError, LorafitError
from lorafit.models.tokenizer import load_tokenizer
from lorafit.runtime import pick_attention

# Below this many optimizer steps the sweep's runs learned few or none of their facts (BENCHMARKS.md, small data).
TOO_FEW_STEPS = 60
BASE_RATE, BASE_HIDDEN, MAX_AUTO_RATE = 2e-4, 4096, 2e-3  # learning_rate: auto (see above)
DEFAULT_MIN_STEPS = 150  # training.min_steps' default (config.py), named in the warning


@dataclass
class Schedule:
    samples: int  # training samples in one epoch (after drops and mixing weights)
    samples_per_step: int  # micro_batch_size × gradient_accumulation × devices
    steps_per_epoch: int
    steps: int  # optimizer steps the run takes
    epochs: float  # passes over the data those steps make
    devices: int
    rule: str  # "epochs", "min_steps" (raised to the floor) or "max_steps"
    learning_rate: float | None = None  # the peak rate the run uses; None when `auto` and the width is unknown
    learning_rate_rule: str = ""  # how it was chosen, for the line
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for the screen: samples, samples per step, steps, epochs, and why."""
        why = {
            "epochs": "",
            "max_steps": ", set by `training.max_steps`",
            "min_steps": f", raised to `training.min_steps` {self.steps} for small data",
        }[self.rule]
        per_device = f" on {self.devices} devices" if self.devices > 1 else ""
        rate = f"learning rate {self.learning_rate:.2g}" if self.learning_rate else "learning rate"
        return (
            f"schedule: {self.samples:,} samples, {self.samples_per_step:,} per optimizer step{per_device}, "
            f"{self.steps:,} optimizer steps = {self.epochs:,.1f} epochs{why}; {rate} {self.learning_rate_rule}"
        )


def world_size() -> int:
    """Processes training together (torchrun / accelerate set WORLD_SIZE); 1 for plan and data check."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def steps_per_epoch(samples: int, micro_batch: int, accumulation: int, devices: int = 1) -> int:
    """The Trainer's count: DistributedSampler pads to a multiple of devices; the last micro-batch and step may be
    short."""
    per_device = math.ceil(samples / devices)
    micro_batches = math.ceil(per_device / micro_batch)
    return max(1, math.ceil(micro_batches / accumulation))


def resolve_learning_rate(setting: float | str, hidden_size: int | None) -> tuple[float | None, str]:
    """(peak learning rate, how it was chosen) for `training.learning_rate` on a model of this width."""
    if setting != "auto":
        return float(setting), "(set)"
    if not hidden_size:
        return None, "auto (2e-4 × 4096 / hidden size; the width is read when the model loads)"
    rate = min(MAX_AUTO_RATE, BASE_RATE * BASE_HIDDEN / hidden_size)
    return rate, f"(auto: 2e-4 × 4096 / hidden size {hidden_size:,}{', capped' if rate == MAX_AUTO_RATE else ''})"


def plan_schedule(training, samples: int, devices: int | None = None, hidden_size: int | None = None) -> Schedule:
    """The schedule of a run with `training` settings (a TrainingSection) on `samples` training samples, for a
    model of `hidden_size` (for `learning_rate: auto`)."""
    devices = devices or world_size()
    per_step = training.micro_batch_size * training.gradient_accumulation * devices
    per_epoch = steps_per_epoch(samples, training.micro_batch_size, training.gradient_accumulation, devices)
    if training.max_steps > 0:
        steps, rule = training.max_steps, "max_steps"
    else:
        steps, rule = math.ceil(training.epochs * per_epoch), "epochs"
        if steps < training.min_steps:
            steps, rule = training.min_steps, "min_steps"
    plan = Schedule(
        samples,
        per_step,
        per_epoch,
        steps,
        steps / per_epoch,
        devices,
        rule,
        *resolve_learning_rate(training.learning_rate, hidden_size),
    )
    plan.warnings = _warnings(plan, training)
    return plan


def _warnings(plan: Schedule, training) -> list[str]:
    if plan.steps >= TOO_FEW_STEPS:
        return []
    if training.max_steps > 0:
        fixes = [f"raise `training.max_steps` to {TOO_FEW_STEPS} or more (or set it to -1: epochs, with the floor)"]
    else:
        fixes = [f"raise `training.epochs` to {math.ceil(TOO_FEW_STEPS / plan.steps_per_epoch)}"]
        if training.min_steps < TOO_FEW_STEPS:
            fixes.insert(
                0, f"raise `training.min_steps` to {TOO_FEW_STEPS} or more (the default floor is {DEFAULT_MIN_STEPS})"
            )
    if training.max_steps <= 0 and plan.samples > plan.samples_per_step > 1:
        fixes.append(
            f"lower the samples per step (`training.micro_batch_size` × `training.gradient_accumulation`, now "
            f"{plan.samples_per_step // plan.devices} per device)"
        )
    return [
        (
            f"this run takes only {plan.steps} optimizer step(s) ({plan.samples:,} samples, {plan.samples_per_step:,} "
            f"per step, {plan.epochs:,.1f} epochs): in lorafit's small-data sweep (BENCHMARKS.md) runs with fewer than "
            f"{TOO_FEW_STEPS} steps learned few of their facts. To learn from this data, " + ", or ".join(fixes) + "."
        )
    ]


def add_layout(cfg, prepared) -> None:
    """With packing on, how the micro-batches will be laid out, added to `prepared.stats["packing"]`: rows per epoch
    and real / computed tokens, packed and unpacked (what `data check` and the training data line show)."""
    if cfg.data.packing and prepared.sample_lengths is not None:
        flat = pick_attention(cfg.model.attn_implementation).startswith("flash_attention")
        prepared.stats["packing"] = {
            **layout_stats(
                prepared.sample_lengths, cfg.training.micro_batch_size, cfg.data.max_length, cfg.training.seed, flat
            ),
            "samples": len(prepared.train),
            "micro_batch_size": cfg.training.micro_batch_size,
        }


def describe_run(cfg, prepared, hidden_size: int | None = None) -> Schedule:
    """The packing layout (add_layout) and the schedule of `cfg` on prepared data."""
    add_layout(cfg, prepared)
    return plan_schedule(cfg.training, len(prepared.train), hidden_size=hidden_size)


def schedule_for_config(cfg, hidden_size: int | None = None) -> dict:
    """What `lorafit plan` shows: the schedule on the config's data (tokenizer only, no weights), or, when the data
    or the tokenizer cannot be read, the samples per step and why the rest is unknown."""
    try:
        for source in cfg.data.train + cfg.data.validation:  # a missing file is named before any tokenizer loads
            expand_source(source.path)
        if not cfg.data.train:
            raise DataError("no training data: `data.train` is empty.")
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.tokenizer, cfg.model.trust_remote_code, cfg.model.revision)
        prepared = prepare_data(cfg.data, tokenizer, cfg.training.seed)
    except (LorafitError, OSError, ValueError) as err:
        reason = err.message if isinstance(err, LorafitError) else f"{type(err).__name__}: {str(err)[:200]}"
        per_step = cfg.training.micro_batch_size * cfg.training.gradient_accumulation * world_size()
        rate, how = resolve_learning_rate(cfg.training.learning_rate, hidden_size)
        return {
            "samples": None,
            "samples_per_step": per_step,
            "steps": None,
            "epochs": None,
            "learning_rate": rate,
            "warnings": [],
            "line": f"schedule: {per_step} samples per optimizer step; steps and epochs unknown: "
            f"the data could not be counted ({reason.splitlines()[0]}); learning rate "
            + (f"{rate:.2g} {how}" if rate else how),
        }
    schedule = describe_run(cfg, prepared, hidden_size)
    return {**schedule.as_dict(), "line": schedule.line()}
