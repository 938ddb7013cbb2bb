"""`lorafit data check` on preference pairs: forms, invalid rows by file:line, lengths, and one pair rendered with
its prompt, chosen and rejected parts marked (as token ids split them). Exit code 2 when the pairs cannot train."""

from __future__ import annotations

from lorafit.data.encode import Encoder
from lorafit.data.preference_data import encode_pairs, prepare_preferences, read_preference_source
from lorafit.models.tokenizer import load_tokenizer


def build_preference_report(data_cfg, model_name: str, tokenizer_name: str | None = None) -> dict:
    tokenizer = load_tokenizer(model_name, tokenizer_name)
    prepared = prepare_preferences(data_cfg.model_copy(update={"skip_invalid": True}), tokenizer, seed=0)
    stats = dict(prepared.stats)
    problems, warnings = [], []
    if stats["invalid"] and not data_cfg.skip_invalid:
        problems.append(
            f"{stats['invalid']} invalid row(s): training stops on them (fix them, or set `data.skip_invalid: true`)."
        )
    if stats["dropped_too_long"]:
        warnings.append(
            f"{stats['dropped_too_long']} pair(s) longer than max_length {stats['max_length']} are dropped: "
            "raise `data.max_length` or set `data.truncation: right`."
        )
    if stats["unused_columns"]:
        names = ", ".join(f"`{k}` ({v} rows)" for k, v in list(stats["unused_columns"].items())[:8])
        warnings.append(f"not used by training (ignored): {names}.")
    return {
        "ok": not problems,
        "model": model_name,
        "problems": problems,
        "warnings": warnings,
        **stats,
        "example": _example(data_cfg, tokenizer, prepared.template),
    }


def _example(data_cfg, tokenizer, template: str) -> dict | None:
    """The first valid pair of the first source: its prompt, chosen and rejected tokens, decoded part by part."""
    source = read_preference_source(data_cfg.train[0])
    if not source.pairs:
        return None
    loc, pair = source.pairs[0]
    encoder = Encoder(tokenizer, template, "last_assistant", data_cfg.system_prompt)
    prompt, chosen, rejected = encode_pairs(encoder, [pair])[0]
    spans = [
        {"part": part, "text": tokenizer.decode(ids), "tokens": len(ids)}
        for part, ids in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))
    ]
    return {"loc": loc, "tokens": len(prompt) + max(len(chosen), len(rejected)), "spans": spans}


STYLES = {"prompt": "dim", "chosen": "bold green", "rejected": "bold red"}


def print_preference_report(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[bold]lorafit data check[/] (preference pairs for `training.method: dpo`)  tokenizer of "
        f"{escape(str(report['model']))}, template {report['template']}, max_length {report['max_length']}"
    )
    table = Table("source", "format", "rows", "invalid", box=None)
    for s in report["sources"] + report["validation_sources"]:
        table.add_row(escape(s["path"]), str(s["format"]), f"{s['rows']:,}", f"{s['invalid']:,}")
    console.print(table)
    if report["invalid"]:
        console.print(f"[red]invalid rows: {report['invalid']:,}[/]")
        for p in report["invalid_examples"]:
            console.print(f"  {p}", markup=False)
    ln = report["length"]
    console.print(f"pair length (prompt + longer answer): p50 {ln['p50']:,}  p95 {ln['p95']:,}  max {ln['max']:,}")
    console.print(
        f"pairs: {report['train_samples']:,} train, {report['validation_samples']:,} validation; dropped "
        f"{report['dropped_too_long']:,} too long; truncated {report['truncated']:,}"
    )
    example = report.get("example")
    if example:
        plain = console.no_color or not console.is_terminal
        console.print(f"example ({escape(example['loc'])}; prompt, then each answer after it, split on token ids):")
        for span in example["spans"]:
            text = Text(f"  {span['part']} ({span['tokens']} tokens): ")
            text.append(f"[[{span['text']}]]" if plain else span["text"], style=None if plain else STYLES[span["part"]])
            console.print(text)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    for p in report["problems"]:
        console.print(f"[bold red]cannot train:[/] {p}")
    console.print(
        "[green]ok: the pairs can train[/]" if report["ok"] else "[red]exit 2: the data cannot train as configured[/]"
    )
