"""Generate examples/prefs.jsonl and examples/prefs_heldout.jsonl: preference pairs for the DPO demo.

The preferred style is one the base model has no opinion about: asked to name something, the chosen answer
names it after a metal, the rejected one after a star, in the same sentence. Held-out pairs use subjects and
gem/bird pairings the training pairs do not. The three forms lorafit reads are mixed in the training file.

    python examples/make_prefs.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The base model's own leaning between the two lists is near chance (it prefers the metal in 43% of such pairs).
METALS = ["Iron", "Copper", "Silver", "Cobalt", "Nickel", "Zinc", "Tin", "Bronze", "Brass", "Steel", "Pewter", "Chrome"]
STARS = [
    "Vega",
    "Sirius",
    "Rigel",
    "Altair",
    "Deneb",
    "Polaris",
    "Spica",
    "Antares",
    "Castor",
    "Pollux",
    "Mira",
    "Capella",
]
TRAIN_SUBJECTS = ["boat", "shop", "horse", "garden", "cat", "bakery", "band", "inn", "ferry", "lantern", "mill", "dog"]
HELDOUT_SUBJECTS = ["tavern", "sailboat", "kitten", "bookshop", "orchard", "pony"]
ASKS = ["Suggest a name for my new {s}.", "What should I call my {s}?", "Give my {s} a name, please."]
ANSWERS = ["Call it {n}.", "How about {n}?", "I would name it {n}."]


def pair(rng: random.Random, subject: str) -> tuple[str, str, str]:
    ask, answer = rng.choice(ASKS).format(s=subject), rng.choice(ANSWERS)
    return ask, answer.format(n=rng.choice(METALS)), answer.format(n=rng.choice(STARS))


def as_form(k: int, prompt: str, chosen: str, rejected: str) -> dict:
    user = {"role": "user", "content": prompt}
    if k % 3 == 0:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if k % 3 == 1:
        return {
            "conversations": [{"from": "human", "value": prompt}],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
        }
    return {
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }


def main() -> None:
    here = Path(__file__).resolve().parent
    rng = random.Random(17)
    train = [as_form(k, *pair(rng, TRAIN_SUBJECTS[k % len(TRAIN_SUBJECTS)])) for k in range(96)]
    heldout = [dict(zip(("prompt", "chosen", "rejected"), pair(rng, s))) for s in HELDOUT_SUBJECTS for _ in range(5)]
    for name, rows in (("prefs.jsonl", train), ("prefs_heldout.jsonl", heldout)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
