"""Data pipeline at scale: rows/s and peak memory of `lorafit data check` and of preparation on a generated JSONL.

    python bench/data_scale.py                 # 1,000,000 rows (the goal: peak memory < 2 GiB)
    python bench/data_scale.py --rows 200000   # what a busy 2-core machine finishes in minutes

Each phase runs in a fresh process with an empty Arrow cache (cold), then preparation runs once more on the
warm cache; seconds exclude start-up (imports, first tokenizer load). Baseline, same rows, same tokenizer: the naive in-memory pipeline many scripts use (json.loads
every row into a list, `apply_chat_template(tokenize=True)` per row, lists kept in memory).
Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
WORDS = (
    "the a an island of Qorvath river mountain city harbour lighthouse ferry tide salt fishermen market festival "
    "winter summer lantern bridge stone old new north south east west founded century bell tower song"
).split()
MODEL = "smollm2-135m-instruct"
MAX_LENGTH = 512


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Chat rows: 1-3 turns, 5-60 words per message, with ~1% exact duplicates like real data has."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        previous = None
        for _i in range(rows):
            if previous and rng.random() < 0.01:
                fh.write(previous)
                continue
            messages = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 25))) + "?"})
                messages.append(
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 60))) + "."}
                )
            previous = json.dumps({"messages": messages}) + "\n"
            fh.write(previous)


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (tokenization workers included)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


class MemorySampler:
    """Peak memory of this process and its tokenization workers together, sampled every 0.2 s.

    PSS (proportional set size) is RSS with each shared page divided among the processes that share it, so the
    sum over a parent and its forked workers is their real footprint (a sum of RSS would count the parent's
    torch/transformers pages once per worker). Pss_Anon is the heap alone; Pss also counts memory-mapped
    Arrow pages, which the kernel can drop under pressure."""

    def __init__(self, every: float = 0.2):
        import threading

        self.peak = {"Pss": 0, "Pss_Anon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def sample(self) -> None:
        total = {"Pss": 0, "Pss_Anon": 0}
        for pid in tree_pids(os.getpid()):
            try:
                lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                key = line.split(":")[0]
                if key in total:
                    total[key] += int(line.split()[1])
        for key, kib in total.items():
            self.peak[key] = max(self.peak[key], kib)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(every)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak["Pss"] / 1024, self.peak["Pss_Anon"] / 1024


def phase(name: str, path: str) -> dict:
    """Run in a child process: one phase, timed, with its own peak memory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Imports and the first tokenizer load (~5-15 s here) are start-up, not throughput: done before the clock starts.
    import datasets  # noqa: F401

    from lorafit.models.tokenizer import load_tokenizer

    load_tokenizer(MODEL)
    sampler = MemorySampler()
    started = time.perf_counter()
    if name == "check":
        import contextlib
        import io

        from lorafit.data.check import data_check

        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = data_check(path, MODEL, MAX_LENGTH, as_json=True)
        report = json.loads(out.getvalue())
        result = {
            "exit": code,
            "rows": report["rows_read"],
            "packed_rows": report["packing"]["rows"],
            "efficiency": report["packing"]["efficiency"],
            "duplicates": report["duplicates"],
        }
    elif name == "prepare":
        from lorafit.config import DataSection
        from lorafit.data.prepare import prepare_data

        tokenizer = load_tokenizer(MODEL)
        prepared = prepare_data(DataSection(train=[path], max_length=MAX_LENGTH), tokenizer, seed=0)
        result = {"rows": prepared.stats["rows_read"], "packed_rows": len(prepared.train)}
    else:  # the naive baseline
        tokenizer = load_tokenizer(MODEL)
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        encoded = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False) for r in rows]
        result = {"rows": len(rows), "tokens": sum(len(e) for e in encoded)}
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"], result["peak_anon_mib"] = sampler.stop()
    # The largest peak RSS of any one process (this one, or a finished worker), as the kernel counted it (KiB).
    result["max_process_rss_mib"] = (
        max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    )
    return result


def run_phase(name: str, path: Path, cache: Path) -> dict:
    # TOKENIZERS_PARALLELISM as the CLI sets it.
    env = {
        **os.environ,
        "LORAFIT_DATA_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    out = subprocess.run(
        [sys.executable, __file__, "--phase", name, str(path)], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--baseline-rows", type=int, default=None, help="Rows for the naive baseline (default: same as --rows)."
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.path)))
        return

    from _report import machine, table, write_section

    with tempfile.TemporaryDirectory(prefix="lorafit-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "chat.jsonl"
        started = time.perf_counter()
        generate(data, args.rows)
        print(
            f"generated {args.rows:,} rows ({data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        results = {}
        results["data check (cold)"] = run_phase("check", data, tmp / "cache-check")
        print("check", results["data check (cold)"], flush=True)
        results["prepare (cold)"] = run_phase("prepare", data, tmp / "cache-prepare")
        print("prepare", results["prepare (cold)"], flush=True)
        results["prepare (warm cache)"] = run_phase("prepare", data, tmp / "cache-prepare")
        print("warm", results["prepare (warm cache)"], flush=True)
        base_rows = args.baseline_rows or args.rows
        base_data = data
        if base_rows != args.rows:
            base_data = tmp / "baseline.jsonl"
            generate(base_data, base_rows)
        results["naive in-memory baseline"] = run_phase("baseline", base_data, tmp / "cache-base")
        print("baseline", results["naive in-memory baseline"], flush=True)

    base = results["naive in-memory baseline"]
    base_rate = base["rows"] / base["seconds"]
    lines = []
    for name, r in results.items():
        rate = r["rows"] / r["seconds"]
        lines.append(
            [
                name,
                f"{r['rows']:,}",
                f"{r['seconds']:.0f}",
                f"{rate:,.0f}",
                f"{rate / base_rate:.2f}x",
                f"{r['peak_rss_mib']:,.0f}",
                f"{r['peak_anon_mib']:,.0f}",
                f"{r['peak_anon_mib'] / base['peak_anon_mib']:.2f}x",
                f"{r['max_process_rss_mib']:,.0f}",
            ]
        )
    check = results["data check (cold)"]
    from lorafit.data.prepare import worker_count

    procs = worker_count("auto", args.rows) or 1
    body = "\n".join(
        [
            "## Data pipeline at scale (`bench/data_scale.py`)",
            "",
            f"Command: `python bench/data_scale.py --rows {args.rows}"
            + (f" --baseline-rows {base_rows}" if base_rows != args.rows else "")
            + "`",
            f"Machine: {machine()} (shared with other jobs while measured). Tokenizer: {MODEL} (ChatML template), "
            f"max_length {MAX_LENGTH}, packing on, 1-3 turn chats of 5-60 words; default settings, so `data.num_proc: auto` "
            f"tokenized with {procs} process(es) here (the baseline uses one).",
            "",
            table(
                [
                    "phase",
                    "rows",
                    "seconds",
                    "rows/s",
                    "vs baseline",
                    "peak memory MiB (PSS)",
                    "peak heap MiB (PSS anon)",
                    "heap vs baseline",
                    "largest process RSS MiB",
                ],
                lines,
            ),
            "",
            "Memory: PSS (resident memory with each shared page divided among the processes sharing it) summed over the "
            "process and its tokenization workers, sampled every 0.2 s: the job's real footprint (a sum of RSS would count the "
            "parent's torch/transformers pages once more per forked worker). It includes memory-mapped Arrow pages, which the "
            "kernel reclaims under pressure; the heap column (Pss_Anon) excludes them. ~450 MiB is torch + transformers + tokenizer.",
            f"`data check` found {check['duplicates']:,} exact duplicates and packed into {check['packed_rows']:,} rows "
            f"(efficiency {100 * check['efficiency']:.1f}%). Goal: peak memory < 2048 MiB at 1,000,000 rows.",
            "Baseline: json.loads every row into a list, then `apply_chat_template(tokenize=True)` per row (no masks, no "
            "validation, no packing), all kept in Python lists.",
        ]
    )
    print(body)
    write_section("data_scale", body)


if __name__ == "__main__":
    main()
