"""DPO's reference model, two ways: a reference forward pass at every step (the default) vs its log-probabilities
precomputed once before training (`dpo.precompute_reference: true`).

Both runs train configs/dpo_demo.yaml (embedded SmolLM2-135M-Instruct, LoRA r=16, 96 pairs, CPU) for the same
steps, each in its own process, alternating. Reported: training throughput (real tokens/s over the optimizer steps,
lorafit's own counter), wall time of the whole command (precomputing included), and peak RSS.

    PYTHONPATH=src python bench/dpo_reference.py            # 12 steps, 2 alternating repeats (~8 min on 2 cores)
    PYTHONPATH=src python bench/dpo_reference.py --quick    # 2 steps, 1 repeat, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import ROOT, machine, table, write_section


def run(mode: str, steps: int, out: Path) -> dict:
    name = f"{mode}-{len(list(out.iterdir()))}"
    command = [
        sys.executable,
        "-m",
        "lorafit.cli",
        "train",
        str(ROOT / "configs" / "dpo_demo.yaml"),
        f"training.max_steps={steps}",
        f"dpo.precompute_reference={'true' if mode == 'precomputed' else 'false'}",
        f"output.dir={out}",
        f"output.name={name}",
        "--quiet",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(command, check=True, env=env, cwd=ROOT, capture_output=True)
    summary = json.loads((out / name / "summary.json").read_text())
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if "loss" in r]  # training steps (evaluations log eval_loss)
    return {
        "tokens_per_second": last[-1]["tokens_per_second"],
        "seconds": summary["seconds"],
        "rss_gib": summary["peak_memory_bytes"] / 2**30,
        "first_loss": last[0]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, repeats = (2, 1) if args.quick else (12, 2)
    results: dict[str, list[dict]] = {"per-step": [], "precomputed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for mode in results:
                results[mode].append(run(mode, steps, Path(tmp)))
    rows = []
    for mode, found in results.items():
        mean = {k: sum(r[k] for r in found) / len(found) for k in found[0]}
        rows.append(
            [
                f"reference {mode}",
                f"{mean['tokens_per_second']:.1f}",
                f"{mean['seconds']:.0f}",
                f"{mean['rss_gib']:.2f}",
                f"{mean['first_loss']:.4f}",
            ]
        )
    speed = [sum(r["tokens_per_second"] for r in results[m]) / repeats for m in results]
    body = "\n".join(
        [
            "## `dpo_reference.py` — DPO reference: a forward per step vs precomputed once",
            "",
            f"Machine: {machine()}. configs/dpo_demo.yaml, {steps} steps, {repeats} alternating repeat(s) each.",
            "",
            table(["", "train tokens/s", "wall s (all)", "peak RSS GiB", "first loss"], rows),
            "",
            f"Precomputed / per-step training throughput: {speed[1] / speed[0]:.2f}x. With LoRA the reference needs "
            "no second model in memory in either mode (a frozen adapter copy, or the adapter switched off).",
        ]
    )
    print(body)
    if not args.quick:
        write_section("dpo_reference", body)


if __name__ == "__main__":
    main()
