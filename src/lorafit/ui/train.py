"""The Train view: a config as a form, validated field by field, the planned steps, and `lorafit train` started.

Validation is config.py's own (`load_config` with the form's changes as overrides), so the form refuses exactly
what the CLI refuses; a pydantic error is shown next to the field it names. The run is a `lorafit train`
subprocess, so it behaves exactly like one started from a terminal (and the Stop button's SIGTERM reaches it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from lorafit.config import RunConfig, load_config
from lorafit.errors import ConfigError, LorafitError
from lorafit.rundir import run_dir_path


def _kind(annotation) -> tuple[str, list]:
    """(input kind, choices) for a field: bool -> checkbox, Literal -> select, anything else a text box."""
    if annotation is bool:
        return "bool", []
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", [str(a) for a in typing.get_args(annotation)]
    return "text", []


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # JSON is YAML: the override parser reads it back
    return str(value).lower() if isinstance(value, bool) else str(value)


def config_form(path: str, runs: Path) -> dict:
    """Every config field with its value in PATH, its kind and its meaning (config.py's descriptions)."""
    cfg = load_config(path)
    values = cfg.model_dump(mode="json")
    values["output"]["dir"] = str(runs)  # a run started here lands in the folder this UI watches
    fields = []

    def walk(model: type[BaseModel], node: dict, prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, node[name], f"{prefix}{name}.")
                continue
            kind, choices = _kind(ann)
            fields.append(
                {
                    "name": f"{prefix}{name}",
                    "value": _text(node[name]),
                    "kind": kind,
                    "choices": choices,
                    "help": field.description or "",
                }
            )

    walk(RunConfig, values, "")
    return {"config": str(Path(path).resolve()), "fields": fields}


def overrides_of(changes: dict, runs: Path) -> list[str]:
    """The form's changes as CLI overrides; runs land in the UI's runs folder unless the form says otherwise."""
    return [f"output.dir={runs}"] + [f"{name}={value}" for name, value in changes.items() if isinstance(name, str)]


def validate(path: str, changes: dict, runs: Path) -> dict:
    """{ok, fields: {field: problem}, error, plan}: the plan (samples, steps, estimate) only when the config is valid."""
    try:
        cfg = load_config(path, overrides_of(changes, runs))
    except ConfigError as err:
        fields = getattr(err, "fields", None)
        return {"ok": False, "fields": fields or {}, "error": None if fields else str(err), "plan": None}
    run_dir = run_dir_path(cfg.output.dir, cfg.output.name)
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.output.overwrite:
        problem = f"run {run_dir} exists: choose another name, or tick output.overwrite to replace it"
        return {"ok": False, "fields": {"output.name": problem}, "error": None, "plan": None}
    try:
        plan = training_plan(cfg, runs)
    except LorafitError as err:
        return {"ok": False, "fields": {}, "error": str(err), "plan": None}
    return {"ok": True, "fields": {}, "error": None, "plan": plan}


def training_plan(cfg, runs: Path) -> dict:
    """What the run will do, from the data check (tokenizer only) and the speed of an earlier run of this model."""
    from lorafit.data.check import build_report

    report = build_report(cfg.data, cfg.model.name, cfg.model.tokenizer, cfg)
    if not report["ok"]:
        raise ConfigError("the data cannot train: " + " ".join(report["problems"]))
    schedule = report["schedule"]  # the rule `lorafit train` follows (train/schedule.py), floor included
    tokens = report["total_tokens"] * schedule["epochs"]
    speed = _measured_speed(runs, cfg.model.name)
    return {
        "train_samples": report["train_samples"],
        "validation_samples": report["validation_samples"],
        "samples_per_step": schedule["samples_per_step"],
        "epochs": schedule["epochs"],
        "schedule_line": report["schedule_line"],
        "steps": schedule["steps"],
        "tokens": round(tokens),
        "estimate_seconds": round(tokens / speed["tokens_per_second"]) if speed else None,
        "estimate_from": speed["run"] if speed else None,
        "warnings": report["warnings"],
    }


def _measured_speed(runs: Path, model: str) -> dict | None:
    """tokens/s of the newest finished run of the same model in the runs folder (no run: no estimate)."""
    best = None
    for summary in runs.glob("*/summary.json") if runs.is_dir() else []:
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("model") == model and data.get("tokens_per_second"):
            mtime = summary.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, {"run": summary.parent.name, "tokens_per_second": data["tokens_per_second"]})
    return best[1] if best else None


class Launcher:
    """`lorafit train` subprocesses started from the UI (reaped, so a finished one leaves no zombie)."""

    def __init__(self, runs: Path):
        self.runs = runs
        self.procs: list[subprocess.Popen] = []

    def start(self, path: str, changes: dict) -> dict:
        checked = validate(path, changes, self.runs)
        if not checked["ok"]:
            return {"started": False, **checked}
        overrides = overrides_of(changes, self.runs)
        cfg = load_config(path, overrides)
        logs = self.runs / ".ui-logs"  # not inside the run directory: `lorafit train` refuses a non-empty one
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{cfg.output.name}.log"
        with open(log_path, "wb") as log:
            cmd = [sys.executable, "-m", "lorafit.cli", "train", str(path), *overrides, "--quiet"]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return {"started": True, "name": cfg.output.name, "pid": proc.pid, "log": str(log_path), **checked}

    def reap(self) -> None:
        self.procs = [p for p in self.procs if p.poll() is None]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
