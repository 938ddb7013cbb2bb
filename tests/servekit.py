"""A trained run of the embedded SmolLM2, its GGUF exports and transformers' answers, built once per test session
(shared by the xdist workers through a file lock): what the llama.cpp and verify tests serve and compare."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "examples" / "heldout.jsonl"
MAX_NEW_TOKENS = 64


@dataclass
class Served:
    run: Path
    f16: Path
    q8_0: Path
    prompts: list[dict]  # read_prompts rows of examples/heldout.jsonl
    merged_answers: list[dict]  # transformers on the merged model: {"text", "stop", "tokens"}


def _shared_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one folder for every worker


def _train(target: Path) -> Path:
    """~4 passes over the 75 Quillmoor conversations: enough for short answers that end with <|im_end|>."""
    from lorafit.config import load_config
    from lorafit.train.run import run_training

    cfg = {
        "model": {"name": "smollm2-135m-instruct", "dtype": "fp32"},
        "data": {"train": str(ROOT / "examples" / "train.jsonl"), "max_length": 256, "packing": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "max_steps": 14,
            "micro_batch_size": 4,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "linear",
            "seed": 7,
        },
        "output": {"dir": str(target), "name": "smol", "overwrite": True},
    }
    path = target / "smol.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return run_training(load_config(path), quiet=True)


def _build(target: Path) -> None:
    from lorafit.export.gguf import export_gguf, load_export_source
    from lorafit.export.verify import hf_answers
    from lorafit.inference.generate import load_for_inference, read_prompts, with_system

    target.mkdir(parents=True, exist_ok=True)
    run = _train(target)
    source = load_export_source(run)
    for outtype in ("f16", "q8_0"):
        export_gguf(run, target / f"smol-{outtype}.gguf", outtype, loaded=source)
    del source
    loaded = load_for_inference(str(run), merge=True)
    conversations = [with_system(r["messages"], loaded.system_prompt) for r in read_prompts(str(HELDOUT))]
    answers = hf_answers(loaded, conversations, MAX_NEW_TOKENS)
    (target / "merged_answers.json").write_text(json.dumps([a.__dict__ for a in answers], indent=1))


def served(tmp_path_factory) -> Served:
    from lorafit.inference.generate import read_prompts

    target = _shared_dir(tmp_path_factory) / "served-smollm2"
    with FileLock(str(target) + ".lock"):
        if not (target / "done").exists():
            _build(target)
            (target / "done").write_text("ok")
    return Served(
        target / "smol",
        target / "smol-f16.gguf",
        target / "smol-q8_0.gguf",
        read_prompts(str(HELDOUT)),
        json.loads((target / "merged_answers.json").read_text()),
    )
