"""lorafit vs TRL's SFTTrainer on this CPU: same model, data, LoRA config, learning rate; alternating runs.

    PYTHONPATH=src python bench/train_cpu.py --model smollm2-135m-instruct --samples 100   # the real model
    PYTHONPATH=src python bench/train_cpu.py                 # the toy: 3 repeats, ~15 min on 2 cores
    PYTHONPATH=src python bench/train_cpu.py --quick         # smoke test: tiny data, 1 repeat, no BENCHMARKS.md

`--model smollm2-135m-instruct`: the embedded model's real weights and tokenizer (ChatML), lorafit at its defaults
(packing, micro-batch, attention, loss) but for max_length 1024, one epoch and the learning rate, and an Alpaca-like
dataset of real English sentences with Alpaca's length profile (bench/_alpaca.py). Its LM head is ~21% of the
FLOPs per token, like Llama 3.2 1B's.
Toy (default): a random Llama with the real Llama 3 vocabulary (128,256), hidden 256, 4 layers, 8 heads, 2 KV
heads, intermediate 688 (fp32), the real Llama 3 tokenizer, random vocabulary words with Alpaca's length profile
(`make_dataset`). Its LM head is ~92% of the FLOPs per token (in Llama 3.1 8B it is ~6.5%), which is where lorafit's
chunked loss gains most: read it as the upper end. Both: LoRA r=16, alpha 32, dropout 0.05 on every linear layer;
max_length 1024; the chat template's format, loss on the answers only.

TRL gets exactly lorafit's tokens and labels (pre-tokenized `input_ids`/`labels`), so both train the same
tokens on the same targets. TRL runs at its defaults except two that would otherwise measure something
else: fp32 instead of its bf16 default (on a CPU, transformers refuses bf16 unless told use_cpu=True) and
no gradient checkpointing (TRL's default is on; lorafit's is off). TRL with packing=True gets about as many
tokens per forward pass as lorafit's micro-batch (its default, 8 rows of 1024, would measure memory, not method).
On a CPU with a bf16 matrix unit (Intel AMX) lorafit's defaults keep the frozen linear layers in bf16
(models/frozen.py), so two more runs are timed there: lorafit fp32 throughout, and TRL with its bf16 default
made to run (use_cpu=True: bf16 autocast of every matmul).

Each run is a fresh subprocess (clean peak RSS). Real tokens/s = non-padding tokens trained / seconds from
the first training step to the end of the last one (model loading and data preparation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
TOY = "toy"
TOKENIZER = Path(os.environ.get("LORAFIT_LLAMA3_TOKENIZER", ROOT.parent / "shared" / "llama3" / "tokenizer.model"))
MODEL = dict(
    vocab_size=128_256,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=688,
    max_position_embeddings=2048,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
LORA = dict(r=16, alpha=32, dropout=0.05)
MAX_LENGTH = 1024
LEARNING_RATE = 2e-4
VARIANTS = ("lorafit", "lorafit_fp32", "lorafit_peft_lora", "trl", "trl_bf16", "trl_packing")
# trl_bf16: TRL's own bf16 default, which on a CPU runs only with use_cpu=True (autocast); worth timing only where
# the CPU has a bf16 matrix unit (elsewhere bf16 matmuls crawl), as lorafit_fp32 is only there a different run
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
    words = sorted(
        {
            t[1:]
            for t in tokenizer.get_vocab()
            if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and 3 <= len(t) <= 10
        }
    )

    def text(median: float, sigma: float, cap: int) -> str:
        count = int(min(cap, max(1, rng.lognormal(np.log(median), sigma))))
        return " ".join(rng.choice(words, size=count)).capitalize() + "."

    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            row = {
                "instruction": text(12, 0.4, 60),
                "input": text(15, 0.8, 200) if rng.random() < 0.4 else "",
                "output": text(40, 0.9, 650),
            }
            f.write(json.dumps(row) + "\n")


def make_model(folder: Path, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        **MODEL,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def lorafit_config(work: Path, samples_per_step: int, name: str, data: Path, model: str = TOY):
    """The toy pins sdpa and the samples per micro-batch (lorafit counts a batch in samples, packed or not, like
    TRL's unpacked batch); the real model runs at lorafit's defaults (its micro-batch too, unless samples_per_step
    > 0: `--micro-batch`). One epoch, no small-data step floor, as TRL."""
    from lorafit.config import RunConfig

    training = {"epochs": 1, "min_steps": 0, "learning_rate": LEARNING_RATE, "logging_steps": 1, "seed": 0}
    if model == TOY:
        training.update(micro_batch_size=samples_per_step, precision="fp32")
    elif samples_per_step > 0:
        training.update(micro_batch_size=samples_per_step)
    return RunConfig.model_validate(
        {
            "model": {"name": str(work / "model"), "dtype": "fp32", "attn_implementation": "sdpa"}
            if model == TOY
            else {"name": model},
            "data": {"train": [str(data)], "max_length": MAX_LENGTH, "packing": True},
            "lora": {**LORA, "target_modules": "all-linear"},
            "training": training,
            "output": {"dir": str(work / "runs"), "name": name, "overwrite": True},
        }
    )


def model_folder(work: Path, model: str) -> Path:
    from lorafit.models.sources import resolve_model

    return work / "model" if model == TOY else Path(resolve_model(model))


def head_share(folder: Path) -> float:
    """The LM head's share of the matmul FLOPs per token (head + every decoder linear layer)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    head = c.vocab_size * c.hidden_size
    return head / (head + c.num_hidden_layers * layer)


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


def child_lorafit(work: Path, samples_per_step: int, data: Path, model_name: str, variant: str = "lorafit") -> dict:
    import lorafit.train.loss
    from lorafit.train.run import run_training

    counts = {"real": 0, "computed": 0, "batches": 0}
    real_loss = lorafit.train.loss.causal_lm_loss

    def counting_loss(model, inputs, *args, **kwargs):  # what each micro-batch really computed
        if model.training:
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            counts["real"] += int(mask.sum()) if mask is not None and mask.dim() == 2 else int((ids != PAD).sum())
            counts["computed"] += ids.numel()
            counts["batches"] += 1
        return real_loss(model, inputs, *args, **kwargs)

    lorafit.train.loss.causal_lm_loss = counting_loss  # train.py looks it up at call time
    clock = clock_callback()
    cfg = lorafit_config(work, samples_per_step, variant, data, model_name)  # a folder per variant: runs overlap
    if variant == "lorafit_fp32":
        cfg.model.frozen_dtype = "same"
    run_dir = run_training(cfg, quiet=True, callbacks=[clock])
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "real_tokens": counts["real"],
        "seconds": clock.last - clock.first,
        "steps": summary["steps"],
        "cpu_seconds": clock.cpu_last - clock.cpu_first,
        "padding_efficiency": round(counts["real"] / counts["computed"], 4),
        "final_loss": [r for r in losses if "loss" in r][-1]["loss"],
        "train_loss": summary["train_loss"],
        "first_step_s": clock.first - STARTED,
        "micro_batch_size": cfg.training.micro_batch_size,
        "micro_batches": counts["batches"],
    }


def child_trl(work: Path, packing: bool, batch: int, data: Path, model_name: str, bf16: bool = False) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lorafit.data.prepare import prepare_data
    from lorafit.models.tokenizer import load_tokenizer

    cfg = lorafit_config(work, 1, "trl", data, model_name)
    cfg.data.packing = False
    folder = model_folder(work, model_name)
    tokenizer = load_tokenizer(str(folder))
    dataset = prepare_data(cfg.data, tokenizer, seed=0).train  # the same input_ids and labels lorafit trains
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    clock = clock_callback()
    args = SFTConfig(
        output_dir=str(work / "runs" / ("trl_bf16" if bf16 else "trl_packing" if packing else "trl")),
        max_length=MAX_LENGTH,
        packing=packing,
        num_train_epochs=1,
        per_device_train_batch_size=batch,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        seed=0,
        bf16=bf16,
        use_cpu=bf16,  # transformers refuses bf16 on a machine without a GPU unless told to train on the CPU
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[clock],
    )
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
    return {
        "real_tokens": real,
        "seconds": clock.last - clock.first,
        "steps": trainer.state.global_step,
        "cpu_seconds": clock.cpu_last - clock.cpu_first,
        "padding_efficiency": round(real / computed, 4),
        "final_loss": losses[-1],
        "train_loss": result.training_loss,
        "first_step_s": clock.first - STARTED,
    }


def child(variant: str, work: Path, rows_per_step: int, batch: int, data: Path, model_name: str) -> None:
    import logging

    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    if variant.startswith("lorafit"):
        if variant == "lorafit_peft_lora":  # lorafit before models/lora_dropout.py, lora_linear.py, rms_norm.py
            import lorafit.models.adapter

            lorafit.models.adapter.fuse_lora_dropout = lambda model: 0
            lorafit.models.adapter.fuse_lora_linears = lambda model: 0
            lorafit.models.adapter.fuse_rms_norms = lambda model: 0
        out = child_lorafit(work, rows_per_step, data, model_name, variant)  # for lorafit: samples per micro-batch
    else:
        packing = variant == "trl_packing"
        out = child_trl(work, packing, rows_per_step if packing else batch, data, model_name, variant == "trl_bf16")
    from lorafit.runtime import peak_rss_bytes  # this child's own peak, not its parent's (see there)

    out["peak_rss_mb"] = round(peak_rss_bytes() / 2**20)
    out["tokens_per_second"] = out["real_tokens"] / out["seconds"]
    out["tokens_per_cpu_second"] = out["real_tokens"] / out["cpu_seconds"]
    print("RESULT " + json.dumps(out), flush=True)


# -- driver -----------------------------------------------------------------------------------------
def run_child(variant: str, work: Path, rows_per_step: int, batch: int, data: Path, model_name: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--work",
        str(work),
        "--rows-per-step",
        str(rows_per_step),
        "--batch",
        str(batch),
        "--data",
        str(data),
        "--model",
        model_name,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == -9:  # the kernel's out-of-memory killer: a result to report, not a broken benchmark
        return {"failed": "killed by the out-of-memory killer"}
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{variant} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=TOY,
        help="`toy` (random, 128k vocabulary) or an embedded model, e.g. "
        "smollm2-135m-instruct (real weights, lorafit at its defaults).",
    )
    p.add_argument("--samples", type=int, default=64, help="Training rows (one epoch each run).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="TRL's per-device batch without packing (its default: 8).")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's, one per core).")
    p.add_argument(
        "--micro-batch", type=int, default=0, help="Real model: lorafit's micro_batch_size (default: lorafit's own)."
    )
    p.add_argument(
        "--variants",
        default=None,
        help=f"Comma-separated runs (default: all of {', '.join(VARIANTS)} that apply; lorafit_fp32 and trl_bf16 only "
        "on a CPU with a bf16 matrix unit).",
    )
    p.add_argument("--parallel", type=int, default=1, help="Runs at a time (one per core, with --threads 1).")
    p.add_argument("--quick", action="store_true", help="Smoke test: 24 samples, 1 repeat, BENCHMARKS.md untouched.")
    p.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one).")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--rows-per-step", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.work, a.rows_per_step, a.batch, a.data, a.model)
    if a.quick:
        a.samples, a.repeats = 24, 1
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the children inherit it
    with tempfile.TemporaryDirectory(prefix="lorafit-bench-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results, rows_per_step = benchmark(work, a)
        share = head_share(model_folder(work, a.model))
    report(results, a, rows_per_step, share)


def benchmark(work: Path, a) -> tuple[dict, int]:
    data = work / "alpaca_like.jsonl"
    if a.model == TOY:
        from lorafit.models.tokenizer import ensure_pad_token, load_llama3_tokenizer

        tokenizer = load_llama3_tokenizer(TOKENIZER)
        ensure_pad_token(tokenizer)
        make_dataset(data, a.samples, seed=0, tokenizer=tokenizer)
        make_model(work / "model", tokenizer)
    else:
        from _alpaca import make_alpaca_like

        make_alpaca_like(data, a.samples, seed=0)
    mean_len, tokens_per_forward = _lengths(work, data, a.model, a.batch if a.model == TOY else a.micro_batch)
    if a.model == TOY:
        # Packed rows per step chosen so a step holds about as many real tokens as TRL's batch of `a.batch`
        # samples, which makes the optimizer step counts about equal.
        rows_per_step = max(1, round(a.batch * mean_len / MAX_LENGTH))
    else:  # lorafit at its defaults; TRL's packed batches get about as many tokens per forward pass
        rows_per_step = max(1, round(tokens_per_forward / MAX_LENGTH))
    print(
        f"{a.samples} samples, mean {mean_len:.0f} tokens; TRL batch {a.batch} samples, packed runs "
        f"{rows_per_step} row(s) of {MAX_LENGTH} per step; lorafit ~{tokens_per_forward:.0f} tokens per forward",
        flush=True,
    )
    variants = chosen_variants(a)
    results: dict[str, list[dict]] = {v: [{}] * a.repeats for v in variants}
    runs = []
    for rep in range(a.repeats):
        runs += [(rep, v) for v in variants[rep % len(variants) :] + variants[: rep % len(variants)]]  # rotated

    slots, gather = threading.BoundedSemaphore(a.parallel), threading.Lock()

    def one(run: tuple[int, str]) -> None:
        rep, variant = run
        # lorafit counts its micro-batch in samples: TRL's batch on the toy, its defaults on the real model
        own = a.batch if a.model == TOY else a.micro_batch
        lorafit_batch = own if variant.startswith("lorafit") else rows_per_step
        # TRL's unpacked default on the real model peaks at ~21 GB: it runs alone, whatever --parallel says
        need = a.parallel if variant == "trl" and a.model != TOY else 1
        with gather:  # one run gathers its slots at a time, so a run that needs them all gets them
            for _ in range(need):
                slots.acquire()
        try:
            r = run_child(variant, work, lorafit_batch, a.batch, data, a.model)
        finally:
            for _ in range(need):
                slots.release()
        results[variant][rep] = r
        if "failed" in r:
            print(f"repeat {rep + 1}/{a.repeats} {variant:12s} {r['failed']}", flush=True)
        else:
            print(
                f"repeat {rep + 1}/{a.repeats} {variant:12s} {r['tokens_per_second']:8.1f} real tok/s  "
                f"{r['tokens_per_cpu_second']:8.1f} per CPU-s  "
                f"{r['steps']} steps  padding eff {r['padding_efficiency']:.3f}  rss {r['peak_rss_mb']} MB  "
                f"final loss {r['final_loss']:.3f}  first step after {r['first_step_s']:.1f} s  load "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )

    with ThreadPoolExecutor(max_workers=a.parallel) as pool:  # threads only wait on the child processes
        list(pool.map(one, runs))
    return results, rows_per_step


def chosen_variants(a) -> list[str]:
    if a.variants:
        unknown = set(a.variants.split(",")) - set(VARIANTS)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
        return [v for v in VARIANTS if v in a.variants.split(",")]
    from lorafit.runtime import cpu_bf16_matrix_unit

    bf16_unit = a.model != TOY and cpu_bf16_matrix_unit()  # the toy pins fp32 weights: no bf16 layers to time
    return [v for v in VARIANTS if bf16_unit or v not in ("lorafit_fp32", "trl_bf16")]


def _lengths(work: Path, data: Path, model: str, micro_batch: int) -> tuple[float, float]:
    """Mean tokens per sample, and the tokens one lorafit micro-batch holds (its samples, packed into one forward)."""
    from lorafit.data.prepare import prepare_data
    from lorafit.models.tokenizer import load_tokenizer

    cfg = lorafit_config(work, micro_batch, "probe", data, model)
    stats = prepare_data(cfg.data, load_tokenizer(str(model_folder(work, model))), seed=0).stats
    mean = stats["total_tokens"] / stats["train_samples"]
    return mean, mean * cfg.training.micro_batch_size


def report(results: dict, a, rows_per_step: int, share: float) -> None:
    from _report import machine, table, write_section

    ok = {v: [r for r in rs if "failed" not in r] for v, rs in results.items()}
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in ok.items() if rs}

    def pair_ratios(v: str, key: str) -> list[float]:
        pairs = zip(results["lorafit"], results[v])
        return [lf[key] / t[key] for lf, t in pairs if "failed" not in lf and "failed" not in t]

    names = {
        "lorafit": "lorafit (defaults)" if a.model != TOY else "lorafit (packing, chunked loss)",
        "lorafit_peft_lora": "lorafit with PEFT's LoRA forward and dropout and transformers' RMSNorm "
        "(before models/lora_dropout.py, lora_linear.py, rms_norm.py)",
        "lorafit_fp32": "lorafit fp32 throughout (`model.frozen_dtype: same`, as on a CPU without AMX)",
        "trl": "TRL SFTTrainer (defaults but fp32)",
        "trl_bf16": "TRL SFTTrainer (defaults: bf16 autocast, with use_cpu=True)",
        "trl_packing": "TRL SFTTrainer (packing=True)",
    }
    rows = []
    for v in results:
        if v not in med:  # every repeat failed (e.g. out of memory): say so in the table
            failed = results[v][0]["failed"]
            rows.append([f"{names[v]}: {failed} (all {len(results[v])} runs)"] + ["—"] * 11)
            continue
        m = med[v]
        ratios = []
        for key in ("tokens_per_cpu_second", "tokens_per_second", "peak_rss_mb"):
            r = pair_ratios(v, key) if v != "lorafit" else []
            ratios.append("—" if not r else f"**{statistics.median(r):.2f}x** ({', '.join(f'{x:.2f}' for x in r)})")
        rows.append(
            [
                names[v],
                f"{m['tokens_per_second']:.0f}",
                f"{m['tokens_per_cpu_second']:.0f}",
                *ratios[:2],
                f"{m['padding_efficiency']:.3f}",
                f"{m['peak_rss_mb']:.0f}",
                ratios[2],
                f"{m['final_loss']:.3f}",
                f"{m['train_loss']:.3f}",
                int(m["steps"]),
                f"{m['first_step_s']:.1f}",
            ]
        )
    headers = [
        "trainer",
        "real tokens/s",
        "real tokens per CPU-second",
        "lorafit / this, CPU time (per pair)",
        "lorafit / this, wall time (per pair)",
        "padding efficiency",
        "peak RSS MB",
        "lorafit / this, RSS",
        "final loss",
        "mean train loss",
        "steps",
        "s to first step",
    ]
    lf = ok["lorafit"][0]
    if a.model == TOY:
        section = "train_cpu"
        title = f"## Training throughput on CPU, toy model (LM head {share:.0%} of the FLOPs): lorafit vs TRL"
        model = (
            f"Model: random Llama, vocab 128,256, hidden 256, 4 layers, 8/2 heads, intermediate 688, fp32: its LM "
            f"head is {share:.0%} of the matmul FLOPs per token (Llama 3.1 8B: ~6.5%), where lorafit's chunked "
            f"loss gains most, so read this table as the upper end; the real-model table above is the typical "
            f"case. "
            f"LoRA r=16 all-linear; max_length {MAX_LENGTH}; {a.samples} Alpaca-like samples (random vocabulary "
            f"words), 1 epoch; TRL batch {a.batch} samples, packed runs {rows_per_step} row(s) per step."
        )
    else:
        title, section = f"## Training throughput on CPU, real model ({a.model}): lorafit vs TRL", "train_cpu_real"
        model = (
            f"Model: the embedded {a.model}'s real weights (fp32{FROZEN_NOTE if 'lorafit_fp32' in results else ''}; "
            f"LM head {share:.0%} of the matmul FLOPs per "
            f"token); {a.samples} Alpaca-like samples of real English sentences (bench/_alpaca.py), 1 epoch, "
            f"max_length {MAX_LENGTH}, LoRA r=16 alpha 32 dropout 0.05 all-linear. lorafit at its defaults"
            f"{' but the micro-batch' if a.micro_batch else ''} "
            f"(micro_batch_size {lf['micro_batch_size']}: {lf['real_tokens'] / lf['micro_batches']:.0f} tokens "
            f"per forward); TRL batch {a.batch} samples; TRL packing {rows_per_step} row(s) of {MAX_LENGTH} per "
            f"step."
        )
    threads = f"{a.threads} torch thread(s) per run" if a.threads else "torch's default threads"
    body = "\n".join(
        [
            title,
            "",
            f"`PYTHONPATH=src python bench/train_cpu.py{'' if a.model == TOY else ' --model ' + a.model} --samples "
            f"{a.samples} --repeats {a.repeats}{f' --threads {a.threads}' if a.threads else ''}"
            f"{f' --micro-batch {a.micro_batch}' if a.micro_batch else ''}"
            f"{f' --variants {a.variants}' if a.variants else ''}{f' --parallel {a.parallel}' if a.parallel > 1 else ''}"
            f"` (medians of {a.repeats} "
            f"alternating repeats{f', {a.parallel} runs at a time' if a.parallel > 1 else ''}; "
            f"{time.strftime('%Y-%m-%d')})",
            "",
            f"Machine: {machine()}, {threads}; load average {os.getloadavg()[1]:.1f} over the last 5 min (other jobs "
            f"share it). Wall time swings with other jobs; CPU time (user + sys of the training process, first step to "
            f"last) much less, so the headline ratio is on CPU time (on an idle machine the two ratios coincide). Peak RSS "
            f"is the training process's (model, data and training). TRL {_version('trl')}, transformers "
            f"{_version('transformers')}, peft {_version('peft')}.",
            model + " TRL: defaults but no gradient checkpointing (lorafit has none) and fp32 unless the row "
            "says bf16.",
            "",
            table(headers, rows),
        ]
    )
    print("\n" + body)
    if not a.quick:
        print(f"\nwrote {write_section(section, body)}")


FROZEN_NOTE = ", but lorafit's defaults keep the frozen linear layers in bf16 on this CPU's AMX unit"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
