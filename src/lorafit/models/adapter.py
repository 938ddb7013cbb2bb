"""Continuing an existing adapter (`model.adapter`): where it is, which base it belongs to, and loading it trainable.

A finished lorafit run directory names its base in config.yaml; the adapter is `RUN/adapter`. A bare PEFT adapter
folder (adapter_config.json) is accepted too, on the base `model.name` names.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lorafit.errors import ConfigError
from lorafit.models.lora import attach_lora, enable_checkpointing
from lorafit.models.lora_dropout import fuse_lora_dropout
from lorafit.models.lora_linear import fuse_lora_linears
from lorafit.models.rms_norm import fuse_rms_norms
from lorafit.models.sources import EMBEDDED
from lorafit.paths import user_path


def adapter_folder(path: str) -> Path:
    """The folder holding adapter_config.json for `model.adapter` (a run directory or the adapter itself)."""
    folder = user_path(path)
    for candidate in (folder / "adapter", folder):
        if (candidate / "adapter_config.json").is_file():
            if not (candidate / "adapter_model.safetensors").is_file():
                raise ConfigError(
                    f"`model.adapter`: {candidate} has no adapter_model.safetensors.",
                    "lorafit loads safetensors only; use a run directory written by `lorafit train`.",
                )
            return candidate
    raise ConfigError(
        f"`model.adapter`: {folder} is neither a finished lorafit run directory (no adapter/adapter_config.json) "
        "nor a PEFT adapter folder.",
        "Point it at the run directory of a finished `lorafit train`, e.g. runs/my-sft.",
    )


def resolve_adapter_base(cfg) -> Path | None:
    """The adapter folder of `cfg.model.adapter` (None without one); `cfg.model.name` becomes the run's base.

    A base set explicitly in the config must be the run's own: an adapter on another base is noise."""
    if not cfg.model.adapter:
        return None
    folder = adapter_folder(cfg.model.adapter)
    run_config = folder.parent / "config.yaml"
    if folder.name != "adapter" or not run_config.is_file():
        return folder
    try:
        run_model = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise ConfigError(f"`model.adapter`: cannot read {run_config}: {err}.") from None
    base = run_model.get("name")
    if not isinstance(base, str):
        return folder
    if "name" in cfg.model.model_fields_set and _same(cfg.model.name) != _same(base):
        raise ConfigError(
            f"`model.name` is {cfg.model.name!r}, but the adapter in `model.adapter` ({folder.parent}) was trained "
            f"on {base!r}.",
            "Remove `model.name` (the run's base is used), or set it to that base.",
        )
    cfg.model.name = base
    return folder


def _same(name: str) -> str:
    return name if name in EMBEDDED else str(user_path(name).resolve()) if user_path(name).exists() else name


def load_trainable_adapter(model, folder: Path, gradient_checkpointing: bool = False):
    """The base with the adapter of `folder` on top, its weights trainable (the base stays frozen)."""
    from peft import PeftModel

    if gradient_checkpointing:
        enable_checkpointing(model)
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


def add_adapter(model, folder: Path | None, lora_cfg, gradient_checkpointing: bool = False, fused: bool = True):
    """The adapter to train: the existing one of `folder` (`model.adapter`), else a new LoRA adapter.

    fused: lorafit's LoRA dropout (models/lora_dropout.py), the same dropout without a dropped copy of every LoRA
    input kept for backward, and the LoRA layer's training forward and backward as one function
    (models/lora_linear.py), and RMSNorm's fp32 training forward and backward as one function (models/rms_norm.py).
    Off where a trainer switches dropout off by finding torch's Dropout modules (DPO).
    """
    if folder is not None:
        model = load_trainable_adapter(model, folder, gradient_checkpointing)
    else:
        model = attach_lora(model, lora_cfg, gradient_checkpointing)
    if fused:
        fuse_lora_dropout(model)
        fuse_lora_linears(model)
        fuse_rms_norms(model)
    return model
