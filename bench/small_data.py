"""Does small custom data learn under lorafit's default settings? The sweep behind the defaults (issue 12).

    PYTHONPATH=src python bench/small_data.py             # the sweep + the acceptance check; writes BENCHMARKS.md
    PYTHONPATH=src python bench/small_data.py --quick     # smoke test: one 20-conversation run, writes nothing

For each size (20, 40, 100, 300 conversations; bench/fact_data.py, one invented-fact domain per size) the
embedded SmolLM2-135M-Instruct is trained with a config that gives only `model.name` and `data.train` — every
training setting is lorafit's default — with packing on (the default) and off, and, at the small sizes, with the
defaults lorafit had before this sweep (the code of commit BEFORE, fetched with `git archive`: packing into
rows of 2048, a micro-batch of 4 such rows, 3 epochs, no step floor). Each run is then scored with
`lorafit compare RUN --data heldout.jsonl --json`: the held-out paraphrases answered right (the key-fact rule)
by the base and the tuned model, and the loss change on lorafit's general-knowledge chats (drift). The ~10,000
conversation row is counted with `lorafit data check`, not trained. The acceptance check trains a freshly
generated 40-conversation set (a seed no tuning saw) with the defaults and with configs/demo.yaml.

Every run is one `lorafit` process after another (never two at once), with one torch thread: on this shared
2-core machine two threads mostly spin-wait for each other. Results are appended to the --work folder's
results.jsonl as they come, so an interrupted sweep keeps what it measured (--resume skips those runs).
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
import fact_data  # noqa: E402 - bench/ is not a package: found through the path set above

BEFORE = "d14e70d"  # main before issue 12: packing into 2048-token rows, micro-batch of 4 rows, no step floor
MODEL = "smollm2-135m-instruct"
SIZES = {20: "companies", 40: "inventors", 100: "planets", 300: "towns"}
BEFORE_SIZES = (20, 40)
# Packing off at the small sizes only: a batch is counted in samples either way, so packing changes the padding,
# not the steps (tests/test_packing_batches.py trains both ways to the same losses); two sizes show it on real data.
PACKING_OFF_SIZES = (20, 40)
COUNTED_SIZE = 10_000
ACCEPTANCE = ("towns", 40, 2026)  # domain, size, seed: generated fresh for the check, used by nothing else
# configs/demo.yaml's training settings before this sweep (it now uses the defaults)
OLD_DEMO = (
    "acceptance: demo.yaml's old settings (2 per step, learning_rate 2e-3, 5 epochs, dropout 0)",
    {
        "model": {"dtype": "fp32"},
        "data": {"template": "auto", "train_on": "assistant", "max_length": 512, "packing": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {
            "epochs": 5,
            "micro_batch_size": 2,
            "gradient_accumulation": 1,
            "learning_rate": 2e-3,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.05,
            "seed": 42,
        },
        "eval": {"max_new_tokens": 40},
    },
)
CHOICES = [
    ("default but min_steps 60", {"min_steps": 60}),  # what the defaults were chosen over
    ("default but min_steps 60, learning_rate 2e-4", {"min_steps": 60, "learning_rate": 2e-4}),
]


def lorafit(args: list[str], src: Path, timeout: int = 7200) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(src),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-c", "from lorafit.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT, check=False)


def before_source(work: Path) -> Path:
    """The lorafit package as it was at BEFORE (for the `before` rows)."""
    out = work / f"src-{BEFORE}"
    if not (out / "src" / "lorafit").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", BEFORE, "src/lorafit"], capture_output=True, cwd=ROOT, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out / "src"


def train_and_score(work: Path, name: str, train: Path, held: Path, extra: dict, src: Path) -> dict:
    """Train one config on `train`, then score it on `held` with the current lorafit's `compare`."""
    config = work / f"{name}.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"name": MODEL},
                "data": {"train": str(train), **extra.get("data", {})},
                **{k: v for k, v in extra.items() if k != "data"},
                "output": {"dir": str(work / "runs"), "name": name, "overwrite": True},
            }
        )
    )
    started = time.time()
    done = lorafit(["train", str(config), "--quiet"], src)
    seconds = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: training failed\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    run = work / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    scored = lorafit(
        ["compare", str(run), "--data", str(held), "--json", "--limit", "0", "--max-new-tokens", "40"], ROOT / "src"
    )
    if scored.returncode != 0:
        raise SystemExit(f"{name}: compare failed\n{scored.stderr[-4000:]}")
    result = json.loads(scored.stdout)
    schedule = summary.get("schedule") or {}
    return {
        "steps": summary["steps"],
        "samples_per_step": schedule.get("samples_per_step"),
        "epochs": schedule.get("epochs"),
        "seconds": round(seconds),
        "tokens": summary["tokens"],
        "right": result["keyfacts"]["tuned"]["right"],
        "base_right": result["keyfacts"]["base"]["right"],
        "questions": result["keyfacts"]["tuned"]["total"],
        "general_change": round(result["general"]["change"], 4),
        "warnings": [line for line in done.stderr.splitlines() if line.startswith("warning:")],
        "schedule_line": next((line for line in done.stdout.splitlines() if line.startswith("schedule:")), None),
    }


def counted(work: Path) -> list[dict]:
    """The schedule at ~10,000 conversations, counted by `lorafit data check` (new) and by packing (before)."""
    cache = work / "counted.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import numpy as np

    from lorafit.data.packing import best_fit_decreasing
    from lorafit.data.prepare import prepare_data
    from lorafit.models.tokenizer import load_tokenizer

    train, _ = fact_data.write(work / "data" / "counted", "towns", COUNTED_SIZE, 0)
    done = lorafit(["data", "check", str(train), "--json"], ROOT / "src")
    schedule = json.loads(done.stdout)["schedule"]
    from lorafit.config import DataSection

    lengths = prepare_data(DataSection(train=[str(train)]), load_tokenizer(MODEL), 0).sample_lengths
    rows = len(best_fit_decreasing(np.asarray(lengths).tolist(), 2048))
    steps_before = 3 * -(-rows // 4)
    counts = [
        {
            "config": "before (counted)",
            "samples_per_step": f"4 rows of 2048 (~{COUNTED_SIZE * 4 // rows} samples)",
            "steps": steps_before,
            "epochs": 3.0,
        },
        {
            "config": "default (counted)",
            "samples_per_step": schedule["samples_per_step"],
            "steps": schedule["steps"],
            "epochs": schedule["epochs"],
        },
    ]
    cache.write_text(json.dumps(counts))
    return counts


def plan_runs() -> list[tuple]:
    """(size, domain, seed, config label, config sections, lorafit source) in the order they run, most telling
    first (an interrupted sweep keeps what it measured): the acceptance check, the old defaults at 40, the defaults
    at each size, packing off, then demo.yaml's old settings and the alternatives the defaults were chosen over."""
    domain, size, seed = ACCEPTANCE
    runs = [
        (size, domain, seed, "acceptance: default", {}, "new"),
        (size, domain, seed, "acceptance: configs/demo.yaml", demo_extra(), "new"),
        (40, SIZES[40], 0, "before", {}, "before"),
    ]
    runs += [(n, SIZES[n], 0, "default (packing on)", {}, "new") for n in SIZES]
    runs += [(n, SIZES[n], 0, "packing off", {"data": {"packing": False}}, "new") for n in PACKING_OFF_SIZES]
    runs += [(n, SIZES[n], 0, "before", {}, "before") for n in BEFORE_SIZES if n != 40]
    runs += [(size, domain, seed, OLD_DEMO[0], OLD_DEMO[1], "new")]
    runs += [(40, SIZES[40], 0, label, {"training": fields}, "new") for label, fields in CHOICES]
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one).")
    p.add_argument("--resume", action="store_true", help="Skip the runs already in WORK/results.jsonl.")
    p.add_argument(
        "--quick", action="store_true", help="Smoke test: one 20-conversation default run, no BENCHMARKS.md."
    )
    p.add_argument("--report-only", action="store_true", help="Rewrite the table from WORK's results; train nothing.")
    p.add_argument(
        "--runs",
        default=None,
        help="Only these runs, in this order: comma-separated indices into the plan (a second "
        "process on the same --work with --resume shares the results: each skips what the other finished).",
    )
    a = p.parse_args()
    if a.report_only:
        rows = [json.loads(line) for line in (a.work / "results.jsonl").read_text().splitlines()]
        write_report(rows, json.loads((a.work / "counted.json").read_text()))
        return
    with tempfile.TemporaryDirectory(prefix="lorafit-small-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = work / "results.jsonl"
        done = [json.loads(line) for line in results.read_text().splitlines()] if a.resume and results.exists() else []
        if not a.resume:
            results.write_text("")
        counts = None if a.quick else counted(work)
        plan = plan_runs()
        plan = [plan[int(i)] for i in a.runs.split(",")] if a.runs else plan
        for size, domain, seed, label, extra, source in plan[:1] if a.quick else plan:
            if a.resume and results.exists():  # another process may have finished runs meanwhile
                done = [json.loads(line) for line in results.read_text().splitlines()]
            run_one(work, results, done, size, domain, seed, label, extra, source)
            if not a.quick:  # the table grows with every run, so an interrupted sweep still shows what it measured
                write_report([json.loads(line) for line in results.read_text().splitlines()], counts)


def demo_extra() -> dict:
    """configs/demo.yaml's settings, everything but its data and output."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    return {
        "model": cfg["model"],
        "data": {k: v for k, v in cfg["data"].items() if k != "train"},
        "lora": cfg["lora"],
        "training": cfg["training"],
        "eval": cfg.get("eval", {}),
    }


def run_one(
    work: Path, results: Path, done: list[dict], size: int, domain: str, seed: int, label: str, extra: dict, source: str
) -> None:
    if any(r["size"] == size and r["config"] == label and r["domain"] == domain for r in done):
        return
    train, held = fact_data.write(work / "data" / f"{domain}-{size}-{seed}", domain, size, seed)
    src = before_source(work) if source == "before" else ROOT / "src"
    name = f"{domain}{size}-" + "".join(c if c.isalnum() else "-" for c in label).strip("-")
    row = {
        "size": size,
        "domain": domain,
        "seed": seed,
        "config": label,
        "load": round(os.getloadavg()[1], 1),
        **train_and_score(work, name, train, held, extra, src),
    }
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def write_report(rows: list[dict], counts: list[dict]) -> None:
    from _report import machine, table, write_section

    headers = [
        "conversations (facts)",
        "domain",
        "config",
        "samples per step",
        "optimizer steps",
        "epochs",
        "held-out right, tuned",
        "base model",
        "general-knowledge loss change",
        "time s (load)",
    ]

    def line(r: dict) -> list:
        return [
            f"{r['size']} ({r['questions']})",
            r["domain"],
            r["config"],
            r["samples_per_step"] or "4 rows of 2048",
            r["steps"],
            f"{r['epochs']:.1f}" if r.get("epochs") else "3.0",
            f"**{r['right']}/{r['questions']}**",
            f"{r['base_right']}/{r['questions']}",
            f"{r['general_change']:+.3f}",
            f"{r['seconds']} ({r['load']})",
        ]

    sweep = sorted(
        (r for r in rows if not r["config"].startswith("acceptance")), key=lambda r: (r["size"], r["config"])
    )
    body = [line(r) for r in sweep]
    body += [
        [
            f"{COUNTED_SIZE:,}",
            "towns",
            c["config"],
            c["samples_per_step"],
            f"{c['steps']:,}",
            f"{c['epochs']:.1f}",
            "not trained",
            "",
            "",
            "",
        ]
        for c in counts
    ]
    accept = [line(r) for r in rows if r["config"].startswith("acceptance")]
    text = "\n".join(
        [
            "## Small data under the default settings (`bench/small_data.py`)",
            "",
            (
                f"Command: `PYTHONPATH=src python bench/small_data.py` ({time.strftime('%Y-%m-%d')}). "
                f"Machine: {machine()}; every run one process with 1 torch thread, at most two runs at a time "
                "(`--runs`); the machine was shared, so time (with the 5-minute load average at the start of each "
                "run) is wall time of `lorafit train`, model load included: compare times only within a row's load."
            ),
            (
                f"Model {MODEL}; data from `bench/fact_data.py` (invented facts, 20 and 40 conversations = 10 facts, "
                "100 = 20, 300 = 50; the held-out questions are paraphrases never trained on, one per fact). The "
                "config gives only `model.name` and `data.train`. `before` = lorafit's defaults before this sweep "
                f"(commit {BEFORE}): rows of 2048 packed tokens, micro-batch 4 rows, 3 epochs, learning rate 2e-4. "
                "Held-out right = the answer contains the fact (`lorafit compare --data heldout.jsonl`); "
                "general-knowledge loss change = the tuned minus the base model's loss on the 32 general-knowledge "
                "chats lorafit ships (drift)."
            ),
            "",
            table(headers, body),
            "",
            (
                "Acceptance (a freshly generated set, seed 2026, that no tuning saw): the defaults, and "
                "configs/demo.yaml on the same data."
            ),
            "",
            table(headers, accept),
        ]
    )
    write_section("small_data", text)


if __name__ == "__main__":
    main()
