"""Evaluation beyond the loss: the same prompts answered before training (adapter off) and after.

Validation loss and perplexity come from the Trainer's own evaluation (see train.py); this module writes
`generations.json`, which the report shows side by side.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from lorafit.rundir import write_json

GENERATIONS = "generations.json"


def generate_answers(model, tokenizer, prompts: list[str], template: str, max_new_tokens: int,
                     system_prompt: str | None = None, batch_size: int = 8) -> list[str]:
    """Greedy answers in the training chat format, stopped at the end-of-turn token."""
    import torch

    from lorafit.data.templates import end_of_turn_ids, render_prompt

    if not prompts:
        return []
    was_training = model.training
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end flush right
    stop = end_of_turn_ids(tokenizer, template)
    device = next(p for p in model.parameters()).device
    answers: list[str] = []
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            texts = [render_prompt(tokenizer, _messages(p, system_prompt), template) for p in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def _messages(prompt: str | list[dict], system_prompt: str | None) -> list[dict]:
    """A prompt string as one user turn, or a conversation as is; the system prompt added when it has none."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not system_prompt or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def base_answers(peft_model, tokenizer, prompts: list[str], template: str, max_new_tokens: int,
                 system_prompt: str | None = None) -> list[str]:
    """The base model's answers: the same weights with the adapter switched off."""
    context = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else nullcontext()
    with context:
        return generate_answers(peft_model, tokenizer, prompts, template, max_new_tokens, system_prompt)


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
    write_json(Path(run_dir) / GENERATIONS, [{"prompt": p, "before": b, "after": None} for p, b in zip(prompts, before)])


def write_after(run_dir: Path, prompts: list[str], after: list[str]) -> list[dict]:
    """Add the tuned answers next to the stored base answers (kept across a resume)."""
    before = {row.get("prompt"): row.get("before") for row in read_generations(run_dir)}
    rows = [{"prompt": p, "before": before.get(p), "after": a} for p, a in zip(prompts, after)]
    write_json(Path(run_dir) / GENERATIONS, rows)
    return rows
