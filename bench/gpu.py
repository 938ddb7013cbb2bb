"""Llama 3.1 8B LoRA throughput on one GPU: lorafit vs plain transformers Trainer + PEFT with padding, same run.

    PYTHONPATH=src python bench/gpu.py            # one H100/H200: ~4 min; appends to BENCHMARKS.md
    PYTHONPATH=src python bench/gpu.py --tiny     # CPU smoke test of the same code path (~1 min), writes nothing

The model is the Llama 3.1 8B architecture (hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab
128,256) with random bf16 weights built on the GPU: no download. LoRA r=16, alpha 32 on every linear
layer. The data are synthetic token samples with Alpaca-like long-tailed lengths (median ~350 tokens,
capped at 2048), 40% prompt (untrained) and 60% answer, the same samples for every variant.

Variants, each in its own process (clean peak memory); each lorafit variant has a baseline with the same
gradient checkpointing setting:
  lorafit            lorafit's Trainer (chunked loss, trained positions only), rows packed to 2048, attention as
                     lorafit picks it (flash-attention varlen where installed, else per-sample sdpa), no checkpointing
  transformers       transformers' Trainer + PEFT, 4 samples padded to the longest per micro-batch, the model's own
                     loss (full logits), sdpa, no checkpointing
  transformers_flat  the same Trainer with transformers' padding-free DataCollatorWithFlattening (one flat row per
                     micro-batch, restarting position_ids) and flash_attention_2: the strongest plain baseline
                     (without flash-attn installed it is reported as not run), no checkpointing
  lorafit_gc         lorafit with gradient checkpointing
  transformers_gc    the padded baseline with gradient checkpointing, 8 samples per micro-batch
Throughput counts real (non-padding) tokens over the timed optimizer steps (after warm-up steps).
MFU = real tokens/s x model FLOPs per token / peak, with 4N model FLOPs per token (forward 2N, backward to the
inputs 2N; N = 8.03e9; LoRA trains no base weight, so no weight-gradient matmuls). HFU counts the FLOPs the
hardware really does, recomputation included: 6N per token with checkpointing, 4N without. Peak bf16 dense
989 TFLOP/s (H100 and H200; pass --peak-tflops for other GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
LLAMA31_8B = dict(
    vocab_size=128_256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
N_8B = 8.03e9
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
PAD = 128_004  # <|finetune_right_pad_id|>; the tiny model pads with its last id
# name: (gradient checkpointing, packed rows per micro-batch or samples per batch, accumulation)
VARIANTS = {
    "lorafit": (False, 1, 8),
    "transformers": (False, 4, 8),
    "transformers_flat": (False, 8, 4),
    "lorafit_gc": (True, 4, 2),
    "transformers_gc": (True, 8, 4),
}
TINY_VARIANTS = {
    "lorafit": (False, 2, 1),
    "transformers": (False, 4, 1),
    "transformers_flat": (False, 4, 1),
    "lorafit_gc": (True, 2, 1),
    "transformers_gc": (True, 4, 1),
}
BASELINE = {"lorafit": "transformers", "lorafit_gc": "transformers_gc"}  # same checkpointing setting


def samples(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token samples: log-normal lengths (median seq/6), the first 40% untrained, like an instruction dataset."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(min(seq, max(16, rng.lognormal(np.log(seq / 6), 0.8))))
        ids = rng.integers(0, min(vocab, 128_000), size=length).tolist()
        prompt = int(0.4 * length)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


class Rows:
    """A map-style dataset over a list of dicts (what the Trainer's DataLoader needs)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def pad_id(arch: dict) -> int:
    return PAD if arch["vocab_size"] > PAD else arch["vocab_size"] - 1


def build_model(arch: dict, device: str, dtype, attention: str = "sdpa"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bf16 on the GPU: no 32 GB fp32 detour
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**arch, pad_token_id=pad_id(arch), attn_implementation=attention))
    finally:
        torch.set_default_dtype(previous)
    return model


def lorafit_trainer(
    model, data: list[dict], work: Path, gc: bool, micro: int, accum: int, steps: int, bf16: bool, pad: int
):
    """lorafit's own pieces: packing, its training attention and collator, LoRA attach, training arguments, Trainer."""
    from types import SimpleNamespace

    from lorafit.config import RunConfig
    from lorafit.data.collate import make_collator
    from lorafit.data.packing import best_fit_decreasing, pack_rows
    from lorafit.models.attention import training_attention
    from lorafit.models.lora import attach_lora
    from lorafit.train.callbacks import NanGuard, TokenCounter
    from lorafit.train.trainer import LorafitTrainer, training_arguments

    bins = best_fit_decreasing([len(s["input_ids"]) for s in data], capacity=_seq(work))
    packed = pack_rows(
        {
            "member_ids": [[data[i]["input_ids"] for i in b] for b in bins],
            "member_labels": [[data[i]["labels"] for i in b] for b in bins],
        }
    )
    rows = [dict(zip(packed, values)) for values in zip(*packed.values())]
    cfg = RunConfig.model_validate(
        {
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "training": {
                "max_steps": steps,
                "micro_batch_size": micro,
                "gradient_accumulation": accum,
                "precision": "bf16" if bf16 else "fp32",
                "gradient_checkpointing": gc,
                "logging_steps": 10_000,
                "warmup_ratio": 0.0,
                "loss": "chunked",
            },
            "output": {"dir": str(work), "name": "lorafit"},
        }
    )
    attention = training_attention(model, model.config._attn_implementation)  # as train/setup.py does
    model = attach_lora(model, cfg.lora, gc)
    collator = make_collator(SimpleNamespace(pad_token_id=pad), packed=True, attn_implementation=attention)
    return LorafitTrainer(
        model=model,
        args=training_arguments(cfg, work / "lorafit", has_eval=False),
        train_dataset=Rows(rows),
        data_collator=collator,
        loss_mode=cfg.training.loss,
        pad_token_id=pad,
        tokens=TokenCounter(),
        nan_guard=NanGuard(cfg.training.max_bad_steps),
        checkpoint_dir=work / "lorafit" / "checkpoints",
        checkpoint_keep=None,
    )


def plain_trainer(
    model,
    data: list[dict],
    work: Path,
    gc: bool,
    micro: int,
    accum: int,
    steps: int,
    bf16: bool,
    pad: int,
    flat: bool = False,
):
    """What a plain script does: PEFT LoRA, transformers' Trainer, padded batches (or transformers' padding-free
    DataCollatorWithFlattening), the model's own loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from lorafit.data.collate import (
        PadCollator,  # right padding, labels -100 on pads: DataCollatorForSeq2Seq's job
    )

    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    args = TrainingArguments(
        output_dir=str(work / "plain"),
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=2e-4,
        bf16=bf16,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not bf16,
    )
    collator = DataCollatorWithFlattening() if flat else PadCollator(pad)
    return Trainer(model=model, args=args, train_dataset=Rows(data), data_collator=collator)


def _seq(work: Path) -> int:
    return int((work / "seq").read_text())


def measure(variant: str, work: Path, tiny: bool, steps: int, warmup: int) -> dict:
    """Build the model, train warm-up + timed steps, return real tokens, seconds and peak memory."""
    import torch
    from transformers import TrainerCallback

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    bf16 = device == "cuda"
    gc, micro, accum = (TINY_VARIANTS if tiny else VARIANTS)[variant]
    arch = TINY if tiny else LLAMA31_8B
    data = json.loads((work / "samples.json").read_text())
    model = build_model(arch, device, torch.bfloat16 if bf16 else torch.float32, _attention(variant, device))
    n_params = sum(p.numel() for p in model.parameters())
    if variant.startswith("transformers"):
        trainer = plain_trainer(
            model, data, work, gc, micro, accum, warmup + steps, bf16, pad_id(arch), flat=variant == "transformers_flat"
        )
    else:
        trainer = lorafit_trainer(model, data, work, gc, micro, accum, warmup + steps, bf16, pad_id(arch))

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    real = {"tokens": 0}
    original_step = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None):  # real tokens of every micro-batch
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        real["tokens"] += int(mask.sum()) if mask is not None and mask.dim() == 2 else int((ids != pad_id(arch)).sum())
        return original_step(model, inputs, num_items_in_batch)

    trainer.training_step = counting_step

    class Clock(TrainerCallback):
        start = end = None
        tokens_at_start = 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:  # timing starts after the warm-up steps
                sync()
                self.start, self.tokens_at_start = time.perf_counter(), real["tokens"]
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            elif state.global_step == warmup + steps:
                sync()
                self.end = time.perf_counter()

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    tokens = real["tokens"] - clock.tokens_at_start
    seconds = clock.end - clock.start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        from lorafit.runtime import peak_rss_bytes

        peak = peak_rss_bytes()
    return {
        "variant": variant,
        "tokens": tokens,
        "seconds": seconds,
        "peak_bytes": peak,
        "gc": gc,
        "params": n_params,
        "micro": micro,
        "accum": accum,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "attention": trainer.model.config._attn_implementation,
    }


def _attention(variant: str, device: str) -> str:
    """lorafit: what it picks (flash_attention_2 on CUDA where installed, else sdpa, switched to per-sample sdpa);
    the flattening baseline needs flash attention on a GPU (on the CPU smoke test sdpa runs the same code path)."""
    import importlib.util

    from lorafit.runtime import pick_attention

    if variant.startswith("lorafit"):
        return pick_attention("auto")
    if variant == "transformers_flat" and device == "cuda":
        if importlib.util.find_spec("flash_attn") is None:
            raise SystemExit("transformers_flat needs flash-attn (pip install flash-attn): not run")
        return "flash_attention_2"
    return "sdpa"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 3 steps, BENCHMARKS.md untouched.")
    p.add_argument("--steps", type=int, default=None, help="Timed optimizer steps (default 8; tiny 2).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 2; tiny 1).")
    p.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--peak-tflops", type=float, default=None, help="Peak dense bf16 TFLOP/s of this GPU for MFU.")
    p.add_argument("--timeout", type=int, default=150, help="Seconds allowed per variant (an OOM or hang is reported).")
    p.add_argument(
        "--inline", action="store_true", help="Run the variants in this process (smoke tests; shared peak memory)."
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    steps = a.steps or (2 if a.tiny else 8)
    warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 2)
    if a.child:
        print("RESULT " + json.dumps(measure(a.child, a.work, a.tiny, steps, warmup)), flush=True)
        return
    _preflight(a.tiny)
    seq = 256 if a.tiny else 2048
    with tempfile.TemporaryDirectory(prefix="lorafit-gpu-") as tmp:
        work = Path(tmp)
        (work / "seq").write_text(str(seq))
        (work / "samples.json").write_text(
            json.dumps(samples(64 if a.tiny else 3000, seq, (TINY if a.tiny else LLAMA31_8B)["vocab_size"]))
        )
        results = []
        for variant in a.variants.split(","):
            results.append(_run(variant, work, a, steps, warmup))
            print(_line(results[-1], a), flush=True)
    report(results, a, steps, warmup, seq)


def _preflight(tiny: bool) -> None:
    """A GPU machine may lack lorafit's lighter dependencies: say exactly what to bring rather than fail later."""
    import importlib.util

    missing = [
        m
        for m in ("torch", "transformers", "peft", "accelerate", "pydantic", "yaml", "numpy")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise SystemExit(
            f"missing packages: {', '.join(missing)}. Install lorafit (pip install -e .) or bring the "
            "wheels (see bench/README.md, 'GPU machine without network')."
        )
    if not tiny:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --tiny for the CPU smoke test.")


def _run(variant: str, work: Path, a, steps: int, warmup: int) -> dict:
    if a.inline:
        started = time.perf_counter()
        return {**measure(variant, work, a.tiny, steps, warmup), "wall": time.perf_counter() - started}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--work",
        str(work),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ] + (["--tiny"] if a.tiny else [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
    }
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {a.timeout} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        oom = any("OutOfMemory" in line or "out of memory" in line for line in tail)
        sys.stderr.write("\n".join(tail) + "\n")
        said = tail[-1] if tail and "not run" in tail[-1] else f"failed (exit {proc.returncode})"
        return {"variant": variant, "error": "out of memory" if oom else said}
    out = json.loads(lines[-1][len("RESULT ") :])
    out["wall"] = time.perf_counter() - started
    return out


def _utilisation(r: dict, a, hardware: bool = False) -> float | None:
    """MFU (model FLOPs: 4N per token) or, with `hardware`, HFU (6N per token when checkpointing recomputes)."""
    if a.tiny or "error" in r:
        return None
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in r["device"]), None)
    if peak is None:
        return None
    return r["tokens"] / r["seconds"] * (6 if hardware and r["gc"] else 4) * N_8B / (peak * 1e12)


def _line(r: dict, a) -> str:
    if "error" in r:
        return f"{r['variant']:18s} {r['error']}"
    mfu, hfu = _utilisation(r, a), _utilisation(r, a, hardware=True)
    return (
        f"{r['variant']:18s} {r['tokens'] / r['seconds']:10,.0f} real tok/s  "
        f"peak {r['peak_bytes'] / 2**30:6.1f} GiB"
        + (f"  MFU {mfu:.1%}  HFU {hfu:.1%}" if mfu is not None else "")
        + f"  ({r['wall']:.0f} s in all)"
    )


def _ratio(r: dict, base: dict | None) -> str:
    if base is None or "error" in base or "error" in r:
        return "—"
    return f"{(r['tokens'] / r['seconds']) / (base['tokens'] / base['seconds']):.2f}x"


def report(results: list[dict], a, steps: int, warmup: int, seq: int) -> None:
    from _report import machine, table, write_section

    by_name = {r["variant"]: r for r in results}
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], "—", "—", "—", "—", "—", "—", "—", r["error"]])
            continue
        mfu, hfu = _utilisation(r, a), _utilisation(r, a, hardware=True)
        kind = (
            "packed rows"
            if r["variant"].startswith("lorafit")
            else ("samples, one flat row" if r["variant"] == "transformers_flat" else "padded samples")
        )
        batch = f"{r['micro']} {kind} x {r['accum']}" + (", checkpointing" if r["gc"] else "")
        rows.append(
            [
                r["variant"],
                f"{r['tokens'] / r['seconds']:,.0f}",
                "—" if mfu is None else f"{mfu:.1%}",
                "—" if hfu is None else f"{hfu:.1%}",
                f"{r['peak_bytes'] / 2**30:.1f}",
                batch,
                r["attention"],
                _ratio(r, by_name.get(BASELINE.get(r["variant"], ""))),
                _ratio(r, by_name.get("transformers_flat")) if r["variant"] == "lorafit" else "",
            ]
        )
    device = next((r["device"] for r in results if "device" in r), "?")
    body = "\n".join(
        [
            f"### {device}: Llama 3.1 8B LoRA ({time.strftime('%Y-%m-%d')})",
            "",
            f"`PYTHONPATH=src python bench/gpu.py{' --tiny' if a.tiny else ''}` — {steps} timed optimizer steps after "
            f"{warmup} warm-up, seq {seq}, LoRA r=16 all-linear, {'fp32 (CPU smoke test)' if a.tiny else 'bf16'}. "
            f"MFU counts model FLOPs (4N per token); HFU counts recomputation too (6N with checkpointing). Each lorafit "
            f"variant is compared with the plain Trainer at the same checkpointing setting. Machine: {machine()}.",
            "",
            table(
                [
                    "variant",
                    "real tokens/s",
                    "MFU",
                    "HFU",
                    "peak GiB",
                    "micro-batch x accumulation",
                    "attention",
                    "vs plain Trainer, same checkpointing",
                    "vs padding-free flash baseline",
                ],
                rows,
            ),
        ]
    )
    print("\n" + body)
    if not a.tiny:
        print(f"\nappended to {write_section('gpu', body, append=True)}")


if __name__ == "__main__":
    main()
