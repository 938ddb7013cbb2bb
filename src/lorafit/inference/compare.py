"""`lorafit compare`: what fine-tuning changed, on data you choose: what was learned, and what drifted.

One model in memory: the run's base with its adapter, which PEFT can switch off (`disable_adapter`), so the
"base" answers and loss come from exactly the weights training started from. The loss is computed the way
training computes it: the run's own data settings (template, system prompt, which turns are trained, length
policy) tokenize the file, and the loss is the mean over trained tokens.

Rows that offer tools are also scored as tool calls (see inference/tool_calls.py): of the rows whose reference
is a call, how many answers are a valid call, name the right tool, and have exactly the reference's arguments;
of the rows whose reference is a text answer, how many make no call.

Learned: rows that carry `expected` (a key fact) are all answered by both models and scored by the key-fact
rule (lorafit.keyfacts). Drifted: the same loss on GENERAL, 32 short general-knowledge chats shipped with
lorafit; a rise there means the adapter changed what the base model already knew.
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
from lorafit.keyfacts import accuracy, is_correct
from lorafit.metrics import perplexity
from lorafit.rundir import load_run_config

GENERAL = Path(__file__).with_name("general_knowledge.jsonl")


def conversations(data_file: str, data_cfg) -> list[dict]:
    """{"messages": prompt turns, "reference": the last assistant answer (a call as JSON), "call": the reference call
    or None, "tools": the row's tools or None, "expected": the row's key fact or None} for every valid chat row."""
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
        if last is not None and any(m["role"] == "user" for m in messages[:last]):
            call = reference_call(messages[last])
            reference = json.dumps(call, ensure_ascii=False) if call else messages[last]["content"]
            rows.append(
                {
                    "messages": messages[:last],
                    "reference": reference,
                    "call": call,
                    "loc": row["loc"],
                    "tools": json.loads(row["tools"]) if row["tools"] else None,
                    "expected": row["expected"],
                }
            )
    return rows


def question(messages: list[dict]) -> str:
    """The last user turn of a prompt (a prompt may end with a tool result)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def answer_pairs(loaded, rows: list[dict], base_mode, max_new_tokens: int, batch_size: int = 8):
    """Base and tuned answers to each row, each rendered with its own tools as in training."""
    base, tuned = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts, tools = [r["messages"] for r in chunk], [r["tools"] for r in chunk]
        with base_mode():
            base += generate_batch(loaded, prompts, max_new_tokens, tools=tools)
        tuned += generate_batch(loaded, prompts, max_new_tokens, tools=tools)
    return base, tuned


def answered_rows(rows: list[dict], limit: int, tool_limit: int) -> list[dict]:
    """The rows both models answer: the first `limit` (shown), every later row with a key fact, and later rows
    that offer tools up to `tool_limit` rows with tools in all."""
    shown = rows[:limit]
    budget = tool_limit - sum(1 for r in shown if r["tools"])
    later = []
    for r in rows[limit:]:
        if r["tools"] and not r["expected"]:
            if budget <= 0:
                continue
            budget -= 1
        if r["tools"] or r["expected"]:
            later.append(r)
    return shown + later


def keyfact_scores(rows: list[dict], base: list[str], tuned: list[str]) -> dict | None:
    """Key-fact accuracy of both models over the answered rows with `expected` (None when there are none)."""
    keys = [r["expected"] for r in rows]
    if not any(keys):
        return None
    return {"base": accuracy(base, keys), "tuned": accuracy(tuned, keys)}


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
    general: bool = True,
) -> dict:
    """Answers of the base and the tuned model side by side, both validation losses on DATA_FILE, key-fact accuracy
    of the rows with `expected`, the tool-call accuracy of both on up to TOOL_LIMIT rows that offer tools, and
    (`general`) the loss change on the shipped general-knowledge chats."""
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
    base_loss, tuned_loss, tokens, n_rows = _losses(loaded, cfg, data_file, base_mode)
    answered = answered_rows(rows, limit, tool_limit)
    base_answers, tuned_answers = answer_pairs(loaded, answered, base_mode, max_new_tokens)
    result = {
        "run": str(run_dir),
        "data": str(data_file),
        "rows": n_rows,
        "trained_tokens": tokens,
        "base_loss": base_loss,
        "tuned_loss": tuned_loss,
        "base_perplexity": perplexity(base_loss),
        "tuned_perplexity": perplexity(tuned_loss),
        "answers": [
            {
                "question": question(r["messages"]),
                "reference": r["reference"],
                "expected": r["expected"],
                "base": b,
                "tuned": t,
            }
            for r, b, t in zip(rows[:limit], base_answers, tuned_answers)
        ],
        "keyfacts": keyfact_scores(answered, base_answers, tuned_answers),
        "general": None,
    }
    tools = tool_scores(answered, base_answers, tuned_answers)
    if tools:
        result["tool_calls"] = tools
    if general:
        result["general"] = _drift(loaded, cfg, base_mode)
    if as_json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print_comparison(result, console)
    return result


def _drift(loaded, cfg, base_mode) -> dict:
    """Both losses on the shipped general-knowledge chats: a rise means the adapter changed what the base knew."""
    base, tuned, tokens, rows = _losses(loaded, cfg, str(GENERAL), base_mode)
    return {
        "data": str(GENERAL),
        "rows": rows,
        "trained_tokens": tokens,
        "base_loss": base,
        "tuned_loss": tuned,
        "change": tuned - base,
    }


def _losses(loaded, cfg, data_file: str, base_mode) -> tuple[float, float, int, int]:
    """(base loss, tuned loss, trained tokens, rows) on one file, tokenized with the run's data settings."""
    from lorafit.data.prepare import prepare_data

    # The run's data settings, with this file as the only source, unpacked: one row per conversation.
    data_cfg = cfg.data.model_copy(
        update={"train": [DataSource(path=data_file)], "validation": [], "val_fraction": 0.0, "packing": False}
    )
    tokenized = prepare_data(data_cfg, loaded.tokenizer, seed=cfg.training.seed).train
    with base_mode():
        base_loss, tokens = validation_loss(loaded.model, loaded.tokenizer, tokenized)
    tuned_loss, _ = validation_loss(loaded.model, loaded.tokenizer, tokenized)
    return base_loss, tuned_loss, tokens, len(tokenized)


def print_comparison(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"base vs tuned on {result['data']}", show_lines=True)
    for name in ("question", "reference", "base", "tuned"):
        table.add_column(name, overflow="fold")
    for a in result["answers"]:
        key = a.get("expected")
        base, tuned = (f"{'✓' if is_correct(t, key) else '✗'} {t}" if key else t for t in (a["base"], a["tuned"]))
        table.add_row(a["question"], a["reference"], base, tuned)
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
    _print_learned_and_drift(result, console)


def _print_learned_and_drift(result: dict, console) -> None:
    facts = result.get("keyfacts")
    if facts:
        tuned, base = facts["tuned"], facts["base"]
        console.print(
            f"learned: key facts right in {tuned['right']}/{tuned['total']} answers (base "
            f"{base['right']}/{base['total']}); right = the answer contains the row's `expected`",
            markup=False,
        )
    general = result.get("general")
    if general:
        console.print(
            f"drift: loss on {general['rows']} general-knowledge chats base {general['base_loss']:.4f} -> "
            f"tuned {general['tuned_loss']:.4f} ({general['change']:+.4f}; above 0 = the adapter changed "
            "what the base model knew)",
            markup=False,
        )


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
