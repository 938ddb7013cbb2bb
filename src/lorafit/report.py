"""The record a run leaves: `loss.png` and a self-contained `report.html` built from the run directory.

Everything comes from files the run already wrote (config.yaml, summary.json, metrics.jsonl,
generations.json), so `lorafit report RUN_DIR` can rebuild it at any time. The page has inline CSS and the
plot embedded as base64: it opens anywhere, offline, and can be mailed as one file. Every value that came
from the user's data or config is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path

from lorafit.errors import RunDirError
from lorafit.inference.heldout import read_answers
from lorafit.inference.heldout import summary as heldout_summary
from lorafit.metrics import perplexity
from lorafit.redact import redact
from lorafit.report_svg import CSS as SVG_CSS
from lorafit.report_svg import loss_svg
from lorafit.rundir import write_text_atomic
from lorafit.runtime import resolve_precision

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #d9dde3;padding-bottom:4px}
.sub{color:#5b6472;margin:0 0 18px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{background:#fff;border:1px solid #d9dde3;border-radius:8px;padding:10px 12px}
.card b{display:block;font-size:18px}.card span{color:#5b6472;font-size:12px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d9dde3}
th,td{text-align:left;vertical-align:top;padding:6px 10px;border-bottom:1px solid #eceef2}
th{background:#eef1f5;font-weight:600}td.k{color:#5b6472;white-space:nowrap;width:1%}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
img{max-width:100%;background:#fff;border:1px solid #d9dde3;border-radius:8px}
.gen td{width:33%}.muted{color:#8a93a1}
table.inner{border:0;background:none}table.inner td,table.inner th{padding:2px 6px}ul{margin:0;padding-left:18px}
.scroll{overflow-x:auto;max-width:100%}td{overflow-wrap:anywhere}
@media (max-width:640px){main{padding:12px}td.k{white-space:normal}
.gen tr,.gen td,.gen th{display:block;width:auto}.gen tr:first-child{display:none}
.gen td:nth-child(2)::before{content:"base: ";color:#5b6472}.gen td:nth-child(3)::before{content:"tuned: ";color:#5b6472}}
"""


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a killed writer
    return rows


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def curves(metrics: list[dict]) -> dict:
    """Train and validation loss against step and against tokens seen (eval points get the tokens at their step)."""
    train = [(r["step"], r["loss"], r.get("tokens")) for r in metrics if "loss" in r and _finite(r["loss"])]
    tokens_at = {s: t for s, _, t in train if t is not None}
    val = [
        (r["step"], r["eval_loss"], _tokens_at(tokens_at, r["step"]))
        for r in metrics
        if "eval_loss" in r and _finite(r["eval_loss"])
    ]
    return {"train": train, "validation": val}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _tokens_at(tokens_at: dict, step: int):
    earlier = [s for s in tokens_at if s <= step]
    return tokens_at[max(earlier)] if earlier else None


def plot_losses(metrics: list[dict], path: Path) -> Path | None:
    """loss.png: train and validation loss against optimizer step (left) and tokens seen (right)."""
    data = curves(metrics)
    if not data["train"] and not data["validation"]:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for ax, index, label in ((axes[0], 0, "optimizer step"), (axes[1], 2, "tokens seen")):
        for name, rows, style in (("train", data["train"], "-"), ("validation", data["validation"], "o-")):
            pts = [(r[index], r[1]) for r in rows if r[index] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=4, linewidth=1.4)
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _table(rows: list[tuple[str, object]], cls: str = "") -> str:
    body = "".join(f"<tr><td class=k>{html.escape(str(k))}</td><td>{_cell(v)}</td></tr>" for k, v in rows)
    return f"<table{' class=' + cls if cls else ''}>{body}</table>"


def _records(rows: list[dict]) -> str:
    """A list of records (data sources, histogram buckets) as one table with a header row."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<div class=scroll><table class=inner><tr>{head}</tr>{body}</table></div>"


def _cell(value) -> str:
    """A value as HTML: nested dicts as tables, lists of records as tables, other lists as bullet lists."""
    if isinstance(value, dict):
        return _table(list(value.items()), "inner") if value else "<span class=muted>(none)</span>"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _records(value)
    if isinstance(value, list):
        items = "".join(f"<li>{_cell(v)}</li>" for v in value)
        return f"<ul>{items}</ul>" if value else "<span class=muted>(none)</span>"
    if isinstance(value, float):
        return html.escape(f"{value:,.4g}")
    if isinstance(value, int) and not isinstance(value, bool):
        return html.escape(f"{value:,}")
    return html.escape(str(value))


def _card(value: str, label: str) -> str:
    return f"<div class=card><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>"


def _fmt(value, spec: str, suffix: str = "") -> str:
    return (
        "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:{spec}}{suffix}"
    )


def _cards(summary: dict) -> str:
    params = summary.get("parameters", {})
    trainable, total = params.get("trainable"), params.get("total")
    share = f"{100 * trainable / total:.2f}% of {total:,}" if trainable and total else "trainable parameters"
    peak = summary.get("peak_memory_bytes")
    cards = [
        (_fmt(trainable, ","), share),
        (_fmt(summary.get("steps"), ","), "optimizer steps"),
        (_fmt(summary.get("train_loss"), ".4f"), "mean train loss"),
        (_fmt(summary.get("eval_loss"), ".4f"), "final validation loss"),
        (_fmt(summary.get("eval_perplexity"), ".2f"), "validation perplexity")
        if "preference" not in summary
        else (_fmt(summary["preference"].get("eval_preference_accuracy"), ".1%"), "validation preference accuracy"),
        (_fmt(summary.get("tokens_per_second"), ",.0f"), "tokens / second"),
        (_fmt(summary.get("tokens"), ","), "tokens seen"),
        (_fmt(peak / 2**30 if peak else None, ".2f", " GiB"), f"peak memory ({summary.get('memory_kind', 'process')})"),
        (_fmt(summary.get("seconds"), ",.0f", " s"), "wall time"),
    ]
    return "<div class=cards>" + "".join(_card(v, k) for v, k in cards) + "</div>"


def _answer(value) -> str:
    return "<span class=muted>(none)</span>" if value is None else f"<pre>{html.escape(str(value))}</pre>"


def _generations(rows: list[dict]) -> str:
    if not rows:
        return "<p class=muted>No `eval.prompts` in the config, so no before/after answers.</p>"
    body = "".join(
        f"<tr><td>{_answer(r.get('prompt', ''))}</td><td>{_answer(r.get('before'))}</td>"
        f"<td>{_answer(r.get('after'))}</td></tr>"
        for r in rows
        if isinstance(r, dict)
    )
    return f"<table class=gen><tr><th>prompt</th><th>base model (before)</th><th>fine-tuned (after)</th></tr>{body}</table>"


def _heldout(rows: list[dict]) -> str:
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return (
            "<p class=muted>No validation data, so no held-out answers (set `data.validation` or "
            "`data.val_fraction`).</p>"
        )
    facts = heldout_summary(rows).get("keyfacts") or {}
    score = ""
    if facts.get("tuned"):
        tuned, base = facts["tuned"], facts.get("base")
        base_part = f" (base model: {base['right']}/{base['total']})" if base else ""
        score = f"<p>Key fact right in <b>{tuned['right']}/{tuned['total']}</b> answers after training{base_part}.</p>"
    mark = {True: "✓ ", False: "✗ ", None: ""}
    body = "".join(
        f"<tr><td>{_answer(r.get('question'))}</td><td>{_answer(r.get('expected') or r.get('reference'))}</td>"
        f"<td>{mark.get(r.get('before_correct'), '')}{_answer(r.get('before'))}</td>"
        f"<td>{mark.get(r.get('after_correct'), '')}{_answer(r.get('after'))}</td></tr>"
        for r in rows
    )
    return (
        f"{score}<table class=gen><tr><th>validation question</th><th>expected</th><th>base model (before)</th>"
        f"<th>fine-tuned (after)</th></tr>{body}</table>"
    )


def _preference(summary: dict) -> str:
    """DPO runs: preference accuracy, reward margin and the rewards of each side (train: last step; validation)."""
    pref = summary.get("preference")
    if not isinstance(pref, dict):
        return ""
    return f"<h2>Preference (DPO)</h2>{_table(list(pref.items()))}"


def build_html(run_dir: Path, png: Path | None) -> str:
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json", {})
    config = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").exists() else ""
    generations = _read_json(run_dir / "generations.json", [])
    data = summary.get("data") or {}
    image = (
        loss_svg(curves(read_metrics(run_dir)))  # hover a point for its numbers; loss.png below is the static copy
        + '<details class=png><summary>loss.png (against step and against tokens seen)</summary><img alt="loss curves" '
        f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"></details>'
        if png is not None and png.exists()
        else "<p class=muted>No losses were logged.</p>"
    )
    throughput = [
        (k, summary.get(k))
        for k in (
            "tokens",
            "trained_tokens",
            "tokens_per_second",
            "seconds",
            "steps",
            "device",
            "precision",
            "peak_memory_bytes",
        )
        if k in summary
    ]
    title = f"lorafit run {run_dir.name}"
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=viewport content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title><style>{CSS}{SVG_CSS}</style></head>
<body><main>
<h1>{html.escape(title)}</h1>
<p class=sub>{html.escape(str(summary.get("model", "")))} · {html.escape(str(run_dir.resolve()))}</p>
{_cards(summary)}
<h2>Loss</h2>
{image}
<h2>Before / after</h2>
{_generations(generations if isinstance(generations, list) else [])}
<h2>Held-out answers</h2>
{_heldout(read_answers(run_dir))}
{_preference(summary)}
<h2>Data</h2>
{_table(list(data.items()), "data") if data else "<p class=muted>No data statistics.</p>"}
<h2>Throughput and memory</h2>
{_table(throughput)}
<h2>Config</h2>
<pre>{html.escape(config)}</pre>
</main></body></html>
"""


def write_report(run_dir: str | Path) -> Path:
    """Write loss.png and report.html into `run_dir`; returns the report's path."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.jsonl").exists():
        raise RunDirError(
            f"{run_dir} is not a lorafit run directory (no config.yaml or metrics.jsonl).",
            "Pass the folder that `lorafit train` wrote, e.g. runs/demo.",
        )
    png = plot_losses(read_metrics(run_dir), run_dir / "loss.png")
    out = run_dir / "report.html"

    write_text_atomic(out, redact(build_html(run_dir, png)))  # no token in the report
    return out


# ---- the summary of a finished run (summary.json and the screen printed at the end)


def _peak_memory() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "GPU"
    from lorafit.runtime import peak_rss_bytes

    return peak_rss_bytes(), "process RSS"


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def summarize(cfg, s, result, final_eval: dict, started: float) -> dict:
    """summary.json: what the report and `lorafit` commands read back about a finished run."""

    peak, kind = _peak_memory()
    eval_loss = final_eval.get("eval_loss")
    trainer, tokens = s.trainer, s.tokens
    dpo = cfg.training.method == "dpo"
    return {
        "method": cfg.training.method,
        **({"preference": preference_summary(trainer.state.log_history, final_eval)} if dpo else {}),
        "model": cfg.model.name,
        "parameters": {"trainable": s.trainable, "total": s.total},
        "data": s.prepared.stats,
        "template": s.prepared.template,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "eval_perplexity": None if dpo else perplexity(eval_loss),  # a DPO loss is no language-model loss
        "steps": trainer.state.global_step,
        "schedule": s.schedule.as_dict() if getattr(s, "schedule", None) else None,
        "heldout": heldout_summary(read_answers(s.run_dir)),
        "tokens": tokens.real,
        "trained_tokens": tokens.trained,
        "tokens_per_second": round(tokens.per_second(), 1),
        "peak_memory_bytes": peak,
        "memory_kind": kind,
        "device": _device_name(),
        "precision": resolve_precision(cfg.training.precision),
        "seconds": round(time.time() - started, 1),
    }


PREFERENCE_KEYS = {  # TRL's log names -> summary.json's
    "rewards/accuracies": "preference_accuracy",
    "rewards/margins": "reward_margin",
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
}


def preference_summary(log_history: list[dict], final_eval: dict) -> dict:
    """DPO's last logged train values and the final validation values: preference accuracy, margin, rewards."""
    out = {}
    last = next((r for r in reversed(log_history) if "rewards/accuracies" in r and "loss" in r), {})
    for key, name in PREFERENCE_KEYS.items():
        if key in last:
            out[f"train_{name}"] = last[key]
        if f"eval_{key}" in final_eval:
            out[f"eval_{name}"] = final_eval[f"eval_{key}"]
    return out


def data_line(stats: dict) -> str:
    parts = [f"{stats.get('train_samples', '?')} training samples"]
    if stats.get("validation_samples"):
        parts.append(f"{stats['validation_samples']} validation")
    packing = stats.get("packing") or {}
    if packing.get("efficiency") is not None:
        rows, efficiency = packing.get("rows", "?"), packing["efficiency"]
        parts.append(f"micro-batches packed into {rows} rows per epoch ({efficiency:.1%} real tokens)")
    dropped = stats.get("dropped_too_long", 0) + stats.get("dropped_no_trained_token", 0) + stats.get("invalid", 0)
    if dropped:
        parts.append(f"{dropped} dropped (see `lorafit data check`)")
    special = (stats.get("special_token_text") or {}).get("rows")
    if special:
        parts.append(
            f"{special} with special-token text in their content, read as special tokens (see `lorafit data check`)"
        )
    unused = stats.get("unused_columns") or {}
    if unused:
        parts.append(
            f"not used: {', '.join(list(unused)[:8])}{' ...' if len(unused) > 8 else ''} (see `lorafit data check`)"
        )
    return "data: " + ", ".join(parts)
