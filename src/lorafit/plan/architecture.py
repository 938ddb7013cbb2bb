"""The model's architecture and exact parameter counts, from a model built on the `meta` device (no weights).

The model is wrapped by PEFT exactly as training wraps it, so the counts are PEFT's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import ModelError
from lorafit.models.lora import lora_config
from lorafit.models.sources import EMBEDDED
from lorafit.paths import cache_dir, user_path

KNOWN_DIR = Path(__file__).with_name("architectures")  # plan/architectures/*.json


KNOWN = {  # Hub ids (gated, maybe unreachable) -> the architecture shipped in architectures/
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "meta-llama/Meta-Llama-3.1-70B": "llama-3.1-70b",
}


@dataclass
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def load_architecture(model_cfg):
    """The model's transformers config, from architectures/*.json, a local folder, the embedded model, or the Hub."""
    from transformers import AutoConfig, LlamaConfig

    name = model_cfg.name
    if name in KNOWN:
        return LlamaConfig.from_dict(json.loads((KNOWN_DIR / f"{KNOWN[name]}.json").read_text()))
    if name in EMBEDDED:
        cached = cache_dir() / "models" / name / "config.json"
        if cached.exists():
            return AutoConfig.from_pretrained(cached.parent)
        return _embedded_gguf_config(name)
    path = user_path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(
                f"{path} has no config.json.", "Point `model.name` at a folder written by save_pretrained."
            )
        return AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(
            name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ModelError(
            f"no architecture for `{name}`: not a known model, not a local folder, and the Hub did not answer "
            f"({type(err).__name__}).",
            f"Known without network: {', '.join(sorted(KNOWN))}, "
            f"{', '.join(EMBEDDED)}; or a local folder with config.json.",
        ) from None


def _embedded_gguf_config(name: str):
    """The embedded GGUF's header, read without its tensors (the converted copy is not cached yet)."""
    import importlib.util
    import os

    from transformers import LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"the embedded model `{name}` needs the package `{package}`.")
    raw = load_gguf_checkpoint(os.path.join(os.path.dirname(spec.origin), filename), return_tensors=False)["config"]
    return LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "_model_name_or_path")})


def meta_model(cfg):
    """The PEFT-wrapped model on the meta device (no memory), as `attach_lora` builds it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = load_architecture(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, trust_remote_code=cfg.model.trust_remote_code
        )
    lora = lora_config(cfg.lora)
    lora.init_lora_weights = True  # data-dependent inits (PiSSA, EVA) need real weights; counts do not depend on init
    return get_peft_model(model, lora), config


def architecture(config) -> Arch:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Arch(
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        heads,
        getattr(config, "num_key_value_heads", None) or heads,
        head_dim,
        config.vocab_size,
    )


def lora_table(peft_model, r: int, dora: bool) -> list[dict]:
    """Per targeted module type: W's shape, A and B shapes, trainable vs frozen parameters, the reduction."""
    rows: dict[str, dict] = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        kind = name.rsplit(".", 1)[-1]
        base = module.base_layer
        d_in, d_out = base.in_features, base.out_features
        row = rows.setdefault(
            kind,
            {
                "module": kind,
                "count": 0,
                "W": [d_out, d_in],
                "A": [r, d_in],
                "B": [d_out, r],
                "trainable_each": r * (d_in + d_out) + (d_out if dora else 0),
                "frozen_each": d_in * d_out,
            },
        )
        row["count"] += 1
    out = []
    for row in rows.values():
        row["trainable"] = row["trainable_each"] * row["count"]
        row["frozen"] = row["frozen_each"] * row["count"]
        row["reduction"] = 1 - row["trainable_each"] / row["frozen_each"]
        out.append(row)
    return out


def linear_layer_params(peft_model) -> int:
    """Weights bitsandbytes would quantize: every Linear inside the decoder layers (not the LM head)."""
    import torch

    total = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and "lora_" not in name:
            total += module.weight.numel()
    return total


def count_parameters(cfg) -> tuple[dict, list[dict], Arch, object]:
    """(counts, LoRA table, architecture, transformers config) from the meta-device model."""
    peft_model, config = meta_model(cfg)
    base = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    trainable, total = peft_model.get_nb_trainable_parameters()
    table = lora_table(peft_model, cfg.lora.r, cfg.lora.use_dora)
    counts = {
        "base": base,
        "trainable": trainable,
        "total": total,
        "linear": linear_layer_params(peft_model),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad),
        "targets": [row["module"] for row in table],
        "tied_head": bool(getattr(config.get_text_config(), "tie_word_embeddings", False)),
    }
    return counts, table, architecture(config), config
