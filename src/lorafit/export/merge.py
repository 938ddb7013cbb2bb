"""Merge a run's adapter into its base model and save it as plain safetensors (for transformers, vLLM, GGUF).

A QLoRA run trained its adapter on a 4-bit base. Merging into dequantized 4-bit weights would bake the
quantization error into every weight, so the base is reloaded in full precision and the adapter is merged
into that: the result is what the adapter was meant to be added to.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from lorafit.data.templates import end_of_turn_ids, resolve_template
from lorafit.errors import ConfigError, RunDirError
from lorafit.inference.generate import PROMPT_FILE
from lorafit.models.sources import load_base_model, resolve_model
from lorafit.models.tokenizer import generation_config_for, load_tokenizer, prepare_tokenizer
from lorafit.paths import user_path
from lorafit.rundir import load_run_config, require_finished, safe_adapter
from lorafit.runtime import DTYPE_NAMES, torch_dtype

log = logging.getLogger("lorafit")

# Files Meta's licence asks redistributions to carry; copied from the base folder when it has them.
LICENCE_FILES = ("LICENSE", "LICENSE.txt", "USE_POLICY.md", "NOTICE")


def _torch_dtype(name: str):
    if name not in DTYPE_NAMES:
        raise ConfigError(f"`--dtype` must be one of {', '.join(DTYPE_NAMES)}, got {name!r}.")
    return torch_dtype(name)


def check_empty_target(out: Path) -> None:
    """Never overwrite silently: an existing non-empty folder (or a file) is refused."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(
            f"{out} already exists and is not empty; refusing to overwrite it.",
            "Choose a new --out folder, or delete the old one first.",
        )


def merged_model(run_dir: str | Path, dtype):
    """(model, tokenizer, cfg, notes): the run's adapter merged into a full-precision copy of its base."""
    from peft import PeftModel

    path = Path(run_dir)
    cfg = load_run_config(path)
    require_finished(path)
    notes = []
    model_cfg = cfg.model
    if model_cfg.quantization != "none":
        notes.append(
            f"QLoRA run (base trained in {model_cfg.quantization}): the base was reloaded in full precision "
            f"({str(dtype).removeprefix('torch.')}) and the adapter merged into that, not into dequantized weights."
        )
        model_cfg = model_cfg.model_copy(update={"quantization": "none"})
    tokenizer = load_tokenizer(cfg.model.name, tokenizer_name=str(path / "tokenizer"))
    base = load_base_model(model_cfg, dtype=dtype, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, safe_adapter(path)).merge_and_unload()
    model.eval()
    return model, tokenizer, cfg, notes


def merge_run(run_dir: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    """Write RUN_DIR's base+adapter as one model folder that AutoModelForCausalLM.from_pretrained loads."""

    out = user_path(out)
    torch_dtype = _torch_dtype(dtype)
    check_empty_target(out)
    model, tokenizer, cfg, notes = merged_model(run_dir, torch_dtype)
    for note in notes:
        log.info("%s", note)
    template = resolve_template(tokenizer, cfg.data.template)
    end_ids = end_of_turn_ids(tokenizer, template)
    prepare_tokenizer(tokenizer, template)
    model.generation_config = generation_config_for(tokenizer, end_ids)
    model.config.eos_token_id = model.generation_config.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id

    # Written next to the target and renamed at the end, so an interrupted merge leaves no half folder.
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / PROMPT_FILE).write_text(
        json.dumps(
            {
                "template": template,
                "system_prompt": cfg.data.system_prompt,
                "tools_in_user_message": cfg.data.tools_in_user_message,
                "merged_from": str(Path(run_dir).resolve()),
                "notes": notes,
            },
            indent=2,
        )
    )
    _copy_licences(cfg.model.name, tmp)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return out


def _copy_licences(model_name: str, target: Path) -> None:

    try:
        source = Path(resolve_model(model_name))
    except Exception:  # a Hub id: the licence lives on the Hub page; nothing local to copy
        return
    if not source.is_dir():
        return
    for name in LICENCE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
