"""Shared fixtures: tiny random Llama models and real tokenizers, all offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER = Path(os.environ.get("LORAFIT_LLAMA3_TOKENIZER", ROOT.parent / "shared" / "llama3" / "tokenizer.model"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once to safetensors (~40 s the first time)."""
    from lorafit.models.sources import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from lorafit.models.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    if not LLAMA3_TOKENIZER.exists():
        pytest.skip(f"the Llama 3 tokenizer is not at {LLAMA3_TOKENIZER} (set LORAFIT_LLAMA3_TOKENIZER)")
    from lorafit.models.tokenizer import load_llama3_tokenizer

    tok = load_llama3_tokenizer(LLAMA3_TOKENIZER)
    from lorafit.models.tokenizer import ensure_pad_token

    ensure_pad_token(tok)
    return tok


def save_tiny_llama(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A random Llama (hidden 64, 2 layers) sized to the tokenizer, saved with it as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    """Tiny random Llama with SmolLM2's tokenizer and chat template (ChatML, <|im_end|>)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_chat"), smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama3_model(tmp_path_factory, llama3_tokenizer) -> Path:
    """Tiny random Llama with the real Llama 3 tokenizer (no chat template: the built-in Llama 3.1 format is used)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama3"), llama3_tokenizer)


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


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, tiny_chat_model) -> Path:
    """A run directory on the tiny SmolLM2-tokenizer model (ChatML template, <|im_end|>)."""
    return save_tiny_run(tmp_path_factory.mktemp("runs") / "tiny", tiny_chat_model)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_run_dir, tmp_path_factory) -> Path:
    """`tiny_run_dir` exported to an f16 GGUF (reading a 49k-token vocabulary back is slow: export it once)."""
    from lorafit.export.gguf import export_gguf

    return export_gguf(tiny_run_dir, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", outtype="f16")
