"""The runs folder as the UI sees it: each run's key numbers, its curves, whether it is training now, and Stop.

Everything is read from the files a run writes (summary.json when it finished, metrics.jsonl while it trains,
status.json with the training process's pid and step count), so a run started from the CLI shows up live
exactly like one started from the UI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from lorafit.errors import RunDirError
from lorafit.report import curves, read_metrics

STATUS_FILE = "status.json"  # written by train/status.py (not imported: that module needs transformers)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_run(path: Path) -> bool:
    return (
        path.is_dir()
        and not path.name.startswith(".")
        and any((path / name).exists() for name in ("config.yaml", "metrics.jsonl", STATUS_FILE))
    )


def run_path(runs: Path, name: str) -> Path:
    """runs/NAME, refused unless NAME is one plain folder name of a run inside the runs folder."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise RunDirError(f"`{name}` is not a run name.", "Pick a run from the Runs view.")
    path = runs / name
    if not is_run(path):
        raise RunDirError(f"{path} is not a lorafit run directory.", "Pick a run from the Runs view.")
    return path


def _alive(status: dict) -> bool:
    """The training process of status.json still runs (on this machine; a pid elsewhere cannot be checked)."""
    pid = status.get("pid")
    if not isinstance(pid, int) or status.get("host") not in (None, socket.gethostname()):
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= status.get("started", time.time()) + 1
    except Exception:  # no such process, or not ours to look at
        return False


def state_of(path: Path, status: dict) -> str:
    if status and _alive(status):
        return "training" if status.get("phase") == "training" else "saving"
    if (path / "adapter" / "adapter_config.json").exists():
        return "finished"
    return "stopped" if status else "incomplete"


def live(path: Path, status: dict, metrics: list[dict]) -> dict:
    """Step, max steps, ETA, tokens/s and memory of a run, from status.json and the last metrics."""
    step, max_steps = status.get("step", 0), status.get("max_steps")
    first, started, updated = status.get("first_step", 0), status.get("started"), status.get("updated")
    eta = None
    if max_steps and started and updated and step > first:
        eta = (updated - started) / (step - first) * (max_steps - step)
    last = next((r for r in reversed(metrics) if "loss" in r), {})
    return {
        "state": state_of(path, status),
        "pid": status.get("pid"),
        "step": max(step, last.get("step", 0)),
        "max_steps": max_steps,
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "tokens_per_second": last.get("tokens_per_second"),
        "tokens": last.get("tokens"),
        "loss": last.get("loss"),
        "memory_bytes": status.get("memory_bytes"),
        "memory_kind": status.get("memory_kind"),
        "updated": updated,
    }


def summary_row(path: Path) -> dict:
    """One line of the Runs table."""
    summary = _read_json(path / "summary.json")
    status = _read_json(path / STATUS_FILE)
    metrics = read_metrics(path)
    losses = [r["loss"] for r in metrics if isinstance(r.get("loss"), (int, float))]
    evals = [r["eval_loss"] for r in metrics if isinstance(r.get("eval_loss"), (int, float))]
    state = live(path, status, metrics)
    return {
        "name": path.name,
        "state": state["state"],
        "model": summary.get("model") or _config_model(path),
        "steps": summary.get("steps", state["step"]),
        "max_steps": state["max_steps"],
        "train_loss": summary.get("train_loss", losses[-1] if losses else None),
        "eval_loss": summary.get("eval_loss", evals[-1] if evals else None),
        "tokens_per_second": summary.get("tokens_per_second", state["tokens_per_second"]),
        "seconds": summary.get("seconds"),
        "peak_memory_bytes": summary.get("peak_memory_bytes", state["memory_bytes"]),
        "modified": max((p.stat().st_mtime for p in path.iterdir()), default=path.stat().st_mtime),
        "report": (path / "report.html").exists(),
    }


def _config_model(path: Path) -> str | None:
    """model.name from config.yaml without validating it (an old run may predate a field)."""
    import yaml

    try:
        data = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        return str(data["model"]["name"])
    except Exception:
        return None


def list_runs(runs: Path) -> list[dict]:
    if not runs.is_dir():
        return []
    rows = [summary_row(p) for p in runs.iterdir() if is_run(p)]
    return sorted(rows, key=lambda r: r["modified"], reverse=True)


def run_detail(runs: Path, name: str) -> dict:
    """Everything the live view draws: curves, the live numbers, the summary when there is one."""
    path = run_path(runs, name)
    metrics = read_metrics(path)
    data = curves(metrics)
    return {
        "name": name,
        "live": live(path, _read_json(path / STATUS_FILE), metrics),
        "train": data["train"],
        "validation": data["validation"],
        "learning_rate": [(r["step"], r["learning_rate"]) for r in metrics if "learning_rate" in r],
        "summary": _read_json(path / "summary.json"),
        "report": (path / "report.html").exists(),
    }


def stop_run(runs: Path, name: str) -> dict:
    """SIGTERM to the run's training process: it saves a checkpoint after the current step, then exits."""
    path = run_path(runs, name)
    status = _read_json(path / STATUS_FILE)
    if not _alive(status):
        raise RunDirError(f"run {name} is not training now (no live process in {path / STATUS_FILE}).")
    os.kill(status["pid"], signal.SIGTERM)
    return {"stopping": name, "pid": status["pid"]}


def served_file(runs: Path, name: str, file: str) -> Path:
    """A file of a run (report.html, loss.png...), never one outside that run's folder."""
    base = run_path(runs, name).resolve()
    target = (base / file).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        raise RunDirError(f"`{file}` is not a file of run {name}.")
    return target
