"""How close is `lorafit plan` to reality? The planner's estimate next to measured memory.

    PYTHONPATH=src python bench/plan_memory.py          # CUDA: peak of real training steps; CPU: activations
    PYTHONPATH=src python bench/plan_memory.py --smoke  # a tiny shape, checks the code path (nothing written)

CUDA: Llama 3.1 8B's architecture with random bf16 weights (no download), LoRA r=16 on all linear layers
attached by lorafit, AdamW, lorafit's loss, three optimizer steps on random tokens under bf16 autocast;
measured = torch.cuda.max_memory_allocated, planned = the plan's total minus its framework overhead (CUDA
context and allocator slack are not in max_memory_allocated). Goal: within 10%.
CPU (no GPU here): the activation term alone, against the bytes autograd really saves in a forward pass of
SmolLM2-135M's architecture (random weights) under bf16 autocast; the same formula the GPU plan uses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

GPU_CASES = [  # (label, config overrides); micro-batches have no padding and no packing: sdpa runs maskless
    ("bf16, checkpointing, 1x2048", dict(gradient_checkpointing=True, micro_batch_size=1, max_length=2048)),
    ("bf16, no checkpointing, 1x1024", dict(gradient_checkpointing=False, micro_batch_size=1, max_length=1024)),
    ("bf16, checkpointing, 1x4096", dict(gradient_checkpointing=True, micro_batch_size=1, max_length=4096)),
    (
        "bf16, checkpointing, plain loss, 1x2048",
        dict(gradient_checkpointing=True, micro_batch_size=1, max_length=2048, loss="plain"),
    ),
]


def run_config(model: str, t: dict, dropout: float = 0.05):
    from lorafit.config import RunConfig

    return RunConfig.model_validate(
        {
            "model": {"name": model, "dtype": "bf16", "attn_implementation": "sdpa"},
            "lora": {"r": 16, "alpha": 32, "dropout": dropout, "target_modules": "all-linear"},
            "data": {"max_length": t["max_length"], "packing": False},
            "training": {
                "precision": "bf16",
                "micro_batch_size": t["micro_batch_size"],
                "loss": t.get("loss", "chunked"),
                "gradient_checkpointing": t["gradient_checkpointing"],
            },
        }
    )


def measure_gpu_steps(cfg, device: str = "cuda", steps: int = 3) -> int:
    """Peak bytes allocated over real LoRA training steps (random weights at the real size)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.models.lora import attach_lora
    from lorafit.plan.architecture import load_architecture
    from lorafit.train.loss import causal_lm_loss

    config = load_architecture(cfg.model)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model = attach_lora(model, cfg.lora, gradient_checkpointing=cfg.training.gradient_checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    shape = (cfg.training.micro_batch_size, cfg.data.max_length)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, shape, device=device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, mode=cfg.training.loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return peak


def saved_activation_bytes(cfg) -> int:
    """Bytes of every tensor autograd saves in one forward (weights and autocast weight copies excluded)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafit.models.lora import lora_config
    from lorafit.plan.architecture import load_architecture

    config = load_architecture(cfg.model)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model = get_peft_model(model, lora_config(cfg.lora)).train()
    model.enable_input_require_grads()  # as under training: layer 0 saves what every other layer saves
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and tuple(t.shape) not in shapes:  # skip autocast's bf16 copies of the fp32 adapters
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (cfg.training.micro_batch_size, cfg.data.max_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, logits_to_keep=1)  # the LM head is the loss's business, planned separately
    return sum(seen.values())


def main() -> None:
    import torch
    from _report import machine, table, write_section

    from lorafit.plan.planner import build_plan

    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, nothing written")
    args = parser.parse_args()
    rows, started = [], time.time()
    if torch.cuda.is_available() and not args.smoke:
        for label, t in GPU_CASES:
            cfg = run_config("meta-llama/Llama-3.1-8B-Instruct", t)
            plan = build_plan(cfg)["memory"]
            planned = plan["total"] - plan["framework_overhead"]
            measured = measure_gpu_steps(cfg)
            rows.append(
                [
                    label,
                    f"{planned / 2**30:.2f}",
                    f"{measured / 2**30:.2f}",
                    f"{100 * (planned - measured) / measured:+.1f}%",
                ]
            )
            print(rows[-1], flush=True)
        what = (
            "peak GiB of 3 LoRA training steps (torch.cuda.max_memory_allocated) vs plan total minus framework overhead"
        )
        headers = ["Llama 3.1 8B, r=16 all-linear", "planned GiB", "measured GiB", "plan error"]
    else:
        cases = [("1x512", 1, 512), ("1x1024", 1, 1024)] if not args.smoke else [("1x64", 1, 64)]
        for label, batch, length in cases:
            cfg = run_config(
                "smollm2-135m-instruct",
                dict(gradient_checkpointing=False, micro_batch_size=batch, max_length=length),
                dropout=0.0,
            )
            planned = build_plan(cfg)["memory"]["activations"]
            measured = saved_activation_bytes(cfg)
            rows.append(
                [
                    label,
                    f"{planned / 2**20:.1f}",
                    f"{measured / 2**20:.1f}",
                    f"{100 * (planned - measured) / measured:+.1f}%",
                ]
            )
            print(rows[-1], flush=True)
        what = "activation term vs bytes autograd saves in a bf16-autocast forward (no GPU on this machine)"
        headers = ["SmolLM2-135M shape, r=16 all-linear, no dropout", "planned MiB", "measured MiB", "plan error"]
        if args.smoke and len(rows) == 1:
            measure_gpu_steps(
                run_config(
                    "smollm2-135m-instruct", dict(gradient_checkpointing=True, micro_batch_size=1, max_length=16)
                ),
                device="cpu",
                steps=1,
            )
    if args.smoke:
        return
    body = (
        f"## Planner vs measured memory (`bench/plan_memory.py`)\n\nCommand: `PYTHONPATH=src python bench/plan_memory.py`\n"
        f"Machine: {machine()}. {what}; {time.time() - started:.0f} s.\n\n" + table(headers, rows)
    )
    write_section("plan_memory", body)


if __name__ == "__main__":
    main()
