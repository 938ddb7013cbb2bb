"""`make demo`'s training, this tree against an older lorafit, side by side.

Both train configs/demo.yaml (the embedded SmolLM2-135M-Instruct, LoRA r=16 on examples/train.jsonl, 150 steps)
at the same time, one torch thread each, so the two share whatever else runs on the machine alike. Each run is a
`lorafit train` process of its own tree with its own model cache. Reported per run: the training throughput
(lorafit's own count of real tokens over the seconds from the first step to the last), the process's CPU time
(user + sys, model loading and data preparation included), its peak RSS and final loss.

    git worktree add /tmp/lorafit-old 7e7179c      # an older lorafit (here: before issue #15's speed work)
    PYTHONPATH=src python bench/demo_speed.py --baseline /tmp/lorafit-old
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

from _report import ROOT, machine, table, write_section


def start(tree: Path, work: Path, name: str, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorafit.cli", "train", "configs/demo.yaml"]
    command += [f"output.dir={work}", f"output.name={name}", "--quiet"]
    env = dict(
        os.environ,
        PYTHONPATH=str(tree / "src"),
        OMP_NUM_THREADS=str(threads),
        LORAFIT_CACHE=str(work / f"cache-{name}"),  # each tree converts the embedded model its own way
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    with open(work / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, work: Path, name: str) -> dict:
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{name} failed ({process.returncode}): see {work / (name + '.log')}")
    summary = json.loads((work / name / "summary.json").read_text())
    return {
        "tokens_per_second": summary["tokens_per_second"],
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss // 1024,
        "train_loss": summary["train_loss"],
        "steps": summary["steps"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, required=True, help="Root of the older lorafit tree (a git worktree).")
    p.add_argument("--repeats", type=int, default=1, help="Rounds, each running both trees at once.")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run.")
    a = p.parse_args()
    baseline = a.baseline.resolve()
    label = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=baseline, capture_output=True, text=True).stdout
    rows = {"lorafit (this tree)": [], f"lorafit {label.strip() or baseline}": []}
    with tempfile.TemporaryDirectory(prefix="lorafit-demo-speed-") as tmp:
        for rep in range(a.repeats):
            work = Path(tmp) / f"round{rep}"
            work.mkdir()
            started = {name: start(tree, work, name, a.threads) for name, tree in (("new", ROOT), ("old", baseline))}
            new, old = (finish(started[n], work, n) for n in ("new", "old"))
            for key, result in zip(rows, (new, old)):
                rows[key].append(result)
            print(f"round {rep + 1}: this tree {new}\n         baseline {old}", flush=True)
    report(rows, a)


def report(rows: dict, a) -> None:
    new, old = rows.values()
    speed = [n["tokens_per_second"] / o["tokens_per_second"] for n, o in zip(new, old)]
    cpu = [o["cpu_seconds"] / n["cpu_seconds"] for n, o in zip(new, old)]
    body = [
        "## `make demo`'s training: this lorafit against an older one (`bench/demo_speed.py`)",
        "",
        f"Command: `PYTHONPATH=src python bench/demo_speed.py --baseline TREE --repeats {a.repeats} --threads "
        f"{a.threads}` ({time.strftime('%Y-%m-%d')})",
        f"Machine: {machine()}; load average {os.getloadavg()[1]:.1f} over the last 5 min. Both trees train "
        "configs/demo.yaml at the same time, one process each with "
        f"{a.threads} torch thread(s); per round, so both see the same load.",
        "",
    ]
    table_rows = []
    for name, results in rows.items():
        last = results[-1]
        table_rows.append(
            [
                name,
                " / ".join(f"{r['tokens_per_second']:.1f}" for r in results),
                " / ".join(f"{r['cpu_seconds']:.0f}" for r in results),
                last["peak_rss_mb"],
                f"{last['train_loss']:.4f}",
                last["steps"],
            ]
        )
    body.append(table(["tree", "real tokens/s (per round)", "CPU s", "peak RSS MB", "train loss", "steps"], table_rows))
    body.append("")
    body.append(
        "This tree against the baseline, per round: training throughput "
        + ", ".join(f"**{s:.2f}x**" for s in speed)
        + "; CPU time of the whole command "
        + ", ".join(f"**{c:.2f}x** less" for c in cpu)
        + "."
    )
    text = "\n".join(body)
    print(text)
    write_section("demo_speed", text)


if __name__ == "__main__":
    main()
