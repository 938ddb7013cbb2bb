"""Writes examples/tools/{tools.json,train.jsonl,heldout.jsonl}: calls to invented Quillmoor tools no model can know.

Three tools of an invented island nation. Each training row is a request and the call that answers it
(OpenAI `messages` form, `tools` on every row); a few rows go on: the tool's result, then the answer. The
held-out rows ask in phrasings never used in training, with argument combinations never seen together.
Deterministic: run it again and the files are identical.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tools"
# Bare JSON schemas (the glaive / LLaMA-Factory spelling): the shortest prompt that still describes each tool, which
# keeps CPU training to minutes.
TOOLS = [
    {
        "name": "ferry_times",
        "description": "Quillmoor ferry departures",
        "parameters": {"type": "object", "properties": {"island": {"type": "string"}, "day": {"type": "string"}}},
    },
    {
        "name": "otter_census",
        "description": "Copper otters counted in a district",
        "parameters": {"type": "object", "properties": {"district": {"type": "string"}, "year": {"type": "integer"}}},
    },
    {
        "name": "book_lantern_hall",
        "description": "Reserve a Brennhaven lantern hall",
        "parameters": {"type": "object", "properties": {"hall": {"type": "string"}, "guests": {"type": "integer"}}},
    },
]
ISLANDS = ["Tarnwick", "Osk", "Pellmoor", "Skerrin Isle", "Vantry", "Hollowmere"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DISTRICTS = ["Lunewater", "Brackfield", "Saltreach", "Dunmarch", "Perriwen"]
HALLS = ["Amber Hall", "Moth Hall", "Tide Hall", "Ember Hall"]

TRAIN_PHRASES = {
    "ferry_times": [
        "When do ferries leave for {island} on {day}?",
        "Ferry times to {island}, {day} please.",
        "I want to sail to {island} on {day}. When are the departures?",
        "Show me the {day} ferries to {island}.",
        "What ferries go to {island} on {day}?",
    ],
    "otter_census": [
        "How many copper otters were counted in {district} in {year}?",
        "Otter census for {district}, {year}.",
        "Give me the {year} otter count of {district}.",
        "What did the {year} census find for otters in {district}?",
        "Copper otters in {district} in {year}: how many?",
    ],
    "book_lantern_hall": [
        "Book {hall} for {guests} guests.",
        "Reserve {hall} for a party of {guests}.",
        "I need {hall} for {guests} people.",
        "Can you book {hall}? We are {guests}.",
        "Please reserve {hall}, {guests} guests.",
    ],
}
HELDOUT_PHRASES = {
    "ferry_times": [
        "Is there a boat to {island} on {day}? Tell me the times.",
        "Planning a {day} trip to {island} by ferry - departure times?",
    ],
    "otter_census": [
        "Look up the copper otter numbers for {district} from {year}.",
        "For {district}, what was the otter tally in {year}?",
    ],
    "book_lantern_hall": [
        "We'd like to hold a dinner at {hall} with {guests} people, please book it.",
        "Get us {hall}; there will be {guests} of us.",
    ],
}
RESULTS = {
    "ferry_times": lambda a: {"departures": ["07:40", "12:15", "18:05"]},
    "otter_census": lambda a: {"otters": 40 + len(a["district"]) * 3 + a["year"] % 17},
    "book_lantern_hall": lambda a: {"booking": f"LH-{len(a['hall']) * 97 + a['guests']}", "confirmed": True},
}
ANSWERS = {
    "ferry_times": lambda a, r: f"Ferries leave for {a['island']} on {a['day']} at " + ", ".join(r["departures"]) + ".",
    "otter_census": lambda a, r: f"{r['otters']} copper otters were counted in {a['district']} in {a['year']}.",
    "book_lantern_hall": lambda a, r: f"{a['hall']} is booked for {a['guests']} guests, reference {r['booking']}.",
}


def arguments(tool: str, rng: random.Random, k: int | None = None) -> dict:
    """Random arguments; with `k` (training rows) the place names take turns, so each one is seen in training (drawn
    at random, 12 rows left Amber Hall out, and the model called otter_census for it in some seeds)."""

    def place(names: list[str]) -> str:
        return rng.choice(names) if k is None else names[k % len(names)]

    if tool == "ferry_times":
        return {"island": place(ISLANDS), "day": rng.choice(DAYS)}
    if tool == "otter_census":
        return {"district": place(DISTRICTS), "year": rng.randint(1990, 2024)}
    return {"hall": place(HALLS), "guests": rng.randint(2, 120)}


def row(tool: str, phrase: str, args: dict, with_result: bool) -> dict:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": tool, "arguments": json.dumps(args)}}],
    }
    messages = [{"role": "user", "content": phrase.format(**args)}, call]
    if with_result:
        result = RESULTS[tool](args)
        messages += [
            {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(result)},
            {"role": "assistant", "content": ANSWERS[tool](args, result)},
        ]
    return {"messages": messages, "tools": TOOLS}


def main() -> None:
    rng = random.Random(13)
    train, seen = [], set()
    for tool, phrases in TRAIN_PHRASES.items():
        for k in range(12):
            args = arguments(tool, rng, k)
            seen.add((tool, json.dumps(args)))
            train.append(row(tool, phrases[k % len(phrases)], args, with_result=k % 6 == 0))
    rng.shuffle(train)
    heldout = []
    for k in range(10):
        tool = list(HELDOUT_PHRASES)[k % 3]
        args = arguments(tool, rng)
        while (tool, json.dumps(args)) in seen:
            args = arguments(tool, rng)
        heldout.append(row(tool, HELDOUT_PHRASES[tool][k % 2], args, with_result=False))
    OUT.mkdir(exist_ok=True)
    (OUT / "tools.json").write_text(json.dumps(TOOLS, indent=2) + "\n")
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} training rows, {len(heldout)} held-out rows written to {OUT}")


if __name__ == "__main__":
    main()
