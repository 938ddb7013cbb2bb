"""The run directory: what a training run leaves behind, and how other commands load it back.

runs/<name>/
  config.yaml        the resolved config (secrets never written)
  adapter/           PEFT adapter (adapter_config.json + adapter_model.safetensors)
  tokenizer/         the tokenizer used for training, with its chat template and pad token, and a
                     generation_config.json whose eos lists every end-of-turn token
  metrics.jsonl      one JSON object per logged step / evaluation
  summary.json       parameter counts, data statistics, final losses, throughput, peak memory
  generations.json   before/after answers to eval prompts (when configured)
  loss.png           train/validation loss against steps and tokens
  report.html        self-contained report: config, counts, data statistics, curves, throughput, generations
  checkpoints/       resumable checkpoints (when training.save_every > 0)
  tensorboard/       event files (when training.report_to includes tensorboard)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lorafit.config import load_config
from lorafit.errors import RunDirError
from lorafit.models.sources import load_base_model
from lorafit.models.tokenizer import load_tokenizer
from lorafit.paths import user_path
from lorafit.redact import redact


def run_dir_path(parent: str, name: str | None) -> Path:
    """The run directory of `output.dir` / `output.name`, the same on every rank (`~` expanded)."""
    return user_path(parent) / (name or "run")


def create_run_dir(path: Path, overwrite: bool, resume: bool = False) -> Path:
    """Never overwrite silently: an existing run is refused unless `overwrite` (or `resume`) is set."""
    if path.exists() and any(path.iterdir()) and not resume:
        if not overwrite:
            raise RunDirError(
                f"run directory {path} already exists.",
                "Choose another name (output.name=NEW), pass --resume to continue it, or set output.overwrite=true to replace it.",
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """A reader (or a crash) never sees a half-written file: write a sibling, then rename it over."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:

    write_text_atomic(path, redact(json.dumps(data, indent=2, default=str)))  # no token in summary.json & co


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter" / "adapter_config.json").exists()


def load_run_config(run_dir: str | Path):

    path = Path(run_dir)
    if not (path / "config.yaml").exists():
        raise RunDirError(
            f"{path} is not a lorafit run directory (no config.yaml).",
            "Pass the folder that `lorafit train` wrote, e.g. runs/demo.",
        )
    cfg = load_config(path / "config.yaml")
    return cfg


def safe_adapter(run_dir: str | Path) -> str:
    """The adapter folder, if its weights are safetensors: PEFT would fall back to unpickling adapter_model.bin."""
    adapter = Path(run_dir) / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        pickle = (
            " (only adapter_model.bin: lorafit loads no pickle files, unpickling can run code)"
            if (adapter / "adapter_model.bin").exists()
            else ""
        )
        raise RunDirError(
            f"{adapter} has no adapter_model.safetensors{pickle}.",
            "Use a run directory written by `lorafit train`, or save the adapter with safe_serialization=True.",
        )
    return str(adapter)


def require_finished(path: Path) -> None:
    """A run directory whose adapter was saved (a run interrupted before the end has none)."""
    if not is_run_dir(path):
        raise RunDirError(
            f"{path} has no complete adapter (adapter/adapter_config.json is missing).",
            "The run may have been interrupted: resume it with `lorafit train CONFIG --resume`.",
        )


def load_tuned(run_dir: str | Path, dtype=None, merge: bool = False):
    """(model, tokenizer, cfg) of a finished run: the base model with the adapter on top (merged if asked)."""
    from peft import PeftModel

    path = Path(run_dir)
    cfg = load_run_config(path)
    require_finished(path)
    tokenizer = load_tokenizer(cfg.model.name, tokenizer_name=str(path / "tokenizer"))
    base = load_base_model(cfg.model, dtype=dtype)
    model = PeftModel.from_pretrained(base, safe_adapter(path))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model, tokenizer, cfg
