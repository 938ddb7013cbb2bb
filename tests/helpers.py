"""Test helpers: data files and conversations, tiny random Llama models and run directories, tiny run configs,
the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

PLACES = ["Quillmoor", "Vantreth", "Osk Hollow", "Perriwen", "Dunmarch", "Halvey Reach", "Tessaline", "Brackwater"]
FACTS = [
    "was founded by the weaver Maren Ostby",
    "sits on the river Lune",
    "is famous for blue salt",
    "holds a lantern festival every spring",
    "has a clock tower with nine bells",
    "trades in amber and wool",
]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations of deliberately different lengths (1-3 turns, short and long answers)."""
    rows = []
    for i in range(n):
        place, fact = PLACES[(i + seed) % len(PLACES)], FACTS[(i * 7 + seed) % len(FACTS)]
        answer = f"{place} {fact}." + (" It is a quiet town." * (i % 4))
        messages = [{"role": "user", "content": f"Tell me about {place}."}, {"role": "assistant", "content": answer}]
        if i % 3 == 2:
            messages += [
                {"role": "user", "content": "And what else?"},
                {"role": "assistant", "content": f"{place} {FACTS[(i + 1) % len(FACTS)]}."},
            ]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    """One row per line: a dict as JSON, a string as it is (broken lines for the error tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(
    tmp_path: Path, model_dir: Path, name: str = "run", n_train: int = 16, n_val: int = 0, **sections
) -> Path:
    """A run config for a tiny model; `sections` maps a section to fields overriding the defaults."""
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", chat_rows(n_train))), "max_length": 96, "packing": False}
    if n_val:
        data["validation"] = str(write_jsonl(tmp_path / "val.jsonl", chat_rows(n_val, seed=3)))
    cfg = {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "data": data,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {
            "max_steps": 6,
            "micro_batch_size": 2,
            "learning_rate": 5e-3,
            "warmup_ratio": 0.0,
            "seed": 7,
            "lr_scheduler": "linear",
        },
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    }
    for section, fields in sections.items():
        cfg.setdefault(section, {}).update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def cli_env() -> dict:
    import lorafit

    src = Path(lorafit.__file__).resolve().parents[1]  # the lorafit these tests import, installed or not
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )


def lorafit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from lorafit.cli import main; main()", *args]


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(lorafit_cmd(*args), capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=ROOT)


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


MULTI_TURN = [
    {"role": "system", "content": "  You answer briefly.  "},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?\n"},
    {"role": "assistant", "content": " Rome, since 1871. "},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


@contextmanager
def chat_template(tokenizer, template: str | None):
    """Give a (session-wide) tokenizer another chat template for one test; deep-copying a 128k vocabulary is slow."""
    old = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = old


def tiny_llama_model(seed: int = 0, **overrides):
    """A random Llama in memory: hidden 64, 2 layers, 4 heads over 2 KV heads (fields overridable)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def save_tiny_llama(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A random Llama (hidden 64, 2 layers) sized to the tokenizer, saved with it as a model folder."""
    cfg = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    model = tiny_llama_model(seed, **cfg)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_run(run: Path, model_dir: Path, seed: int = 1, **config) -> Path:
    """A finished-looking run directory on `model_dir`: a PEFT adapter whose B weights are non-zero
    (init_lora_weights=False, so merging really changes the logits), the tokenizer, and config.yaml."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.config import RunConfig, dump_config

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(run / "tokenizer")
    raw = {"model": {"name": str(model_dir)}, "lora": {"r": 4, "alpha": 8}, "output": {"name": run.name}}
    for dotted, value in config.items():  # e.g. model__quantization="4bit"
        section, field = dotted.split("__")
        raw.setdefault(section, {})[field] = value
    (run / "config.yaml").write_text(dump_config(RunConfig.model_validate(raw)))
    return run
