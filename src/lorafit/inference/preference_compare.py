"""`lorafit compare RUN --data PAIRS`: held-out preference accuracy of the base and the tuned model.

A model prefers the chosen answer of a pair when it gives it a higher log-probability (summed over the answer's
tokens, end-of-turn included, after the same prompt) than the rejected one. The pairs are encoded exactly as
training encodes them (the run's template, system prompt and max_length), and the base is the run's own base:
the adapter switched off (for a run continued from an SFT adapter, that is the bare base, not the SFT model).
"""

from __future__ import annotations

import json
from contextlib import nullcontext

from lorafit.config import DataSource
from lorafit.data.preference_data import prepare_preferences


def answer_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt), summed over the answer's tokens."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt + answer], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    picked = torch.log_softmax(logits, -1).gather(1, torch.tensor(answer, device=device)[:, None])
    return float(picked.sum())


def preference_scores(model, pairs) -> dict:
    """Accuracy (share of pairs where chosen out-scores rejected) and the mean log-probability margin."""
    margins = [
        answer_logprob(model, p["prompt_ids"], p["chosen_ids"])
        - answer_logprob(model, p["prompt_ids"], p["rejected_ids"])
        for p in pairs
    ]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
    }


def compare_preferences(run_dir: str, data_file: str, cfg, as_json: bool = False, console=None) -> dict:
    from lorafit.inference.generate import load_for_inference

    loaded = load_for_inference(run_dir, merge=False)  # the adapter stays separate so it can be switched off
    model = loaded.model
    data_cfg = cfg.data.model_copy(
        update={"train": [DataSource(path=data_file)], "validation": [], "val_fraction": 0.0}
    )
    pairs = prepare_preferences(data_cfg, loaded.tokenizer, seed=0).train
    with (model.disable_adapter if hasattr(model, "disable_adapter") else nullcontext)():
        base = preference_scores(model, pairs)
    tuned = preference_scores(model, pairs)
    result = {"run": str(run_dir), "data": str(data_file), "pairs": len(pairs), "base": base, "tuned": tuned}
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    from rich.console import Console

    (console or Console()).print(
        f"preference accuracy on {len(pairs)} pairs of {data_file}: base {base['accuracy']:.1%} "
        f"(mean log-prob margin {base['mean_margin']:+.2f}) -> tuned {tuned['accuracy']:.1%} "
        f"({tuned['mean_margin']:+.2f})",
        markup=False,
    )
    return result
