"""The GPU benchmark runs as is: `bench/gpu.py --tiny` exercises its whole code path on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    before = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--inline", "--steps", "1", "--warmup", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    names = ("lorafit", "transformers", "transformers_flat", "lorafit_gc", "transformers_gc")
    assert set(names) <= rows.keys()
    for name in names:
        tokens_per_second = float(rows[name].split("|")[2].replace(",", ""))
        assert tokens_per_second > 0, rows[name]
    after = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    assert after == before  # --tiny never writes results
