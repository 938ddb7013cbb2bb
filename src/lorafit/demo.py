"""`lorafit demo`: fine-tune the embedded SmolLM2 on examples/ and show what it learned.

Scoring rule: an answer is right when it contains the question's key fact (case-insensitive, hyphens read
as spaces). The held-out questions are paraphrases that never appear in the training data.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.config import load_config
from lorafit.errors import DataError
from lorafit.inference.generate import generate_batch, load_for_inference


def read_heldout(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"held-out file {p} does not exist.", "Run the demo from the repository root, or pass --heldout FILE."
        )
    rows = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{number}: broken JSON ({e.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("key"), str):
            raise DataError(f"{p}:{number}: each line needs string fields `question` and `key`.")
        rows.append(row)
    return rows


def is_correct(answer: str, key: str) -> bool:
    norm = lambda s: " ".join(s.lower().replace("-", " ").split())  # noqa: E731
    return norm(key) in norm(answer)


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_demo(config: str, heldout: str, overrides: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from lorafit.train.run import run_training

    console = Console()
    cfg = load_config(config, overrides)
    questions = read_heldout(heldout)
    console.print(
        f"[bold]lorafit demo[/]: {cfg.model.name} + LoRA r={cfg.lora.r} on {', '.join(s.path for s in cfg.data.train)}"
    )

    conversations = [[{"role": "user", "content": q["question"]}] for q in questions]
    base = load_for_inference(cfg.model.name)
    before = generate_batch(base, conversations, max_new_tokens=cfg.eval.max_new_tokens)
    del base

    run_dir = run_training(cfg)
    after = generate_batch(load_for_inference(str(run_dir)), conversations, max_new_tokens=cfg.eval.max_new_tokens)

    table = Table(title="Held-out questions (paraphrases never seen in training)", show_lines=True)
    table.add_column("question", ratio=2)
    table.add_column("base model", ratio=3)
    table.add_column("fine-tuned", ratio=3)
    base_right = tuned_right = 0
    results = []
    for q, b, a in zip(questions, before, after):
        b_ok, a_ok = is_correct(b, q["key"]), is_correct(a, q["key"])
        base_right += b_ok
        tuned_right += a_ok
        mark = lambda ok: "[green]✓[/]" if ok else "[red]✗[/]"  # noqa: E731
        table.add_row(q["question"], f"{mark(b_ok)} {_clip(b)}", f"{mark(a_ok)} {_clip(a)}")
        results.append(
            {
                "question": q["question"],
                "key": q["key"],
                "base": b,
                "tuned": a,
                "base_correct": b_ok,
                "tuned_correct": a_ok,
            }
        )
    console.print(table)
    n = len(questions)
    console.print(
        f"[bold]base model: {base_right}/{n} right   fine-tuned: {tuned_right}/{n} right[/]  "
        "(right = the answer contains the key fact)"
    )
    (Path(run_dir) / "demo_results.json").write_text(
        json.dumps(
            {"base_correct": base_right, "tuned_correct": tuned_right, "total": n, "answers": results}, indent=2
        ),
        encoding="utf-8",
    )
    return 0
