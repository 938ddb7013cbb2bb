"""Inference on what training produced: load a run / merged model / GGUF file, render prompts, generate in batches.

`load_for_inference` is shared by `generate`, `chat` and `compare`: whatever the target, it returns the
model, the tokenizer and the prompt format *training used* (template, system prompt, end-of-turn ids), so
answers are rendered exactly as the model learned them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.data.templates import encode_prompt, end_of_turn_ids, resolve_template, with_system
from lorafit.errors import DataError, ModelError
from lorafit.inference.tool_calls import parse_tool_call, prompt_conversation, prompt_tools, read_tools_file
from lorafit.models.sources import EMBEDDED, resolve_model
from lorafit.models.tokenizer import ensure_pad_token, load_tokenizer
from lorafit.paths import user_path
from lorafit.rundir import load_run_config, load_tuned, write_text_atomic
from lorafit.runtime import pick_dtype

log = logging.getLogger("lorafit")
PROMPT_FILE = "lorafit_prompt.json"  # prompt settings a merged model keeps from its run


@dataclass
class InferenceModel:
    model: object
    tokenizer: object
    template: str  # "model" (the tokenizer's chat template) or "llama3" (built-in Llama 3.1 format)
    end_ids: list[int]  # every token that ends an assistant turn; all of them stop generation
    system_prompt: str | None = None  # the run's data.system_prompt, reused so answers match training
    kind: str = "model"  # run | model | gguf
    cfg: object = None
    tools_in_user_message: bool = True  # Llama 3.1 tool rows: where training put the tool definitions
    notes: list[str] = field(default_factory=list)


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(target: str, merge: bool = True, dtype=None) -> InferenceModel:
    """A run directory (base + adapter), a merged model folder, a .gguf file, or an embedded model name."""
    import torch

    path = user_path(target)
    dtype = dtype or pick_dtype("auto")
    if path.is_dir() and (path / "config.yaml").exists():
        loaded = _load_run(path, merge, dtype)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        loaded = _load_gguf(path, dtype)
    elif path.is_dir() or target in EMBEDDED or (not path.exists() and target.count("/") == 1):
        loaded = _load_model_folder(target, dtype)  # a folder, an embedded model, a Hub id
    else:
        raise ModelError(
            f"{target} is neither a run directory, a model folder, nor a .gguf file.",
            "Pass what `lorafit train` (runs/NAME), `lorafit merge` or `lorafit export` wrote.",
        )
    if not getattr(loaded.model, "hf_device_map", None):
        loaded.model.to(_device())
    loaded.model.eval()
    loaded.tokenizer.padding_side = "left"  # generation continues the last token, so pads go in front
    if isinstance(loaded.model, torch.nn.Module) and loaded.model.generation_config is not None:
        # Our stopping rule, not whatever max_length/sampling defaults the checkpoint shipped.
        loaded.model.generation_config.eos_token_id = loaded.end_ids
        loaded.model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    return loaded


def _load_run(path: Path, merge: bool, dtype) -> InferenceModel:
    cfg = load_run_config(path)
    quantized = cfg.model.quantization != "none"
    # Merging into 4-bit weights would round the adapter away; a quantized base keeps the adapter separate.
    model, tokenizer, cfg = load_tuned(path, dtype=dtype, merge=merge and not quantized)
    template = resolve_template(tokenizer, cfg.data.template)
    return InferenceModel(
        model,
        tokenizer,
        template,
        end_of_turn_ids(tokenizer, template),
        cfg.data.system_prompt,
        "run",
        cfg,
        tools_in_user_message=cfg.data.tools_in_user_message,
    )


def _load_gguf(path: Path, dtype) -> InferenceModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"{path} could not be read as a GGUF model: {str(err)[:300]}",
            "Export it again with `lorafit export RUN_DIR --format gguf --out FILE`.",
        ) from None
    ensure_pad_token(tokenizer)
    template = resolve_template(tokenizer, "auto")
    return InferenceModel(model, tokenizer, template, end_of_turn_ids(tokenizer, template), kind="gguf")


def _load_model_folder(target: str, dtype) -> InferenceModel:
    from transformers import AutoModelForCausalLM

    folder = resolve_model(target)
    tokenizer = load_tokenizer(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)  # never unpickle
    except (OSError, ValueError) as err:
        raise ModelError(
            f"{folder} could not be loaded as a model: {str(err)[:300]}",
            "Pass a run directory, a folder written by `lorafit merge`, or a .gguf file.",
        ) from None
    template = resolve_template(tokenizer, "auto")
    loaded = InferenceModel(model, tokenizer, template, end_of_turn_ids(tokenizer, template), kind="model")
    saved = Path(folder) / PROMPT_FILE  # written by `lorafit merge`: the run's system prompt
    if saved.exists():
        settings = json.loads(saved.read_text(encoding="utf-8"))
        loaded.system_prompt = settings.get("system_prompt")
        loaded.tools_in_user_message = settings.get("tools_in_user_message", True)
    return loaded


# -- prompts -------------------------------------------------------------------------------------------------------


def read_prompts(file: str, tools: dict | None = None) -> list[dict]:
    """Rows of {"messages": [...], "prompt": str, "tools": spec | None}: JSONL with `prompt` or `messages` (and
    optionally `tools`), or plain text lines. `tools` (from --tools) applies to lines that have none of their own."""
    p = Path(file)
    if not p.is_file():
        raise DataError(
            f"prompts file {p} does not exist.",
            'Pass a .jsonl file ({"prompt": ...} per line) or a text file, one prompt per line.',
        )
    rows = []
    is_jsonl = p.suffix.lower() in (".jsonl", ".json")
    for number, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if not is_jsonl:
            rows.append(
                {"prompt": line.strip(), "messages": [{"role": "user", "content": line.strip()}], "tools": tools}
            )
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{p}:{number}: broken JSON ({err.msg}, column {err.colno}).", "Write one JSON object per line."
            ) from None
        rows.append(_prompt_row(row, f"{p}:{number}", tools))
    if not rows:
        raise DataError(f"prompts file {p} holds no prompts.")
    return rows


def _prompt_row(row, loc: str, tools: dict | None = None) -> dict:
    if isinstance(row, dict):
        tools = prompt_tools(row, loc) or tools
    turns = row.get("messages") if isinstance(row, dict) else None
    if isinstance(turns, list) and any(
        isinstance(m, dict) and (m.get("tool_calls") or m.get("role") in ("tool", "ipython")) for m in turns
    ):
        messages = prompt_conversation(row["messages"], loc)
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return {"prompt": last_user, "messages": messages, "tools": tools}
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        messages = [m for m in row["messages"] if isinstance(m, dict)]
        if (
            any(not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) for m in messages)
            or not messages
        ):
            raise DataError(f"{loc}: `messages` must be a list of {{role, content}} objects with string values.")
        # A trailing assistant turn is the reference answer, not part of the prompt.
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{loc}: the conversation must end with a `user` turn (the one to answer).")
        return {"prompt": messages[-1]["content"], "messages": messages, "tools": tools}
    for key in ("prompt", "question"):  # `question`: held-out files such as examples/heldout.jsonl
        if isinstance(row, dict) and isinstance(row.get(key), str):
            return {"prompt": row[key], "messages": [{"role": "user", "content": row[key]}], "tools": tools}
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(
        f"{loc}: expected a `prompt` (or `question`) string or a `messages` list, got {keys}.",
        'Use {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]} per line.',
    )


# -- generation ----------------------------------------------------------------------------------------------------


def cut_at_end(ids: list[int], end_ids: list[int], pad_id: int | None) -> list[int]:
    """The answer's tokens up to (not including) the first end-of-turn token."""
    ends = set(end_ids)
    out = []
    for t in ids:
        if t in ends:
            break
        out.append(t)
    if pad_id is not None and pad_id not in ends:
        while out and out[-1] == pad_id:  # finished rows are padded while the batch continues
            out.pop()
    return out


def generate_batch(
    loaded: InferenceModel,
    conversations: list[list[dict]],
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    tools: list[dict | None] | None = None,
) -> list[str]:
    """Answers to several conversations at once, in the format and with the system prompt training used; `tools`
    gives each conversation's tools ({"tools", "builtin_tools"} or None), rendered as in training."""
    return generate_answers(
        loaded.model,
        loaded.tokenizer,
        conversations,
        loaded.template,
        loaded.end_ids,
        max_new_tokens,
        loaded.system_prompt,
        do_sample,
        temperature,
        top_p,
        tools,
        loaded.tools_in_user_message,
    )


def generate_answers(
    model,
    tokenizer,
    conversations: list[list[dict]],
    template: str,
    end_ids: list[int],
    max_new_tokens: int,
    system_prompt: str | None = None,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    tools: list[dict | None] | None = None,
    tools_in_user_message: bool = True,
) -> list[str]:
    """The one generation path: prompts rendered as in training (BOS exactly once), left-padded, stopped at any
    end-of-turn token (Llama 3.1: <|eot_id|>, or <|eom_id|> after a built-in tool call), decoded without special
    tokens."""
    import torch

    tools = tools or [None] * len(conversations)
    encoded = [
        encode_prompt(tokenizer, with_system(m, system_prompt), template, t, tools_in_user_message)
        for m, t in zip(conversations, tools)
    ]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])  # (B, T), pads in front
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=end_ids, pad_token_id=pad)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)  # silence "sampling flags set but greedy" warnings
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    return [
        tokenizer.decode(cut_at_end(row, end_ids, pad), skip_special_tokens=True).strip()
        for row in out[:, width:].tolist()
    ]


def generate(
    target: str,
    prompts_file: str,
    out_file: str,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 8,
    seed: int = 0,
    system: str | None = None,
    loaded: InferenceModel | None = None,
    tools_file: str | None = None,
) -> Path:
    """Answer every prompt of PROMPTS_FILE with TARGET; one {"prompt", "response"} JSON object per line in OUT_FILE
    (with `tool_call` {"name", "arguments"} when a prompt has tools and the answer is a call)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise DataError("`--batch-size` and `--max-new-tokens` must be at least 1.")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise DataError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p}).")
    # bad input fails before the model loads
    rows = read_prompts(prompts_file, read_tools_file(tools_file) if tools_file else None)
    import torch

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded = loaded or load_for_inference(target)
    if system is not None:
        loaded.system_prompt = system
    torch.manual_seed(seed)
    # Similar lengths together waste less padding; answers are written back in the file's order.
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]["prompt"]))
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for k, answer in zip(
            chunk,
            generate_batch(
                loaded,
                [rows[k]["messages"] for k in chunk],
                max_new_tokens,
                do_sample,
                temperature,
                top_p,
                [rows[k]["tools"] for k in chunk],
            ),
        ):
            answers[k] = answer
        log.info("generated %d/%d", min(start + batch_size, len(rows)), len(rows))
    records = [json.dumps(_record(row, answers[k]), ensure_ascii=False) + "\n" for k, row in enumerate(rows)]
    write_text_atomic(out, "".join(records))
    return out


def _record(row: dict, answer: str) -> dict:
    """One output line: prompt, response, the conversation when it had several turns, the parsed tool call."""
    record = {"prompt": row["prompt"], "response": answer}
    if len(row["messages"]) > 1:
        record["messages"] = row["messages"]
    if row["tools"]:
        call, problem = parse_tool_call(answer)
        record.update({"tool_call": call} if call else {"tool_call_error": problem} if problem else {})
    return record
