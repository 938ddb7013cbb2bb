"""lorafit vs TRL's SFTTrainer on this CPU: same model, data, LoRA config, learning rate; alternating runs.

    PYTHONPATH=src python bench/train_cpu.py                 # 3 repeats, ~15 min on 2 cores
    PYTHONPATH=src python bench/train_cpu.py --quick         # smoke test: tiny data, 1 repeat, no BENCHMARKS.md

Model: a random Llama with the real Llama 3 vocabulary (128,256), hidden 256, 4 layers, 8 heads, 2 KV heads,
intermediate 688 (fp32); LoRA r=16, alpha 32, dropout 0.05 on every linear layer; max_length 1024; the real
Llama 3 tokenizer; an Alpaca-like instruction dataset (long-tailed lengths, see `make_dataset`) rendered in
the Llama 3.1 chat format, loss on the answers only.

TRL gets exactly lorafit's tokens and labels (pre-tokenized `input_ids`/`labels`), so both train the same
tokens on the same targets. TRL runs at its defaults except two that would otherwise measure something
else: fp32 instead of its bf16 default (this CPU has no bf16 matrix unit; lorafit is fp32 on CPU too) and
no gradient checkpointing (TRL's default is on; lorafit's is off).

Each run is a fresh subprocess (clean peak RSS). Real tokens/s = non-padding tokens trained / seconds from
the first training step to the end of the last one (model loading and data preparation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
TOKENIZER = Path(os.environ.get("LORAFIT_LLAMA3_TOKENIZER", ROOT.parent / "shared" / "llama3" / "tokenizer.model"))
MODEL = dict(vocab_size=128_256, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=688, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False)
LORA = dict(r=16, alpha=32, dropout=0.05)
MAX_LENGTH = 1024
LEARNING_RATE = 2e-4
VARIANTS = ("lorafit", "trl", "trl_packing")
PAD = 128_004  # <|finetune_right_pad_id|>
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- setup (parent) ---------------------------------------------------------------------------------
def make_dataset(path: Path, n: int, seed: int, tokenizer) -> None:
    """Alpaca-like rows: short instructions, an `input` 40% of the time, answers with a long right tail.

    Word counts are log-normal like Alpaca's (answers: median 40 words, mean ~60, p99 ~330), words are real
    Llama 3 vocabulary words, so token counts behave like English text.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    words = sorted({t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower()
                    and 3 <= len(t) <= 10})

    def text(median: float, sigma: float, cap: int) -> str:
        count = int(min(cap, max(1, rng.lognormal(np.log(median), sigma))))
        return " ".join(rng.choice(words, size=count)).capitalize() + "."

    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            row = {"instruction": text(12, 0.4, 60), "input": text(15, 0.8, 200) if rng.random() < 0.4 else "",
                   "output": text(40, 0.9, 650)}
            f.write(json.dumps(row) + "\n")


def make_model(folder: Path, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**MODEL, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def lorafit_config(work: Path, rows_per_step: int, name: str, data: Path):
    from lorafit.config import RunConfig

    return RunConfig.model_validate({
        "model": {"name": str(work / "model"), "dtype": "fp32", "attn_implementation": "sdpa"},
        "data": {"train": [str(data)], "max_length": MAX_LENGTH, "packing": True},
        "lora": {**LORA, "target_modules": "all-linear"},
        "training": {"epochs": 1, "micro_batch_size": rows_per_step, "learning_rate": LEARNING_RATE, "logging_steps": 1,
                     "seed": 0, "precision": "fp32"},
        "output": {"dir": str(work / "runs"), "name": name, "overwrite": True},
    })


# -- one measured run (child) -----------------------------------------------------------------------
STARTED = time.perf_counter()


def clock_callback():
    """Seconds from the start of the first optimizer step to the end of the last (same for every trainer)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        first = last = cpu_first = cpu_last = None  # wall clock, and CPU time of this process (all its threads)

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first is None:
                self.first, self.cpu_first = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.last, self.cpu_last = time.perf_counter(), time.process_time()

    return Clock()


def child_lorafit(work: Path, rows_per_step: int, data: Path) -> dict:
    import lorafit.train.loss
    from lorafit.train.run import run_training

    counts = {"real": 0, "computed": 0}
    real_loss = lorafit.train.loss.causal_lm_loss

    def counting_loss(model, inputs, *args, **kwargs):  # what each micro-batch really computed
        if model.training:
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            counts["real"] += int(mask.sum()) if mask is not None and mask.dim() == 2 else int((ids != PAD).sum())
            counts["computed"] += ids.numel()
        return real_loss(model, inputs, *args, **kwargs)

    lorafit.train.loss.causal_lm_loss = counting_loss  # train.py looks it up at call time
    clock = clock_callback()
    run_dir = run_training(lorafit_config(work, rows_per_step, "lorafit", data), quiet=True, callbacks=[clock])
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"real_tokens": counts["real"], "seconds": clock.last - clock.first, "steps": summary["steps"],
            "cpu_seconds": clock.cpu_last - clock.cpu_first,
            "padding_efficiency": round(counts["real"] / counts["computed"], 4),
            "final_loss": [r for r in losses if "loss" in r][-1]["loss"], "train_loss": summary["train_loss"],
            "first_step_s": clock.first - STARTED}


def child_trl(work: Path, packing: bool, batch: int, data: Path) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lorafit.data.prepare import prepare_data
    from lorafit.models.tokenizer import load_tokenizer

    cfg = lorafit_config(work, 1, "trl", data)
    cfg.data.packing = False
    tokenizer = load_tokenizer(str(work / "model"))
    dataset = prepare_data(cfg.data, tokenizer, seed=0).train  # the same input_ids and labels lorafit trains
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    clock = clock_callback()
    args = SFTConfig(output_dir=str(work / "runs" / "trl"), max_length=MAX_LENGTH, packing=packing, num_train_epochs=1,
                     per_device_train_batch_size=batch, learning_rate=LEARNING_RATE, logging_steps=1, seed=0,
                     bf16=False, gradient_checkpointing=False, save_strategy="no", report_to="none",
                     disable_tqdm=True, dataset_num_proc=None)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    result = trainer.train()
    real = computed = 0
    for b in trainer.get_train_dataloader():  # replay the batches (same seed) to count padding
        if "attention_mask" in b:
            real += int(b["attention_mask"].sum())
            computed += b["attention_mask"].numel()
        else:  # padding-free packing: one flat row of real tokens
            real += b["input_ids"].numel()
            computed += b["input_ids"].numel()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"real_tokens": real, "seconds": clock.last - clock.first, "steps": trainer.state.global_step,
            "cpu_seconds": clock.cpu_last - clock.cpu_first,
            "padding_efficiency": round(real / computed, 4), "final_loss": losses[-1],
            "train_loss": result.training_loss, "first_step_s": clock.first - STARTED}


def child(variant: str, work: Path, rows_per_step: int, batch: int, data: Path) -> None:
    import logging

    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    if variant == "lorafit":
        out = child_lorafit(work, rows_per_step, data)
    else:
        out = child_trl(work, variant == "trl_packing", rows_per_step if variant == "trl_packing" else batch, data)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["tokens_per_second"] = out["real_tokens"] / out["seconds"]
    out["tokens_per_cpu_second"] = out["real_tokens"] / out["cpu_seconds"]
    print("RESULT " + json.dumps(out), flush=True)


# -- driver -----------------------------------------------------------------------------------------
def run_child(variant: str, work: Path, rows_per_step: int, batch: int, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--rows-per-step", str(rows_per_step),
           "--batch", str(batch), "--data", str(data)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{variant} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="Training rows (one epoch each run).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="TRL's per-device batch without packing (its default: 8).")
    p.add_argument("--quick", action="store_true", help="Smoke test: 24 samples, 1 repeat, BENCHMARKS.md untouched.")
    p.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one).")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--rows-per-step", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.work, a.rows_per_step, a.batch, a.data)
    if a.quick:
        a.samples, a.repeats = 24, 1
    with tempfile.TemporaryDirectory(prefix="lorafit-bench-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results, rows_per_step = benchmark(work, a)
    report(results, a, rows_per_step)


def benchmark(work: Path, a) -> tuple[dict, int]:
    from lorafit.models.tokenizer import ensure_pad_token, load_llama3_tokenizer

    tokenizer = load_llama3_tokenizer(TOKENIZER)
    ensure_pad_token(tokenizer)
    data = work / "alpaca_like.jsonl"
    make_dataset(data, a.samples, seed=0, tokenizer=tokenizer)
    make_model(work / "model", tokenizer)
    # Packed rows per step chosen so a step holds about as many real tokens as TRL's batch of `a.batch` samples,
    # which makes the optimizer step counts about equal.
    mean_len = _mean_length(work, data)
    rows_per_step = max(1, round(a.batch * mean_len / MAX_LENGTH))
    print(f"{a.samples} samples, mean {mean_len:.0f} tokens; TRL batch {a.batch} samples, packed runs "
          f"{rows_per_step} row(s) of {MAX_LENGTH} per step", flush=True)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(a.repeats):
        order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]  # rotate who goes first
        for variant in order:
            r = run_child(variant, work, rows_per_step, a.batch, data)
            results[variant].append(r)
            print(f"repeat {rep + 1}/{a.repeats} {variant:12s} {r['tokens_per_second']:8.1f} real tok/s  "
                  f"{r['tokens_per_cpu_second']:8.1f} per CPU-s  "
                  f"{r['steps']} steps  padding eff {r['padding_efficiency']:.3f}  rss {r['peak_rss_mb']} MB  "
                  f"final loss {r['final_loss']:.3f}  first step after {r['first_step_s']:.1f} s", flush=True)
    return results, rows_per_step


def _mean_length(work: Path, data: Path) -> float:
    from lorafit.data.prepare import prepare_data
    from lorafit.models.tokenizer import load_tokenizer

    cfg = lorafit_config(work, 1, "probe", data)
    stats = prepare_data(cfg.data, load_tokenizer(str(work / "model")), seed=0).stats
    return stats["total_tokens"] / stats["train_samples"]


def report(results: dict, a, rows_per_step: int) -> None:
    from _report import machine, table, write_section

    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}

    def pair_ratios(v: str, key: str) -> list[float]:
        return [lf[key] / t[key] for lf, t in zip(results["lorafit"], results[v])]

    names = {"lorafit": "lorafit (packing, chunked loss)", "trl": "TRL SFTTrainer (defaults)",
             "trl_packing": "TRL SFTTrainer (packing=True)"}
    rows = []
    for v in VARIANTS:
        m = med[v]
        ratios = []
        for key in ("tokens_per_cpu_second", "tokens_per_second"):
            r = pair_ratios(v, key) if v != "lorafit" else []
            ratios.append("—" if not r else f"**{statistics.median(r):.2f}x** ({', '.join(f'{x:.2f}' for x in r)})")
        rows.append([names[v], f"{m['tokens_per_second']:.0f}", f"{m['tokens_per_cpu_second']:.0f}", *ratios,
                     f"{m['padding_efficiency']:.3f}", f"{m['peak_rss_mb']:.0f}", f"{m['final_loss']:.3f}",
                     f"{m['train_loss']:.3f}", int(m["steps"]), f"{m['first_step_s']:.1f}"])
    headers = ["trainer", "real tokens/s", "real tokens per CPU-second", "lorafit / this, CPU time (per pair)",
               "lorafit / this, wall time (per pair)", "padding efficiency", "peak RSS MB", "final loss",
               "mean train loss", "steps", "s to first step"]
    body = "\n".join([
        "## Training throughput on CPU: lorafit vs TRL",
        "",
        f"`PYTHONPATH=src python bench/train_cpu.py --samples {a.samples} --repeats {a.repeats}` "
        f"(medians of {a.repeats} alternating repeats; {time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}; load average {os.getloadavg()[1]:.1f} over the last 5 min. On a shared machine wall "
        f"time swings with other jobs; CPU time (user + sys of the training process, first step to last) much less, "
        f"so the headline ratio is on CPU time (both trainers keep both cores busy, so on an idle machine the two "
        f"ratios coincide). TRL {_version('trl')}, transformers {_version('transformers')}, peft {_version('peft')}.",
        f"Model: random Llama, vocab 128,256, hidden 256, 4 layers, 8/2 heads, intermediate 688, fp32; LoRA r=16 "
        f"all-linear; max_length {MAX_LENGTH}; {a.samples} Alpaca-like samples, 1 epoch; TRL batch {a.batch} samples, "
        f"packed runs {rows_per_step} row(s) per step. TRL: defaults but fp32 and no gradient checkpointing (as lorafit).",
        "",
        table(headers, rows),
    ])
    print("\n" + body)
    if not a.quick:
        print(f"\nwrote {write_section('train_cpu', body)}")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
