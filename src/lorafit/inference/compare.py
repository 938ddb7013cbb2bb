"""`lorafit compare`: what fine-tuning changed, on data you choose.

One model in memory: the run's base with its adapter, which PEFT can switch off (`disable_adapter`), so the
"base" answers and loss come from exactly the weights training started from. The loss is computed the way
training computes it: the run's own data settings (template, system prompt, which turns are trained, length
policy) tokenize the file, and the loss is the mean over trained tokens.

Rows that offer tools are also scored as tool calls (see inference/tool_calls.py): of the rows whose reference
is a call, how many answers are a valid call, name the right tool, and have exactly the reference's arguments;
of the rows whose reference is a text answer, how many make no call.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from lorafit.config import DataSource
from lorafit.data.collate import PadCollator
from lorafit.data.preference_data import looks_preference
from lorafit.errors import DataError
from lorafit.inference.generate import generate_batch, load_for_inference
from lorafit.inference.preference_compare import compare_preferences
from lorafit.inference.tool_calls import ToolScore, reference_call
from lorafit.metrics import perplexity
from lorafit.rundir import load_run_config


def conversations(data_file: str, data_cfg) -> list[dict]:
    """{"messages": prompt turns, "reference": the last assistant answer (a call as JSON), "call": the reference call
    or None, "tools": the row's tools or None} for every valid chat row."""
    from lorafit.data.sources import raise_for_problems, read_source

    source = read_source(DataSource(path=data_file))
    if not data_cfg.skip_invalid:
        raise_for_problems([source], "compare")
    rows = []
    for row in source.dataset:
        if row["problems"] or not row["messages"]:
            continue
        messages = json.loads(row["messages"])
        last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is not None:
            call = reference_call(messages[last])
            reference = json.dumps(call, ensure_ascii=False) if call else messages[last]["content"]
            rows.append(
                {
                    "messages": messages[:last],
                    "reference": reference,
                    "call": call,
                    "loc": row["loc"],
                    "tools": json.loads(row["tools"]) if row["tools"] else None,
                }
            )
    return rows


def question(messages: list[dict]) -> str:
    """The last user turn of a prompt (a prompt may end with a tool result)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def answer_pairs(loaded, rows: list[dict], base_mode, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """Base and tuned answers to each row, each rendered with its own tools as in training."""
    if not rows:
        return [], []
    prompts, tools = [r["messages"] for r in rows], [r["tools"] for r in rows]
    with base_mode():
        base = generate_batch(loaded, prompts, max_new_tokens, tools=tools)
    return base, generate_batch(loaded, prompts, max_new_tokens, tools=tools)


def tool_scores(rows: list[dict], base: list[str], tuned: list[str]) -> dict | None:
    """Tool-call accuracy of both models over the rows that offer tools (None when there are none)."""
    scores = {"base": ToolScore(), "tuned": ToolScore()}
    for row, b, t in zip(rows, base, tuned):
        if row["tools"]:
            scores["base"].add(row["call"], b)
            scores["tuned"].add(row["call"], t)
    if not scores["base"].details:
        return None
    return {"rows": len(scores["base"].details), "base": scores["base"].summary(), "tuned": scores["tuned"].summary()}


def validation_loss(model, tokenizer, dataset, batch_size: int = 8) -> tuple[float, int]:
    """(mean loss per trained token, trained tokens) over tokenized rows (input_ids, labels)."""
    import torch

    from lorafit.train.loss import causal_lm_loss

    device = next(model.parameters()).device
    total, count = 0.0, 0
    collate = PadCollator(tokenizer.pad_token_id)
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        batch = collate([{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            _, stats = causal_lm_loss(model, batch)
        total += float(stats["loss_sum"])
        count += int(stats["trained_tokens"])
    return (total / count if count else float("nan")), count


def compare(
    run_dir: str,
    data_file: str,
    limit: int = 10,
    max_new_tokens: int = 128,
    as_json: bool = False,
    console=None,
    tool_limit: int = 200,
) -> dict:
    """Answers of the base and the tuned model side by side, both validation losses on DATA_FILE, and the tool-call
    accuracy of both on up to TOOL_LIMIT rows that offer tools."""
    from lorafit.data.prepare import prepare_data

    cfg = load_run_config(run_dir)
    if not Path(data_file).exists():
        raise DataError(
            f"data file {data_file} does not exist.",
            "Pass a chat file like the training data (JSONL, JSON, CSV, Parquet).",
        )
    if looks_preference(DataSource(path=data_file)):  # chosen/rejected pairs: preference accuracy, base vs tuned
        return compare_preferences(run_dir, data_file, cfg, as_json, console)
    rows = conversations(data_file, cfg.data)
    loaded = load_for_inference(run_dir, merge=False)  # keep the adapter separate so it can be switched off
    model = loaded.model
    base_mode = model.disable_adapter if hasattr(model, "disable_adapter") else nullcontext

    # The run's data settings, with this file as the only source, unpacked: one row per conversation.
    data_cfg = cfg.data.model_copy(
        update={"train": [DataSource(path=data_file)], "validation": [], "val_fraction": 0.0, "packing": False}
    )
    tokenized = prepare_data(data_cfg, loaded.tokenizer, seed=cfg.training.seed).train
    with base_mode():
        base_loss, tokens = validation_loss(model, loaded.tokenizer, tokenized)
    tuned_loss, _ = validation_loss(model, loaded.tokenizer, tokenized)

    shown = rows[:limit]
    tool_rows = [r for r in rows[limit:] if r["tools"]][: max(0, tool_limit - sum(1 for r in shown if r["tools"]))]
    base_answers, tuned_answers = answer_pairs(loaded, shown + tool_rows, base_mode, max_new_tokens)
    result = {
        "run": str(run_dir),
        "data": str(data_file),
        "rows": len(tokenized),
        "trained_tokens": tokens,
        "base_loss": base_loss,
        "tuned_loss": tuned_loss,
        "base_perplexity": perplexity(base_loss),
        "tuned_perplexity": perplexity(tuned_loss),
        "answers": [
            {"question": question(r["messages"]), "reference": r["reference"], "base": b, "tuned": t}
            for r, b, t in zip(shown, base_answers, tuned_answers)
        ],
    }
    tools = tool_scores(shown + tool_rows, base_answers, tuned_answers)
    if tools:
        result["tool_calls"] = tools
    if as_json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print_comparison(result, console)
    return result


def print_comparison(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"base vs tuned on {result['data']}", show_lines=True)
    for name in ("question", "reference", "base", "tuned"):
        table.add_column(name, overflow="fold")
    for a in result["answers"]:
        table.add_row(a["question"], a["reference"], a["base"], a["tuned"])
    console.print(table)
    change = result["tuned_loss"] - result["base_loss"]
    console.print(
        f"validation loss on {result['rows']} rows ({result['trained_tokens']:,} trained tokens): "
        f"base {result['base_loss']:.4f} (ppl {_ppl(result['base_perplexity'])}) -> tuned {result['tuned_loss']:.4f} "
        f"(ppl {_ppl(result['tuned_perplexity'])}), {change:+.4f}",
        markup=False,
    )
    if result.get("tool_calls"):
        console.print(tool_table(result["tool_calls"]))


def tool_table(tools: dict):
    from rich.table import Table

    base, tuned = tools["base"], tools["tuned"]
    table = Table(title=f"tool calls on {tools['rows']} rows with tools", show_lines=False)
    for name in ("", "base", "tuned"):
        table.add_column(name)
    n, none = base["expected_calls"], base["no_call_expected"]
    for label, key, total in (
        ("valid call (JSON, name, arguments object)", "valid_calls", n),
        ("right tool", "right_tool", n),
        ("exact arguments", "exact_calls", n),
        ("no call where none expected", "no_call", none),
    ):
        if total:
            table.add_row(label, f"{base[key]}/{total}", f"{tuned[key]}/{total}")
    return table


def _ppl(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "n/a"
