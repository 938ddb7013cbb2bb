"""`lorafit plan`: exact parameter counts and a memory estimate for a run config, without loading weights.

The model is built on PyTorch's `meta` device (shapes, no storage) and wrapped by PEFT exactly as training
wraps it, so the counts are PEFT's own. Memory is the sum of named terms, each a formula of the architecture
and the config (see `memory_terms`); the activation formula lists, per token and layer, the tensors autograd
keeps for the backward pass of a LoRA-wrapped Llama layer (tests/test_plan.py checks it against the tensors
PyTorch actually saves).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from lorafit.config import load_config
from lorafit.plan.architecture import count_parameters
from lorafit.plan.display import print_plan
from lorafit.plan.memory import GPUS, NF4_BYTES, GiB, changes_to_fit, memory_terms, resolve_gpu, verdicts


def build_plan(cfg, gpu: str | None = None) -> dict:
    """Everything `lorafit plan` prints, as one dict."""
    chosen = resolve_gpu(gpu)
    counts, table, arch, config = count_parameters(cfg)
    terms = memory_terms(cfg, arch, counts)
    cpu = memory_terms(cfg, arch, counts, device="cpu")
    nf4 = counts["linear"] * NF4_BYTES + (counts["base"] - counts["linear"]) * 4
    fits = verdicts(terms["total"])
    for k, row in enumerate(fits):
        if row["verdict"] != "fits" and (chosen is None or k == chosen):
            found = changes_to_fit(cfg, arch, counts, row["usable_gib"])
            row["changes"], row["total_after_changes"] = found if found else (None, None)
    return {
        "model": cfg.model.name,
        "architecture": asdict(arch),
        "parameters": {k: v for k, v in counts.items() if k != "targets"},
        "lora": table,
        "memory": terms,
        "memory_cpu": cpu,
        "base_weights_bf16": counts["base"] * 2,
        "base_weights_nf4": nf4,
        "gpus": fits,
        "chosen_gpu": None if chosen is None else GPUS[chosen][0],
        "settings": {
            "dtype": cfg.model.dtype,
            "quantization": cfg.model.quantization,
            "micro_batch_size": cfg.training.micro_batch_size,
            "max_length": cfg.data.max_length,
            "gradient_checkpointing": cfg.training.gradient_checkpointing,
            "loss": cfg.training.loss,
            "optimizer": cfg.training.optimizer,
            "attention": cfg.model.attn_implementation,
        },
    }


def plan(config_path: str, gpu: str | None = None, as_json: bool = False, overrides: list[str] | None = None) -> dict:

    cfg = load_config(config_path, overrides or [])
    result = build_plan(cfg, gpu)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_plan(result)
    return result


def suggest_for_oom(cfg, device_gib: float | None = None) -> str | None:
    """What `lorafit train` prints on out-of-memory: the estimate and the changes that fit this GPU's memory."""
    if device_gib is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    counts, _, arch, _ = count_parameters(cfg)
    total = memory_terms(cfg, arch, counts)["total"]
    found = changes_to_fit(cfg, arch, counts, device_gib)
    head = f"  the planner estimates {total / GiB:.1f} GiB for this config on a {device_gib:.0f} GiB device"
    if found is None:
        return head + "; none of the usual changes fits it: use a larger GPU or several (FSDP, see configs/)."
    changes, after = found
    return f"{head}; this fits ({after / GiB:.1f} GiB):\n    lorafit train CONFIG " + " ".join(changes)
