"""`lorafit --help` is instant: the CLI module imports no torch/transformers, and help costs < 0.5 s."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate", "trl", "numpy")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}

PROBE = """
import sys
from lorafit.cli import main
sys.argv = ["lorafit", *{argv!r}]
try:
    main()
except SystemExit:
    pass
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules))
"""


def _heavy_after(argv: list[str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [[], ["--help"], ["train", "--help"], ["data", "check", "--help"]])
def test_cli_help_imports_no_heavy_library(argv):
    assert _heavy_after(argv) == "HEAVY []"


def _best_times(cmd: list[str], runs: int = 3) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of a command; CPU = user + sys of the child alone."""
    wall = cpu = float("inf")
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, env=ENV, capture_output=True, check=True, timeout=60)
        wall = min(wall, time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = min(cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, cpu


def test_help_is_fast():
    """< 0.5 s. Judged on CPU time (user + sys of the process), which other jobs on a loaded machine do not
    inflate the way they inflate wall time; a bare `python -c pass` is measured alongside for the message."""
    bare_wall, bare_cpu = _best_times([sys.executable, "-c", "pass"])
    wall, cpu = _best_times([sys.executable, "-m", "lorafit.cli", "--help"])
    assert cpu < 0.5, (
        f"lorafit --help used {cpu:.2f} s of CPU ({wall:.2f} s wall); "
        f"a bare interpreter {bare_cpu:.2f} s CPU ({bare_wall:.2f} s wall)"
    )
