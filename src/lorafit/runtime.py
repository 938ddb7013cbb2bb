"""Runtime facts: pure functions of the config and the machine (dtype, attention kernel, precision, launcher/rank).

Resolved here once and passed down, so no stage imports the training orchestrator to learn them.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # config spelling -> torch attribute


def torch_dtype(name: str):
    """The torch dtype for a config spelling (bf16, fp16, fp32)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def pick_dtype(setting: str):
    """`auto`: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (without AMX bf16 matmuls are ~70x slower
    there; with it `pick_frozen_dtype` puts the frozen linear layers, not the model, in bf16)."""
    import torch

    if setting == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return torch_dtype(setting)


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, which starts afresh at exec. Not ru_maxrss: Linux keeps
    the parent's peak across fork and exec there, so a run started from a big Python process (a notebook kernel, a
    pytest worker) would report that process's peak as its own (2,701 MB for a 2,156 MB run under pytest)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS counts bytes, Linux KiB
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cpu_bf16_matrix_unit() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX, Sapphire Rapids and later): ~4x its fp32
    matmul rate (one core here: 372-384 vs 85-100 GFLOP/s at the embedded model's shapes). Without it bf16 matmuls
    on CPU are slower than fp32 (~1 GFLOP/s on AVX2)."""
    import torch

    probe = getattr(torch._C._cpu, "_init_amx", None)  # asks Linux for the AMX tile state; False where there is none
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def pick_frozen_dtype(model_cfg, precision: str):
    """The dtype the frozen base's linear layers are kept and multiplied in when it differs from the model's
    (`model.frozen_dtype`), else None: only over fp32 weights without autocast, quantization or sharding."""
    import torch

    if model_cfg.frozen_dtype == "same" or model_cfg.quantization != "none" or sharded_launch() or _deepspeed_launch():
        return None
    if pick_dtype(model_cfg.dtype) != torch.float32 or resolve_precision(precision) != "fp32":
        return None
    if model_cfg.frozen_dtype == "bf16":
        return torch.bfloat16
    # auto: only where the weights' dtype was left to lorafit too (an explicit fp32 means fp32 throughout)
    if model_cfg.dtype != "auto" or torch.cuda.is_available():
        return None
    return torch.bfloat16 if cpu_bf16_matrix_unit() else None


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


LORAFIT_FSDP = "LORAFIT_FSDP"  # set by take_over_fsdp: lorafit, not accelerate, shards this process's model


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def sharded_launch() -> str | None:
    """`FSDP` or `DeepSpeed ZeRO-3` when accelerate launched one (they shard the weights), else None."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or env.get(LORAFIT_FSDP) == "1":
        return "FSDP"
    if not _deepspeed_launch():
        return None
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file:
        try:
            stage = str(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", stage))
        except (OSError, ValueError, AttributeError):
            pass
    return "DeepSpeed ZeRO-3" if stage == "3" else None


def fsdp_size() -> int:
    """The ranks the base model is sharded over: the world size under an FSDP launch of 2+ processes, else 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world if sharded_launch() == "FSDP" and world > 1 else 1


def take_over_fsdp() -> int:
    """`accelerate launch --use_fsdp`: lorafit shards the base model itself, as it loads it (transformers'
    DistributedConfig, FSDP2): the frozen base weights are split across the ranks, the small LoRA weights stay whole
    on every rank and the Trainer averages their gradients, so rank 0 saves the adapter alone.

    Why not accelerate's own FSDP: accelerate 1.15 shards only on GPUs (on CPU its `--use_fsdp` silently trains plain
    DDP), and it would shard the LoRA weights too, so that saving them needs every rank. Its switch is turned off in
    this process, so nothing shards twice; returns the number of shards (1: not an FSDP launch)."""
    size = fsdp_size()
    if size > 1:
        os.environ[LORAFIT_FSDP] = "1"
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    return size


def deepspeed_collectives_over_gloo() -> bool:
    """A DeepSpeed launch on CPU: its collectives go through torch's gloo, as lorafit's DDP and FSDP do on CPU, not
    through DeepSpeed's shared-memory op. DeepSpeed compiles that op (C++ with OpenMP) in the first CPU launch on each
    machine: ~2 minutes of every process's start here, and it needs a C++ compiler.
    What it speeds up is the all-reduce of LoRA's few gradients, which gloo does in milliseconds. Returns whether
    this process is such a launch (DeepSpeed then never builds the op)."""
    import torch

    if not _deepspeed_launch() or torch.cuda.is_available():
        return False
    # the module by name: the attribute deepspeed.comm.torch is torch itself (deepspeed.comm re-exports it)
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None  # its TorchBackend calls this module function; None means no op
    return True


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_precision(setting: str) -> str:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU; an explicit setting wins."""
    if setting != "auto":
        return setting
    return {"bfloat16": "bf16", "float16": "fp16"}.get(str(pick_dtype("auto")).removeprefix("torch."), "fp32")
