"""`lorafit export --format vllm`: what `vllm serve` needs to serve a run's adapter on its base model.

OUT_DIR/
  adapter/                the PEFT adapter as training saved it (adapter_config.json + adapter_model.safetensors)
  chat_template.jinja     the chat template training rendered with (`--chat-template`)
  generation_config.json  eos = every end-of-turn token (`--generation-config`: vLLM adds them to its stop ids)
  serve.sh                the exact `vllm serve` command

vLLM loads a LoRA through its PEFTHelper, which rejects DoRA, `modules_to_save` (a fully trained embedding or
LM head), LoRA bias and initialisations that rewrite the base weights (PiSSA, OLoRA, LoftQ, CorDA). Such a run is
refused here, before anything is written, with the merged model as the way to serve it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from lorafit.data.special_tokens import token_id
from lorafit.data.templates import end_of_turn_ids, resolve_template
from lorafit.errors import ConfigError, RunDirError
from lorafit.export.merge import check_empty_target
from lorafit.models.sources import EMBEDDED, resolve_model
from lorafit.models.tokenizer import generation_config_for, load_tokenizer, prepare_tokenizer
from lorafit.paths import user_path
from lorafit.rundir import is_run_dir, load_run_config, safe_adapter

# vLLM's LoRAConfig.max_lora_rank accepts only these values (vllm/config/lora.py `MaxLoRARanks`).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Initialisations that only set the starting adapter weights; the others change the base model when PEFT loads them.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# vLLM's tool-call parser for each chat format lorafit trains tool calls in (the Hermes convention for ChatML).
TOOL_CALL_PARSERS = {"llama3": "llama3_json", "chatml": "hermes"}


def vllm_problems(adapter_config: dict) -> list[str]:
    """Why vLLM would refuse to load this adapter as a LoRA (empty when it can)."""
    problems = []
    if adapter_config.get("peft_type", "LORA") != "LORA":
        problems.append(f"the adapter is {adapter_config.get('peft_type')}, and vLLM serves LoRA adapters only")
    if adapter_config.get("use_dora"):
        problems.append("it is a DoRA adapter (`lora.use_dora: true`), which vLLM does not support")
    saved = [m for m in adapter_config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if saved:
        problems.append(
            f"it trains whole modules ({', '.join(saved)}, `lora.modules_to_save`), which vLLM cannot load with a LoRA"
        )
    if adapter_config.get("trainable_token_indices"):
        problems.append("it trains token embeddings (`trainable_token_indices`), which vLLM cannot load with a LoRA")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        problems.append("it trains biases, which vLLM does not support in adapters")
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        problems.append(f"its initialisation `{init}` rewrites the base weights when the adapter is loaded")
    return problems


def max_lora_rank(adapter_config: dict) -> int:
    rank = max([int(adapter_config["r"]), *map(int, (adapter_config.get("rank_pattern") or {}).values())])
    fitting = [r for r in MAX_LORA_RANKS if r >= rank]
    if not fitting:
        raise ConfigError(
            f"LoRA rank {rank} is above vLLM's largest `--max-lora-rank` ({MAX_LORA_RANKS[-1]}).",
            "Serve the merged model instead (`lorafit merge`).",
        )
    return fitting[0]


def chat_family(tokenizer, template: str) -> str:
    if template == "llama3" or token_id(tokenizer, "<|start_header_id|>") is not None:
        return "llama3"
    return "chatml" if token_id(tokenizer, "<|im_start|>") is not None else "other"


def run_uses_tools(run_dir: Path) -> bool:
    """Hook for tool-calling runs: true when training data held tool definitions or calls.

    Reads `data.tool_rows` from summary.json (written by the tool-calling work, issue 13); absent means no tools.
    """
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    data = json.loads(summary.read_text(encoding="utf-8")).get("data") or {}
    return bool(data.get("tool_rows"))


def base_model_ref(name: str) -> str:
    """What `vllm serve` takes: the base's local folder when lorafit has one, else the Hub id as configured."""
    if name in EMBEDDED or Path(name).expanduser().is_dir():
        return str(Path(resolve_model(name)).resolve())
    return name


def serve_command(base: str, rank: int, lora_name: str, out: Path, tool_parser: str | None) -> list[str]:
    cmd = [
        "vllm",
        "serve",
        base,
        "--enable-lora",
        "--max-lora-rank",
        str(rank),
        "--lora-modules",
        f"{lora_name}={out / 'adapter'}",
        "--chat-template",
        str(out / "chat_template.jinja"),
        "--generation-config",
        str(out),
    ]
    if tool_parser:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", tool_parser]
    return cmd


def export_vllm(run_dir: str | Path, out_dir: str | Path) -> tuple[Path, list[str]]:
    """Write OUT_DIR for `vllm serve`; returns it and the command (also saved as OUT_DIR/serve.sh)."""
    run, out = user_path(run_dir), user_path(out_dir)
    cfg = load_run_config(run)
    if not is_run_dir(run):
        raise RunDirError(
            f"{run} has no complete adapter (adapter/adapter_config.json is missing).",
            "The run may have been interrupted: resume it with `lorafit train CONFIG --resume`.",
        )
    adapter = Path(safe_adapter(run))
    adapter_config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    problems = vllm_problems(adapter_config)
    name = cfg.output.name or run.name
    if problems:
        raise ConfigError(
            f"vLLM cannot serve this run as a LoRA: {'; '.join(problems)}.",
            f"Serve the merged model instead: `lorafit merge {run} --out merged/{name}` then "
            f"`vllm serve merged/{name}` (the merged folder carries the chat template and stop tokens).",
        )
    rank = max_lora_rank(adapter_config)
    check_empty_target(out)
    tokenizer = load_tokenizer(cfg.model.name, tokenizer_name=str(run / "tokenizer"))
    template = resolve_template(tokenizer, cfg.data.template)
    prepare_tokenizer(tokenizer, template)
    family = chat_family(tokenizer, template)
    parser = TOOL_CALL_PARSERS.get(family) if run_uses_tools(run) else None
    command = serve_command(base_model_ref(cfg.model.name), rank, name, out, parser)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(adapter, tmp / "adapter")
        (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        generation_config_for(tokenizer, end_of_turn_ids(tokenizer, template)).save_pretrained(tmp)
        script = "#!/bin/sh\n# Written by lorafit: serves the adapter of " + str(run) + " on its base model.\n"
        (tmp / "serve.sh").write_text(script + shlex.join(command) + "\n", encoding="utf-8")
        (tmp / "serve.sh").chmod(0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, command
