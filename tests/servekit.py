"""`lorafit demo` as `make demo` runs it (configs/demo.yaml on the embedded SmolLM2), its GGUF exports and
transformers' answers, built once per test session (shared by the xdist workers through a file lock): the demo's
documented bar, and what the llama.cpp and verify tests serve and compare, are measured on this one run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

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
    demo: dict  # the demo's demo_results.json: base and tuned answers to the held-out questions, scored


def _shared_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one folder for every worker


def _train(target: Path) -> Path:
    """The demo, exactly as `make demo` runs it (base answers, training, tuned answers, demo_results.json)."""
    from lorafit.demo import run_demo

    overrides = [f"output.dir={target}", "output.name=smol", f"data.train={ROOT / 'examples' / 'train.jsonl'}"]
    assert run_demo(str(ROOT / "configs" / "demo.yaml"), str(HELDOUT), overrides) == 0
    return target / "smol"


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
        json.loads((target / "smol" / "demo_results.json").read_text()),
    )
