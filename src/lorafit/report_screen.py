"""The summary a finished `lorafit train` prints: where the run is, its steps, losses, speed and memory."""

from __future__ import annotations

from pathlib import Path


def summary_screen(run_dir: Path, s: dict) -> str:
    eval_part = (
        f"   eval loss {s['eval_loss']:.4f} (ppl {s['eval_perplexity']:.2f})"
        if s.get("eval_loss") is not None and s.get("eval_perplexity") is not None
        else ""
    )
    lines = [
        "",
        f"run directory   {run_dir}",
        f"adapter         {run_dir / 'adapter'}  (PEFT format)",
        f"steps           {s['steps']}{_epochs_part(s.get('schedule'))}   train loss {s['train_loss']:.4f}"
        + eval_part
        + _preference_part(s),
        f"tokens          {s['tokens']:,} seen, {s['trained_tokens']:,} trained   {s['tokens_per_second']:,.0f} tokens/s",
        f"peak memory     {s['peak_memory_bytes'] / 2**30:.2f} GiB ({s['memory_kind']})   time {s['seconds']:.0f} s",
        *_heldout_lines(s.get("heldout")),
        f"report          {run_dir / 'report.html'}",
        f"next            lorafit chat {run_dir}",
    ]
    return "\n".join(lines)


def _epochs_part(schedule: dict | None) -> str:
    if not schedule:
        return ""
    return (
        f" ({schedule['epochs']:,.1f} epochs of {schedule['samples']:,} samples, "
        f"{schedule['samples_per_step']:,} per step)"
    )


def _heldout_lines(heldout: dict | None) -> list[str]:
    if not heldout:
        return []
    facts = heldout.get("keyfacts") or {}
    tuned, base = facts.get("tuned"), facts.get("base")
    if tuned:
        base_part = f" (base model {base['right']}/{base['total']})" if base else ""
        return [
            f"held-out        key fact right in {tuned['right']}/{tuned['total']} validation answers{base_part}; "
            "answers in report.html"
        ]
    return [f"held-out        {heldout['answered']} validation questions answered before and after: see report.html"]


def _preference_part(s: dict) -> str:
    accuracy = (s.get("preference") or {}).get("eval_preference_accuracy")
    return f"   eval preference accuracy {accuracy:.1%}" if accuracy is not None else ""
