"""`lorafit data check`: what training would see, before any model is loaded (only the tokenizer).

Reports rows read, formats, invalid rows, token lengths with a histogram, dropped/truncated samples, the
trained-token fraction, exact duplicates, packing, the schedule (samples, samples per optimizer step, optimizer
steps, epochs: the config's training settings, or the defaults for a data file), and one rendered example with
the trained tokens highlighted. Exit code 2 when the data cannot train as configured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorafit.config import DataSection, RunConfig, load_config
from lorafit.data.encode import Encoder, fit_length
from lorafit.data.preference_check import build_preference_report, print_preference_report
from lorafit.data.preference_data import looks_preference
from lorafit.data.prepare import prepare_data, read_source
from lorafit.data.readers import expand_source
from lorafit.data.sources import valid_rows
from lorafit.data.special_tokens import IGNORE_INDEX
from lorafit.errors import LorafitError
from lorafit.models.tokenizer import load_tokenizer
from lorafit.plan.architecture import load_architecture
from lorafit.train.schedule import describe_run

DEFAULT_MODEL = "smollm2-135m-instruct"
CONFIG_SUFFIXES = (".yaml", ".yml")


def data_check(target: str, model: str | None, max_length: int | None, as_json: bool) -> int:
    """Check a data file/glob/folder or a run config; print the report; return the exit code."""
    try:
        cfg, model_name, tokenizer_name = load_target(target, model, max_length)
        data_cfg = cfg.data
        method = cfg.training.method if Path(target).suffix.lower() in CONFIG_SUFFIXES else None
        pairs = method == "dpo" or (method is None and bool(data_cfg.train) and looks_preference(data_cfg.train[0]))
        report = (
            build_preference_report(data_cfg, model_name, tokenizer_name)
            if pairs
            else build_report(data_cfg, model_name, tokenizer_name, cfg)
        )
    except LorafitError as err:
        if as_json:
            print(json.dumps({"ok": False, "error": err.message, "hint": err.hint}, indent=2))
            return err.exit_code
        raise
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        (print_preference_report if pairs else print_report)(report)
    return 0 if report["ok"] else 2


def load_target(target: str, model: str | None, max_length: int | None):
    """(run config, model name, tokenizer name): a config file's, or the defaults around a data file."""

    overrides = [f"data.max_length={max_length}"] if max_length else []
    if Path(target).suffix.lower() in CONFIG_SUFFIXES:
        cfg = load_config(target, overrides)
        return cfg, model or cfg.model.name, None if model else cfg.model.tokenizer
    fields = {"train": [target]}
    if max_length:
        fields["max_length"] = max_length
    if model and _is_tokenizer_only(model):  # e.g. ../shared/llama3 or original/tokenizer.model: no weights needed
        return RunConfig(data=DataSection(**fields)), model, model
    return RunConfig(data=DataSection(**fields)), model or DEFAULT_MODEL, None


def _is_tokenizer_only(path: str) -> bool:
    """A tokenizer file, or a folder with a tokenizer but no model config: checking data needs only that."""
    p = Path(path).expanduser()
    if p.is_file():
        return True
    return (
        p.is_dir()
        and not (p / "config.json").exists()
        and any((p / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    )


def build_report(data_cfg, model_name: str, tokenizer_name: str | None = None, cfg=None) -> dict:
    """The check as a JSON-serialisable dict; `ok` is False when training would refuse this data.

    `cfg`: the run config whose training settings give the schedule (default: lorafit's defaults)."""

    for source in data_cfg.train + data_cfg.validation:  # a missing file fails before the tokenizer loads
        expand_source(source.path)
    tokenizer = load_tokenizer(model_name, tokenizer_name)
    lenient = data_cfg.model_copy(update={"skip_invalid": True})
    prepared = prepare_data(lenient, tokenizer, seed=0)
    cfg = (cfg or RunConfig()).model_copy(update={"data": data_cfg})
    schedule = describe_run(cfg, prepared, _hidden_size(cfg.model.model_copy(update={"name": model_name})))
    stats = dict(prepared.stats)
    problems = []
    if stats["invalid"] and not data_cfg.skip_invalid:
        problems.append(
            f"{stats['invalid']} invalid row(s): training stops on them (fix them, or set `data.skip_invalid: true`)."
        )
    warnings = _warnings(stats) + schedule.warnings
    first = read_source(data_cfg.train[0], 0)
    return {
        "ok": not problems,
        "model": model_name,
        "problems": problems,
        "warnings": warnings,
        **stats,
        "schedule": schedule.as_dict(),
        "schedule_line": schedule.line(),
        "histogram": _histogram(prepared, data_cfg.max_length),
        "example": _example(first, tokenizer, prepared.template, data_cfg),
    }


def _hidden_size(model_cfg) -> int | None:
    """The model's width, for `training.learning_rate: auto`: read from its config (no weights), None if unreadable."""
    try:
        return int(load_architecture(model_cfg).hidden_size)
    except (LorafitError, OSError, ValueError, AttributeError):
        return None


def _warnings(stats: dict) -> list[str]:
    out = []
    if stats["dropped_too_long"]:
        out.append(
            f"{stats['dropped_too_long']} sample(s) longer than max_length {stats['max_length']} are dropped: "
            "raise `data.max_length` or set `data.truncation: right`."
        )
    if stats["dropped_no_trained_token"]:
        out.append(f"{stats['dropped_no_trained_token']} sample(s) have no trained token and are dropped.")
    if stats["duplicates"]:
        out.append(f"{stats['duplicates']} exact duplicate sample(s): they are trained on more than once.")
    special = stats.get("special_token_text", {})
    if special.get("rows"):
        out.append(
            f"{special['rows']} row(s) hold special-token text in their content (first: {special['first']}); the "
            "tokenizer reads it as that special token, not as text (an end-of-turn token there ends the turn "
            "early). Remove it unless this is intended."
        )
    if stats.get("unused_columns"):
        out.append(
            f"not used by training (ignored): {unused_text(stats['unused_columns'])}. Map a column the form "
            "needs with `columns:`, or drop these to silence this."
        )
    if stats["trained_fraction"] < 0.02:
        out.append(
            f"only {100 * stats['trained_fraction']:.1f}% of tokens carry loss: check `data.train_on` and the answers' length."
        )
    return out


def unused_text(unused: dict[str, int], limit: int = 8) -> str:
    """`id` (300 rows), `meta` (12 rows) ... for the report and the training data line."""
    names = [f"`{name}` ({rows:,} row{'s' if rows != 1 else ''})" for name, rows in list(unused.items())[:limit]]
    more = len(unused) - limit
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _histogram(prepared, max_length: int, buckets: int = 10) -> list[dict]:
    lengths = prepared.lengths if prepared.lengths is not None else np.zeros(0)
    if not len(lengths):
        return []
    top = max(int(lengths.max()), max_length)
    edges = np.linspace(0, top, buckets + 1).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    return [{"from": int(a), "to": int(b), "count": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts)]


def _example(source, tokenizer, template: str, data_cfg) -> dict | None:
    """The first valid row of the first source, as tokens with their trained flag."""

    rows = valid_rows([source])
    if not len(rows):
        return None
    encoder = Encoder(tokenizer, template, data_cfg.train_on, data_cfg.system_prompt, data_cfg.tools_in_user_message)
    return example_spans(encoder, tokenizer, rows[_first_tool_row(rows)])


def example_spans(encoder, tokenizer, row: dict, max_length: int | None = None, truncation: str = "none") -> dict:
    """One valid row encoded as training encodes it: runs of text, each trained or masked (`lorafit ui` pages them).

    With MAX_LENGTH the length policy applies as in training: `status` ok, truncated (cut text shown), too_long or
    no_trained (dropped by training; the whole row is shown so the user sees why)."""
    messages = json.loads(row["messages"]) if row["messages"] else None
    tools = json.loads(row["tools"]) if row["tools"] else None
    ids, labels = encoder.encode_batch([messages], [row["text"]], [tools])[0]
    status = "ok"
    if max_length:
        fit_ids, fit_labels, status = fit_length(ids, labels, max_length, truncation)
        ids, labels = (fit_ids, fit_labels) if fit_ids else (ids, labels)
    spans, current, flag = [], [], None
    for i, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if flag is not None and trained != flag:
            spans.append({"text": tokenizer.decode(current), "trained": flag})
            current = []
        current.append(i)
        flag = trained
    if current:
        spans.append({"text": tokenizer.decode(current), "trained": flag})
    return {"loc": row["loc"], "tokens": len(ids), "spans": spans, "status": status}


def _first_tool_row(rows) -> int:
    """The first row with tools, so tool data shows its tool layout (0 when no row has tools)."""
    import pyarrow.compute as pc

    found = np.flatnonzero(pc.is_valid(rows.with_format("arrow")["tools"]).to_numpy(zero_copy_only=False))
    return int(found[0]) if len(found) else 0


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.markup import (
        escape,  # paths and names are text: `a[/b]c.jsonl` is not rich markup
    )
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[bold]lorafit data check[/]  tokenizer of {escape(str(report['model']))}, template {report['template']}, "
        f"max_length {report['max_length']}, train_on {report['train_on']}"
    )
    table = Table("source", "format", "rows", "invalid", "weight", box=None)
    for s in report["sources"] + report["validation_sources"]:
        table.add_row(
            escape(s["path"]), str(s["format"]), f"{s['rows']:,}", f"{s['invalid']:,}", str(s.get("weight", "val"))
        )
    console.print(table)
    if report["invalid"]:
        listed = len(report["invalid_examples"])
        console.print(
            f"[red]invalid rows: {report['invalid']:,}[/]"
            + (f" (the first {listed} problems shown):" if report["invalid"] > listed else ":")
        )
        for p in report["invalid_examples"]:
            console.print(f"  {p}", markup=False)
    ln = report["length"]
    console.print(f"token length: p50 {ln['p50']:,}  p95 {ln['p95']:,}  max {ln['max']:,}  mean {ln['mean']:,}")
    peak = max((b["count"] for b in report["histogram"]), default=1) or 1
    for b in report["histogram"]:
        bar = "█" * int(round(30 * b["count"] / peak))
        console.print(f"  {b['from']:>6}-{b['to']:<6} {bar} {b['count']:,}", markup=False)
    console.print(
        f"samples: {report['train_samples']:,} train, {report['validation_samples']:,} validation; "
        f"dropped {report['dropped_too_long']:,} too long, {report['dropped_no_trained_token']:,} with no trained token; "
        f"truncated {report['truncated']:,}; exact duplicates {report['duplicates']:,}"
    )
    console.print(
        f"trained tokens: {report['trained_tokens']:,} of {report['total_tokens']:,} "
        f"({100 * report['trained_fraction']:.1f}%)"
    )
    if "packing" in report:
        pk = report["packing"]
        console.print(
            f"packing: {pk['samples']:,} samples in micro-batches of {pk['micro_batch_size']} -> "
            f"{pk['rows']:,} rows "
            f"per epoch of at most {report['max_length']} tokens, {100 * pk['efficiency']:.1f}% real tokens "
            f"(unpacked: {pk['unpacked_rows']:,} rows, {100 * pk['unpacked_efficiency']:.1f}%)"
        )
    console.print(report["schedule_line"], markup=False)
    if report.get("example"):
        _print_example(report["example"], console)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    for p in report["problems"]:
        console.print(f"[bold red]cannot train:[/] {p}")
    console.print(
        "[green]ok: the data can train[/]" if report["ok"] else "[red]exit 2: the data cannot train as configured[/]"
    )


def _print_example(example: dict, console) -> None:
    """The rendered example with trained tokens green and masked ones dim; bracketed without colour (a pipe, a log)."""
    from rich.markup import escape
    from rich.text import Text

    plain = console.no_color or not console.is_terminal
    legend = "trained tokens in [[ ]]" if plain else "[bold green]trained[/], [dim]masked[/]"
    console.print(f"example ({escape(example['loc'])}, {example['tokens']} tokens; {legend}):")
    text = Text()
    for span in example["spans"]:
        if plain:
            text.append(f"[[{span['text']}]]" if span["trained"] else span["text"])
        else:
            text.append(span["text"], style="bold green" if span["trained"] else "dim")
    console.print(text)
