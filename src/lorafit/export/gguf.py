"""Write a merged Llama model as a GGUF file for llama.cpp / Ollama, with the `gguf` package only.

What llama.cpp's own converter (convert_hf_to_gguf.py) does for the llama architecture, and no more:
- tensor names from gguf's name map (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`);
- q and k weights permuted from Hugging Face's rotate-half layout to the interleaved-pairs layout that
  llama.cpp's RoPE expects (transformers' GGUF loader undoes exactly this permutation when reading);
- 1-D tensors (norms) stay float32, 2-D tensors become f16 / bf16 / q8_0;
- Llama 3.1's "llama3" RoPE scaling becomes the `rope_freqs` tensor llama.cpp reads;
- the tokenizer as a byte-level BPE ("gpt2" model) with its pre-tokenizer name, token types, merges,
  special ids and chat template, so the file is self-contained.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.data.special_tokens import LLAMA3_SPLIT_PATTERN, adds_bos
from lorafit.data.templates import end_of_turn_ids, resolve_template
from lorafit.errors import ConfigError, ModelError, RunDirError
from lorafit.export.merge import merged_model
from lorafit.inference.generate import PROMPT_FILE
from lorafit.models.tokenizer import load_tokenizer, prepare_tokenizer
from lorafit.paths import user_path
from lorafit.rundir import load_run_config
from lorafit.runtime import pick_dtype

log = logging.getLogger("lorafit")

OUTTYPES = ("f16", "bf16", "q8_0")
# The Llama 3 pre-tokenizer regex (Meta's tiktoken pattern); llama.cpp calls this split "llama-bpe".


@dataclass
class ExportSource:
    """What every export writes from: the merged model, its tokenizer and the prompt format training used."""

    model: object
    tokenizer: object
    template: str  # "model" or "llama3" (data.templates.resolve_template)
    system_prompt: str | None
    name: str
    cfg: object = None  # the run's config (None for a merged model folder)
    notes: list = field(default_factory=list)


def load_export_source(source: str | Path) -> ExportSource:
    """SOURCE is a run directory (merged in memory) or a folder written by `lorafit merge`."""
    import torch
    from transformers import AutoModelForCausalLM

    src = user_path(source)
    if (src / "config.yaml").exists():
        cfg = load_run_config(src)
        # Merge in the dtype the adapter was trained against (fp32 on CPU); the file's dtype is chosen later.
        dtype = pick_dtype(cfg.model.dtype) if cfg.model.quantization == "none" else torch.bfloat16
        model, tokenizer, cfg, notes = merged_model(src, dtype)
        template = resolve_template(tokenizer, cfg.data.template)
        name = Path(cfg.model.name).name + "-" + (cfg.output.name or src.name)
        loaded = ExportSource(model, tokenizer, template, cfg.data.system_prompt, name, cfg, notes)
    elif (src / "config.json").exists():
        tokenizer = load_tokenizer(str(src))
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto", use_safetensors=True)  # never unpickle
        saved = src / PROMPT_FILE
        prompt = json.loads(saved.read_text()) if saved.exists() else {}
        template = prompt.get("template") or resolve_template(tokenizer, "auto")
        loaded = ExportSource(model, tokenizer, template, prompt.get("system_prompt"), src.name)
    else:
        raise ModelError(
            f"{src} is neither a run directory (config.yaml) nor a model folder (config.json).",
            "Pass what `lorafit train` or `lorafit merge` wrote.",
        )
    for note in loaded.notes:
        log.info("%s", note)
    prepare_tokenizer(loaded.tokenizer, loaded.template)
    return loaded


def check_gguf_target(out_file: str | Path, outtype: str) -> Path:
    if outtype not in OUTTYPES:
        raise ConfigError(f"`--outtype` must be one of {', '.join(OUTTYPES)}, got {outtype!r}.")
    out = user_path(out_file)
    if out.exists():
        raise RunDirError(
            f"{out} already exists; refusing to overwrite it.", "Choose another --out file or delete the old one."
        )
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"the GGUF output file should end in .gguf, got {out.name}.")
    return out


def export_gguf(
    source: str | Path, out_file: str | Path, outtype: str = "f16", loaded: ExportSource | None = None
) -> Path:
    """SOURCE is a run directory (merged in memory first) or a merged model folder; writes OUT_FILE."""
    out = check_gguf_target(out_file, outtype)
    loaded = loaded or load_export_source(source)
    end_ids = end_of_turn_ids(loaded.tokenizer, loaded.template)
    write_gguf(loaded.model, loaded.tokenizer, end_ids, out, outtype, loaded.name)
    return out


def write_gguf(model, tokenizer, end_ids: list[int], out: Path, outtype: str, name: str) -> None:
    import gguf

    config = model.config
    if config.model_type != "llama":
        raise ModelError(
            f"GGUF export supports the llama architecture; this model is `{config.model_type}`.",
            "Export the merged safetensors (`lorafit merge`) and convert with llama.cpp's convert_hf_to_gguf.py.",
        )
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines name our temporary file
    writer = gguf.GGUFWriter(str(tmp), "llama", use_temp_file=True)  # tensors spill to disk, not RAM
    try:
        _write_hparams(writer, config, name, outtype)
        _write_tokenizer(writer, tokenizer_metadata(tokenizer, config.vocab_size, end_ids))
        for gguf_name, array, qtype in _tensors(model, outtype):
            writer.add_tensor(gguf_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_hparams(writer, config, name: str, outtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type") not in (None, "default", "llama3"):
        raise ModelError(f"GGUF export does not support RoPE scaling `{rope.get('rope_type')}`.")
    file_type = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -- tokenizer -----------------------------------------------------------------------------------------------------


def pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (it picks the regex from it)."""
    if backend["model"]["type"] != "BPE":
        raise ModelError(
            f"GGUF export supports byte-level BPE tokenizers; this one is {backend['model']['type']}.",
            "Export the merged safetensors (`lorafit merge`) and convert with llama.cpp's convert_hf_to_gguf.py.",
        )
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT_PATTERN:
        return "llama-bpe"  # Llama 3 (tiktoken-derived)
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2 regex after splitting digits one by one (SmolLM / SmolLM2)
    raise ModelError(
        f"GGUF export does not know how llama.cpp names this tokenizer's pre-tokenizer ({kinds}).",
        "Export the merged safetensors (`lorafit merge`) and convert with llama.cpp's convert_hf_to_gguf.py.",
    )


def vocab_arrays(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types (normal, control = special added token, user-defined, unused)."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {vocab_size}.")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding matrix is padded past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(added[i].content)
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def tokenizer_metadata(tokenizer, vocab_size: int, end_ids: list[int]) -> dict:
    """The `tokenizer.ggml.*` / `tokenizer.chat_template` values, named as llama.cpp names them."""

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens, types = vocab_arrays(tokenizer, vocab_size)
    meta = {
        "model": "gpt2",
        "pre": pre_tokenizer_name(backend),
        "tokens": tokens,
        "token_type": types,
        "merges": [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]],
        "add_bos_token": adds_bos(tokenizer),
        "add_eos_token": False,
        "add_space_prefix": False,
    }
    # llama.cpp and Ollama stop on eos: make it the end-of-turn token the chat template writes.
    eos = end_ids[0] if end_ids else tokenizer.eos_token_id
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos,
        "eot_token_id": eos,
        "eom_token_id": tokenizer.get_vocab().get("<|eom_id|>"),
        "unknown_token_id": tokenizer.unk_token_id,
        "padding_token_id": tokenizer.pad_token_id,
    }
    meta.update({k: v for k, v in ids.items() if v is not None})
    if tokenizer.chat_template:
        meta["chat_template"] = tokenizer.chat_template
    return meta


def _write_tokenizer(writer, meta: dict) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_type"])
    writer.add_token_merges(meta["merges"])
    setters = {
        "bos_token_id": writer.add_bos_token_id,
        "eos_token_id": writer.add_eos_token_id,
        "eot_token_id": writer.add_eot_token_id,
        "eom_token_id": writer.add_eom_token_id,
        "unknown_token_id": writer.add_unk_token_id,
        "padding_token_id": writer.add_pad_token_id,
    }
    for key, setter in setters.items():
        if key in meta:
            setter(meta[key])
    writer.add_add_bos_token(meta["add_bos_token"])
    writer.add_add_eos_token(meta["add_eos_token"])
    writer.add_add_space_prefix(meta["add_space_prefix"])
    if "chat_template" in meta:
        writer.add_chat_template(meta["chat_template"])


# -- tensors -------------------------------------------------------------------------------------------------------


def permute_for_rope(weights, n_head: int, n_head_kv: int | None = None):
    """HF rotate-half rows -> llama.cpp interleaved rows, per head (convert_hf_to_gguf.py `LlamaModel.permute`)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama3_rope_factors(config) -> list[float] | None:
    """Per-frequency divisors of Llama 3.1's RoPE scaling, as llama.cpp's converter computes them."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for k in range(0, dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (k / dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(float(factor))
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def _tensors(model, outtype: str):
    """(gguf name, numpy data, ggml type) for every weight, converted one at a time."""
    import gguf
    import numpy as np

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    matrix_type = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[outtype]
    factors = llama3_rope_factors(config)
    if factors is not None:
        yield "rope_freqs.weight", np.asarray(factors, dtype=np.float32), gguf.GGMLQuantizationType.F32
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when `output` is absent
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor `{hf_name}`.")
        data = tensor.detach().to("cpu").float().numpy()
        if base.endswith("q_proj"):
            data = permute_for_rope(data, config.num_attention_heads, config.num_attention_heads)
        elif base.endswith("k_proj"):
            data = permute_for_rope(data, config.num_attention_heads, config.num_key_value_heads)
        qtype = matrix_type if data.ndim > 1 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16  # q8_0 blocks are 32 wide; llama.cpp falls back the same way
        yield f"{gguf_name}.{suffix}", gguf.quants.quantize(data, qtype), qtype
