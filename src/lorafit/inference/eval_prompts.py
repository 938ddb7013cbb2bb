"""Evaluation beyond the loss: the same prompts answered before training (adapter off) and after.

Validation loss and perplexity come from the Trainer's own evaluation (see train.py); this module writes
`generations.json`, which the report shows side by side.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from lorafit.data.templates import end_of_turn_ids
from lorafit.inference.generate import generate_answers
from lorafit.rundir import write_json

GENERATIONS = "generations.json"


def tuned_answers(
    model,
    tokenizer,
    prompts: list[str],
    template: str,
    max_new_tokens: int,
    system_prompt: str | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers of the model as it is (adapter on), in the training chat format."""

    was_training = model.training
    stop = end_of_turn_ids(tokenizer, template)
    model.eval()
    try:
        return [
            answer
            for start in range(0, len(prompts), batch_size)
            for answer in generate_answers(
                model,
                tokenizer,
                [[{"role": "user", "content": p}] for p in prompts[start : start + batch_size]],
                template,
                stop,
                max_new_tokens,
                system_prompt,
            )
        ]
    finally:
        model.train(was_training)


def base_answers(
    peft_model, tokenizer, prompts: list[str], template: str, max_new_tokens: int, system_prompt: str | None = None
) -> list[str]:
    """The base model's answers: the same weights with the adapter switched off."""
    context = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else nullcontext()
    with context:
        return tuned_answers(peft_model, tokenizer, prompts, template, max_new_tokens, system_prompt)


def read_generations(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / GENERATIONS
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return []
    return rows if isinstance(rows, list) else []


def write_before(run_dir: Path, prompts: list[str], before: list[str]) -> None:
    write_json(
        Path(run_dir) / GENERATIONS, [{"prompt": p, "before": b, "after": None} for p, b in zip(prompts, before)]
    )


def write_after(run_dir: Path, prompts: list[str], after: list[str]) -> list[dict]:
    """Add the tuned answers next to the stored base answers (kept across a resume)."""
    before = {row.get("prompt"): row.get("before") for row in read_generations(run_dir)}
    rows = [{"prompt": p, "before": before.get(p), "after": a} for p, a in zip(prompts, after)]
    write_json(Path(run_dir) / GENERATIONS, rows)
    return rows
