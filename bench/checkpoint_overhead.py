"""What trust costs: atomic checkpoints and the NaN guard, against transformers' plain behaviour.

    PYTHONPATH=src python bench/checkpoint_overhead.py            (embedded SmolLM2-135M, LoRA r=16 all-linear)
    PYTHONPATH=src python bench/checkpoint_overhead.py --repeats 9

Measured in the same process, on the same trained state:
- a checkpoint written by `Trainer._save_checkpoint` as transformers does it (files written in place), against
  ours (written in staging, fsynced, manifest, renamed, rotated) — median of N saves each;
- one optimizer step, against the NaN guard's check of that step's gradients.
Prints a table and replaces the `bench:checkpoint` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    opts = parser.parse_args()

    import torch
    from trainkit import tiny_config
    from transformers import Trainer

    from lorafit.config import load_config
    from lorafit.train.checkpoints import staging_dir
    from lorafit.train.setup import build_run

    tmp = Path(tempfile.mkdtemp(prefix="lorafit-bench-"))
    try:
        config = tiny_config(
            tmp,
            opts.model,
            n_train=16,
            lora={"r": 16, "alpha": 32, "target_modules": "all-linear", "dropout": 0.0},
            training={"max_steps": 2, "micro_batch_size": 2, "save_total_limit": 2},
        )
        cfg = load_config(config)
        run = tmp / "run"
        run.mkdir()
        s = build_run(cfg, run, quiet=True, say=lambda *a: None)
        s.trainer.train()
        trainer, model = s.trainer, s.model

        step = [0]

        def plain():  # transformers' own save, in place, into a folder of its own
            step[0] += 1
            trainer.state.global_step = 1000 + step[0]
            Trainer._save_checkpoint(trainer, model, None)

        def ours():
            step[0] += 1
            trainer.state.global_step = 1000 + step[0]
            trainer._save_checkpoint(model, None)

        plain_s = median_seconds(plain, opts.repeats)
        shutil.rmtree(staging_dir(run / "checkpoints"), ignore_errors=True)
        ours_s = median_seconds(ours, opts.repeats)
        size = sum(p.stat().st_size for p in next((run / "checkpoints").glob("checkpoint-*")).rglob("*") if p.is_file())

        batch = next(iter(trainer.get_train_dataloader()))

        def one_step():
            trainer.training_step(model, batch)
            trainer.optimizer.step()
            model.zero_grad()

        step_s = median_seconds(one_step, opts.repeats)
        trainer.training_step(model, batch)  # leave gradients in place for the guard to check
        s.guard.observe_loss(torch.tensor(1.0))

        class Control:
            should_training_stop = False

        def guard():
            s.guard.on_pre_optimizer_step(trainer.args, trainer.state, Control(), model=model)

        guard_s = median_seconds(guard, opts.repeats * 4)
        trainable = s.trainable
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("checkpoint, transformers (in place)", f"{plain_s * 1000:.0f} ms", "1.00×"),
        (
            "checkpoint, lorafit (staged, fsync, manifest, rename)",
            f"{ours_s * 1000:.0f} ms",
            f"{ours_s / plain_s:.2f}×",
        ),
        ("optimizer step (micro-batch 2)", f"{step_s * 1000:.0f} ms", "1.00×"),
        ("NaN guard check of that step", f"{guard_s * 1000:.2f} ms", f"{guard_s / step_s:.4f}×"),
    ]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    command = "PYTHONPATH=src python bench/checkpoint_overhead.py " + " ".join(sys.argv[1:])
    table = ["| what | median time | ratio to baseline |", "|---|---|---|"] + [
        f"| {a} | {b} | {c} |" for a, b, c in rows
    ]
    text = "\n".join(
        [
            f"Model `{opts.model}`, LoRA r=16 all-linear ({trainable:,} trainable parameters), checkpoint of "
            f"{size / 2**20:.1f} MiB (adapter + optimizer + scheduler + RNG). Machine: {machine}. "
            f"Median of {opts.repeats} repeats.",
            "",
            f"Command: `{command.strip()}`",
            "",
            *table,
        ]
    )
    print(text)
    write_section("checkpoint", "Checkpoint safety overhead", text)


def write_section(name: str, title: str, body: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n## {title}\n\n{body}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
