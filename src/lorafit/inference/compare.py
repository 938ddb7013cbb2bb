"""`lorafit compare`: what fine-tuning changed, on data you choose: what was learned, and what drifted.

One model in memory: the run's base with its adapter, which PEFT can switch off (`disable_adapter`), so the
"base" answers and loss come from exactly the weights training started from. The loss is computed the way
training computes it: the run's own data settings (template, system prompt, which turns are trained, length
policy) tokenize the file, and the loss is the mean over trained tokens.

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
from lorafit.errors import DataError
from lorafit.inference.generate import generate_batch, load_for_inference
from lorafit.keyfacts import accuracy, is_correct, split_reference
from lorafit.metrics import perplexity
from lorafit.rundir import load_run_config

GENERAL = Path(__file__).with_name("general_knowledge.jsonl")


def conversations(data_file: str, data_cfg) -> list[dict]:
    """{"messages": prompt turns, "reference": the last assistant answer, "expected": key fact or None} per chat row."""
    from lorafit.data.sources import raise_for_problems, read_source

    source = read_source(DataSource(path=data_file))
    if not data_cfg.skip_invalid:
        raise_for_problems([source], "compare")
    rows = []
    for row in source.dataset:
        if row["problems"] or not row["messages"]:
            continue
        split = split_reference(json.loads(row["messages"]))
        if split is not None:
            rows.append({"messages": split[0], "reference": split[1], "expected": row["expected"], "loc": row["loc"]})
    return rows


def validation_loss(model, tokenizer, dataset, batch_size: int = 8) -> tuple[float, int]:
    """(mean loss per trained token, trained tokens) over tokenized rows (input_ids, labels)."""
    import torch

    from lorafit.train.loss import causal_lm_loss

    device = next(model.parameters()).device
    total, count = 0.0, 0
    collate = PadCollator(tokenizer.pad_token_id)
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        batch = collate([{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            _, stats = causal_lm_loss(model, batch)
        total += float(stats["loss_sum"])
        count += int(stats["trained_tokens"])
    return (total / count if count else float("nan")), count


def compare(run_dir: str, data_file: str, limit: int = 10, max_new_tokens: int = 128, as_json: bool = False,
            console=None, general: bool = True) -> dict:
    """Answers of the base and the tuned model side by side, both losses on DATA_FILE, key-fact accuracy of the rows
    with `expected`, and (`general`) the loss change on the shipped general-knowledge chats."""
    cfg = load_run_config(run_dir)
    if not Path(data_file).exists():
        raise DataError(f"data file {data_file} does not exist.", "Pass a chat file like the training data (JSONL, JSON, CSV, Parquet).")
    rows = conversations(data_file, cfg.data)
    loaded = load_for_inference(run_dir, merge=False)  # keep the adapter separate so it can be switched off
    base_loss, tuned_loss, tokens, n_rows = _losses(loaded, cfg, data_file)
    base_answers, tuned_answers = _answers(loaded, rows, limit, max_new_tokens)
    shown = rows[:limit]
    result = {
        "run": str(run_dir), "data": str(data_file), "rows": n_rows, "trained_tokens": tokens,
        "base_loss": base_loss, "tuned_loss": tuned_loss,
        "base_perplexity": perplexity(base_loss),
        "tuned_perplexity": perplexity(tuned_loss),
        "answers": [{"question": r["messages"][-1]["content"], "reference": r["reference"], "expected": r["expected"],
                     "base": base_answers[k], "tuned": tuned_answers[k]} for k, r in enumerate(shown)],
        "keyfacts": None, "general": None,
    }
    keys = [r["expected"] for r in rows]
    if any(keys):  # every row with a key fact was answered (see _answers)
        scored = [(b, t, k) for b, t, k in zip(base_answers, tuned_answers, keys) if k]
        result["keyfacts"] = {"base": accuracy([b for b, _, _ in scored], [k for _, _, k in scored]),
                              "tuned": accuracy([t for _, t, _ in scored], [k for _, _, k in scored])}
    if general:
        g_base, g_tuned, g_tokens, g_rows = _losses(loaded, cfg, str(GENERAL))
        result["general"] = {"data": str(GENERAL), "rows": g_rows, "trained_tokens": g_tokens, "base_loss": g_base,
                             "tuned_loss": g_tuned, "change": g_tuned - g_base}
    if as_json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print_comparison(result, console)
    return result


def _base_mode(model):
    return model.disable_adapter if hasattr(model, "disable_adapter") else nullcontext


def _losses(loaded, cfg, data_file: str) -> tuple[float, float, int, int]:
    """(base loss, tuned loss, trained tokens, rows) on one file, tokenized with the run's data settings."""
    from lorafit.data.prepare import prepare_data

    # The run's data settings, with this file as the only source: one row per conversation.
    data_cfg = cfg.data.model_copy(update={"train": [DataSource(path=data_file)], "validation": [], "val_fraction": 0.0,
                                           "packing": False})
    tokenized = prepare_data(data_cfg, loaded.tokenizer, seed=cfg.training.seed).train
    with _base_mode(loaded.model)():
        base_loss, tokens = validation_loss(loaded.model, loaded.tokenizer, tokenized)
    tuned_loss, _ = validation_loss(loaded.model, loaded.tokenizer, tokenized)
    return base_loss, tuned_loss, tokens, len(tokenized)


def _answers(loaded, rows: list[dict], limit: int, max_new_tokens: int, batch_size: int = 8) -> tuple[list, list]:
    """Base and tuned answers to the first `limit` rows and to every row with a key fact (others: None)."""
    wanted = [k for k, r in enumerate(rows) if k < limit or r["expected"]]
    base, tuned = [None] * len(rows), [None] * len(rows)
    for start in range(0, len(wanted), batch_size):
        chunk = wanted[start:start + batch_size]
        prompts = [rows[k]["messages"] for k in chunk]
        with _base_mode(loaded.model)():
            answers = generate_batch(loaded, prompts, max_new_tokens)
        for k, a, t in zip(chunk, answers, generate_batch(loaded, prompts, max_new_tokens)):
            base[k], tuned[k] = a, t
    return base, tuned


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
    console.print(f"validation loss on {result['rows']} rows ({result['trained_tokens']:,} trained tokens): "
                  f"base {result['base_loss']:.4f} (ppl {_ppl(result['base_perplexity'])}) -> tuned {result['tuned_loss']:.4f} "
                  f"(ppl {_ppl(result['tuned_perplexity'])}), {change:+.4f}", markup=False)
    facts = result.get("keyfacts")
    if facts:
        tuned, base = facts["tuned"], facts["base"]
        console.print(f"learned: key facts right in {tuned['right']}/{tuned['total']} answers (base "
                      f"{base['right']}/{base['total']}); right = the answer contains the row's `expected`",
                      markup=False)
    general = result.get("general")
    if general:
        console.print(f"drift: loss on {general['rows']} general-knowledge chats base {general['base_loss']:.4f} -> "
                      f"tuned {general['tuned_loss']:.4f} ({general['change']:+.4f}; above 0 = the adapter changed "
                      "what the base model knew)", markup=False)


def _ppl(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "n/a"
