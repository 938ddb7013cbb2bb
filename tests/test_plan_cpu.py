"""`lorafit plan`'s CPU figure against the peak resident memory `lorafit train` really reaches on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import write_jsonl

SENTENCE = "The harbour master of Quillmoor writes down the name, cargo and hour of boat number {} in a green book."


def long_rows(n: int) -> list[dict]:
    """Answers longer than any max_length used here: cut on the right, every sample fills one packed row exactly."""
    answer = " ".join(SENTENCE.format(i) for i in range(60))
    return [{"messages": [{"role": "user", "content": f"Tell me about boat {k}."},
                          {"role": "assistant", "content": answer}]} for k in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("max_length", [512, 1024])
def test_plan_holds_the_measured_peak_of_a_cpu_run(tmp_path, smollm2_dir, max_length):
    """The embedded model, default training settings (fp32, per-sample attention, chunked loss, dropout 0.05), one
    full row of max_length tokens per micro-batch: the plan's CPU total is within 15% of the run's peak RSS."""
    config = {
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", long_rows(4))), "max_length": max_length,
                 "truncation": "right"},
        "training": {"max_steps": 2, "micro_batch_size": 1},
        "output": {"dir": str(tmp_path / "runs"), "name": "cpu"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    # one thread: on a shared 2-core machine OpenMP's spinning threads make a step minutes long, not the memory larger
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "lorafit.cli"]
    plan = subprocess.run([*cli, "plan", str(path), "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert plan.returncode == 0, plan.stderr[-2000:]
    cpu = json.loads(plan.stdout)["memory_cpu"]
    assert cpu["attention"] == "lorafit_sdpa" and cpu["tokens_per_micro_batch"] == max_length
    train = subprocess.run([*cli, "train", str(path), "--quiet"], capture_output=True, text=True, timeout=1500, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "cpu" / "summary.json").read_text())
    assert summary["memory_kind"] == "process RSS" and summary["steps"] == 2
    measured = summary["peak_memory_bytes"]
    assert abs(cpu["total"] - measured) <= 0.15 * measured, (cpu["total"] / 2**20, measured / 2**20)
