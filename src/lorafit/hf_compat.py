"""Every use of a private transformers / datasets API, in one place.

Each is something the public API does not offer yet. tests/test_hf_compat.py checks each against the installed
versions, so an incompatible release fails there, loudly and by name, instead of deep inside a run; pyproject.toml
bounds transformers below its next major version for the same reason.
"""

from __future__ import annotations

import inspect

# Trainer._save_checkpoint(model, trial) writes one checkpoint folder; train/checkpoints.AtomicCheckpoints overrides it
# to seal that folder and rename it into place, since the public save hooks run before the folder is complete.
SAVE_CHECKPOINT_PARAMETERS = ["self", "model", "trial"]


# The Trainer's writers of what a resume needs besides the model, each `(self, output_dir)`. It will not call them for
# a model sharded at load time (FSDP, runtime.take_over_fsdp); save_training_state calls them itself.
TRAINING_STATE_WRITERS = ("_save_optimizer_and_scheduler", "_save_scaler", "_save_rng_state")


def check_trainer() -> None:
    """Raise if transformers' Trainer no longer has the `_save_checkpoint(model, trial)` lorafit overrides, or the
    training-state writers it calls."""
    from transformers import Trainer

    wanted = {
        "_save_checkpoint": SAVE_CHECKPOINT_PARAMETERS,
        **{name: ["self", "output_dir"] for name in TRAINING_STATE_WRITERS},
    }
    for name, parameters in wanted.items():
        method = getattr(Trainer, name, None)
        found = list(inspect.signature(method).parameters) if method is not None else None
        if found != parameters:
            import transformers

            raise RuntimeError(
                f"transformers {transformers.__version__}: Trainer.{name} has parameters {found}, "
                f"lorafit's checkpoints need {parameters}; install transformers>=5.17,<6."
            )


def save_training_state(trainer, folder) -> None:
    """Optimizer, LR schedule, grad scaler and this rank's RNG state into a checkpoint folder, as the Trainer writes
    them (every rank calls it; the Trainer's writers decide which rank writes what)."""
    for name in TRAINING_STATE_WRITERS:
        getattr(trainer, name)(str(folder))


def compile_chat_template(template: str):
    """transformers' own compiled Jinja environment for chat templates (the sandbox and filters it renders with):
    rendering it directly skips apply_chat_template's ~0.5 ms of per-call checks, which dominates at a million rows.
    Callers must check the result against apply_chat_template and fall back to it."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


def dataset_fingerprint(dataset) -> str:
    """The content hash datasets keeps for its cache files; lorafit chains it into its own cache keys."""
    return dataset._fingerprint


def compiled_inner(model):
    """The module torch.compile wrapped, or None."""
    return getattr(model, "_orig_mod", None)


# TRL's DPOTrainer: `_prepare_dataset(dataset, processing_class, args, dataset_name)` tokenizes the rows itself;
# lorafit hands it pairs already tokenized with its own templates (data/preference_data.py), so train/dpo.py makes it
# return them as they are. `_send_telemetry()` pings the Hub on every trainer start; lorafit sends nothing.
DPO_PREPARE_PARAMETERS = ["self", "dataset", "processing_class", "args", "dataset_name"]


def check_dpo_trainer() -> None:
    """Raise if TRL's DPOTrainer no longer has the private methods train/dpo.py overrides."""
    from trl import DPOTrainer

    wanted = {"_prepare_dataset": DPO_PREPARE_PARAMETERS, "_send_telemetry": ["self"]}
    for name, parameters in wanted.items():
        method = getattr(DPOTrainer, name, None)
        found = list(inspect.signature(method).parameters) if method is not None else None
        if found != parameters:
            import trl

            raise RuntimeError(
                f"trl {trl.__version__}: DPOTrainer.{name} has parameters {found}, lorafit needs {parameters}; "
                "install trl>=1.16,<2."
            )
