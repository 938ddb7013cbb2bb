"""Runtime facts: pure functions of the config and the machine (dtype, attention kernel, precision, launcher/rank).

Resolved here once and passed down, so no stage imports the training orchestrator to learn them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # config spelling -> torch attribute


def torch_dtype(name: str):
    """The torch dtype for a config spelling (bf16, fp16, fp32)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def pick_dtype(setting: str):
    """`auto`: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (bf16 matmul is ~70x slower there)."""
    import torch

    if setting == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return torch_dtype(setting)


def pick_attention(setting: str) -> str:
    """`auto`: flash-attention 2 on CUDA where installed, else PyTorch's sdpa."""
    if setting != "auto":
        return setting
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def default_device_map():
    """The whole model on this process's GPU (LOCAL_RANK under torchrun), else on the CPU."""
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def sharded_launch() -> str | None:
    """`FSDP` or `DeepSpeed ZeRO-3` when accelerate launched one (they shard the weights), else None."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file:
        try:
            stage = str(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", stage))
        except (OSError, ValueError, AttributeError):
            pass
    return "DeepSpeed ZeRO-3" if stage == "3" else None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_precision(setting: str) -> str:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU; an explicit setting wins."""
    if setting != "auto":
        return setting
    return {"bfloat16": "bf16", "float16": "fp16"}.get(str(pick_dtype("auto")).removeprefix("torch."), "fp32")
