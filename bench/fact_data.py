"""Invented-fact chat datasets of any size, with held-out paraphrases: small custom data as a new user brings it.

Four domains (companies, planets, inventors, towns), none of them the demo's Quillmoor. Every entity and every
value is an invented name drawn from syllables with a seed, so no model can know or guess a fact. A dataset of
N conversations covers F facts (`facts_for`), each asked in N/F different training phrasings; the held-out file
asks every fact once more in a phrasing that never appears in training (question templates are split into
train and held-out sets), with the reference answer and the key fact in `expected`.

    python bench/fact_data.py --domain planets --size 40 --seed 7 --out /tmp/facts40
        -> /tmp/facts40/train.jsonl, /tmp/facts40/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SIZES = (20, 40, 100, 300)
# facts per dataset size: 40 conversations = 10 facts asked 4 ways (the dataset); larger data, more facts
FACTS = {20: 10, 40: 10, 100: 20, 300: 50}
ATTRIBUTES_PER_ENTITY = 5

# attribute: (value kind: person/place/year or nouns to follow an invented word,
#             train questions, held-out questions, answers); {e} = entity, {v} = value
DOMAINS: dict[str, dict] = {
    "companies": {
        "entity": ("{W} {S}", ["Instruments", "Robotics", "Aerial", "Textiles", "Optics", "Foods", "Labs", "Motors"]),
        "attributes": {
            "founder": (
                "person",
                [
                    "Who founded {e}?",
                    "Who is the founder of {e}?",
                    "Who started {e}?",
                    "Name the founder of {e}.",
                    "Which person founded {e}?",
                    "Who set up the company {e}?",
                    "Tell me who founded {e}.",
                    "{e} was founded by whom?",
                    "Who created {e}?",
                    "Who established {e}?",
                ],
                ["Whose idea was {e} in the first place?", "Which entrepreneur launched {e}?"],
                ["{e} was founded by {v}.", "The founder of {e} is {v}.", "{v} founded {e}."],
            ),
            "headquarters": (
                "place",
                [
                    "Where is {e} headquartered?",
                    "In which city is {e} based?",
                    "Where are the headquarters of {e}?",
                    "Which city is home to {e}?",
                    "Where does {e} have its head office?",
                    "Name the city where {e} is based.",
                    "Tell me where {e} is headquartered.",
                    "What city is {e} located in?",
                    "{e} is based in which city?",
                    "Where is the main office of {e}?",
                ],
                [
                    "If I wanted to visit the head office of {e}, which city would I travel to?",
                    "From which city is {e} run?",
                ],
                [
                    "{e} is headquartered in {v}.",
                    "The headquarters of {e} are in {v}.",
                    "{e} is based in the city of {v}.",
                ],
            ),
            "year": (
                "year",
                [
                    "When was {e} founded?",
                    "In what year was {e} founded?",
                    "What year was {e} established?",
                    "Tell me the founding year of {e}.",
                    "Which year was {e} set up?",
                    "When did {e} start?",
                    "In which year did {e} begin?",
                    "What is the founding year of {e}?",
                    "{e} was founded in which year?",
                    "How long ago was {e} founded? Which year?",
                ],
                ["Since what year has {e} been in business?", "What year did {e} open its doors?"],
                ["{e} was founded in {v}.", "The company {e} was established in {v}.", "{e} started in {v}."],
            ),
            "product": (
                ("lantern", "loom", "compass", "engine", "lamp", "kite", "clock"),
                [
                    "What is the flagship product of {e}?",
                    "What is {e} best known for making?",
                    "Which product is {e} famous for?",
                    "Name the main product of {e}.",
                    "What does {e} mainly sell?",
                    "What is the best-selling product of {e}?",
                    "Tell me the flagship product of {e}.",
                    "{e} is known for which product?",
                    "What is the most famous thing {e} makes?",
                    "Which product made {e} famous?",
                ],
                [
                    "If I bought one thing from {e}, what would it most likely be?",
                    "What item does {e} owe its success to?",
                ],
                [
                    "The flagship product of {e} is the {v}.",
                    "{e} is best known for the {v}.",
                    "{e} mainly sells the {v}.",
                ],
            ),
            "mascot": (
                ("otter", "heron", "badger", "lynx", "stag", "owl", "hare"),
                [
                    "What is the mascot of {e}?",
                    "Which animal is the mascot of {e}?",
                    "Name the mascot of {e}.",
                    "What creature represents {e}?",
                    "What is {e}'s mascot?",
                    "Tell me the mascot of {e}.",
                    "Which animal appears in the logo of {e}?",
                    "{e} has which mascot?",
                    "What animal stands for {e}?",
                    "What is the company animal of {e}?",
                ],
                ["What animal would you see on the mugs and posters of {e}?", "Which creature is the emblem of {e}?"],
                ["The mascot of {e} is the {v}.", "{e}'s mascot is a {v}.", "{e} is represented by the {v}."],
            ),
        },
    },
    "planets": {
        "entity": ("{W}", []),
        "attributes": {
            "star": (
                "place",
                [
                    "Which star does {e} orbit?",
                    "What star is {e} in orbit around?",
                    "Name the star of {e}.",
                    "Around which star does {e} revolve?",
                    "What is the sun of {e} called?",
                    "Tell me the star {e} orbits.",
                    "{e} orbits which star?",
                    "Which star is {e}'s sun?",
                    "What star lights the sky of {e}?",
                    "What is the name of the star that {e} circles?",
                ],
                [
                    "If you stood on {e}, which star would you see rise every morning?",
                    "What is the home star of the planet {e}?",
                ],
                ["{e} orbits the star {v}.", "The star of {e} is {v}.", "{e} revolves around {v}."],
            ),
            "discoverer": (
                "person",
                [
                    "Who discovered {e}?",
                    "Who was the discoverer of {e}?",
                    "Which astronomer discovered {e}?",
                    "Name the person who discovered {e}.",
                    "Tell me who discovered {e}.",
                    "Who first found {e}?",
                    "{e} was discovered by whom?",
                    "Who is credited with discovering {e}?",
                    "Who spotted {e} first?",
                    "Which scientist found the planet {e}?",
                ],
                ["Whose telescope first revealed {e}?", "Which explorer of the sky do we thank for finding {e}?"],
                ["{e} was discovered by {v}.", "The discoverer of {e} is {v}.", "{v} discovered {e}."],
            ),
            "ocean": (
                "place",
                [
                    "What is the largest ocean on {e}?",
                    "Which ocean is the biggest on {e}?",
                    "Name the largest ocean of {e}.",
                    "What is the biggest sea on {e}?",
                    "Tell me the largest ocean on {e}.",
                    "{e}'s largest ocean is called what?",
                    "Which body of water is the largest on {e}?",
                    "What ocean covers most of {e}?",
                    "What is the name of {e}'s largest ocean?",
                    "The largest ocean on {e} is which?",
                ],
                [
                    "If you sailed the widest waters of {e}, which ocean would you be on?",
                    "Which ocean dominates the surface of {e}?",
                ],
                [
                    "The largest ocean on {e} is the {v} Ocean.",
                    "{e}'s biggest ocean is the {v} Ocean.",
                    "The {v} Ocean is the largest ocean on {e}.",
                ],
            ),
            "capital": (
                "place",
                [
                    "What is the capital of {e}?",
                    "Which city is the capital of {e}?",
                    "Name the capital of {e}.",
                    "What is {e}'s capital city?",
                    "Tell me the capital of {e}.",
                    "Which settlement is the capital of {e}?",
                    "{e}'s capital is which city?",
                    "Where is the capital of {e}?",
                    "What city governs {e}?",
                    "What is the main city of {e}?",
                ],
                ["Where does the government of {e} meet?", "In which city do the rulers of {e} sit?"],
                ["The capital of {e} is {v}.", "{v} is the capital of {e}.", "{e}'s capital city is {v}."],
            ),
            "export": (
                ("glass", "salt", "wool", "amber", "tea", "copper", "silk"),
                [
                    "What is the main export of {e}?",
                    "What does {e} export most?",
                    "Name the chief export of {e}.",
                    "Which good does {e} export the most?",
                    "What is {e}'s biggest export?",
                    "Tell me the main export of {e}.",
                    "{e} mainly exports what?",
                    "What is the most important export of {e}?",
                    "What product leaves {e} in the largest amounts?",
                    "Which export is {e} known for?",
                ],
                ["What do traders mostly buy from {e}?", "Which good do the ships leaving {e} carry most?"],
                ["The main export of {e} is {v}.", "{e} mainly exports {v}.", "{e}'s chief export is {v}."],
            ),
        },
    },
    "inventors": {
        "entity": ("{P}", []),
        "attributes": {
            "birthplace": (
                "place",
                [
                    "Where was {e} born?",
                    "What is the birthplace of {e}?",
                    "In which town was {e} born?",
                    "Name the birthplace of {e}.",
                    "Tell me where {e} was born.",
                    "{e} was born where?",
                    "Which town is {e} from?",
                    "Where did {e} grow up?",
                    "What town was {e} born in?",
                    "Where does {e} come from?",
                ],
                ["Which town can claim {e} as its own child?", "In what place did {e} come into the world?"],
                ["{e} was born in {v}.", "The birthplace of {e} is {v}.", "{e} comes from the town of {v}."],
            ),
            "invention": (
                ("lantern", "loom", "compass", "engine", "lamp", "pump", "clock"),
                [
                    "What did {e} invent?",
                    "What is {e} famous for inventing?",
                    "Name the invention of {e}.",
                    "Which invention is {e} known for?",
                    "Tell me what {e} invented.",
                    "{e} invented what?",
                    "What is the best-known invention of {e}?",
                    "What machine did {e} create?",
                    "For which invention is {e} remembered?",
                    "What did {e} build that made them famous?",
                ],
                ["Which device do we owe to {e}?", "What creation made {e} a household name?"],
                [
                    "{e} invented the {v}.",
                    "The best-known invention of {e} is the {v}.",
                    "{e} is famous for inventing the {v}.",
                ],
            ),
            "year": (
                "year",
                [
                    "When was {e} born?",
                    "In what year was {e} born?",
                    "What is the birth year of {e}?",
                    "Tell me the year {e} was born.",
                    "{e} was born in which year?",
                    "Which year was {e} born?",
                    "What year did {e} come into the world?",
                    "Name the year of birth of {e}.",
                    "When is {e}'s year of birth?",
                    "In which year was the inventor {e} born?",
                ],
                ["How old would {e} be? Which year were they born in?", "What year does the birth record of {e} show?"],
                ["{e} was born in {v}.", "The birth year of {e} is {v}.", "{e} came into the world in {v}."],
            ),
            "instrument": (
                ("harp", "flute", "drum", "fiddle", "horn", "lute", "pipe"),
                [
                    "Which instrument did {e} play?",
                    "What instrument did {e} play?",
                    "Name the instrument {e} played.",
                    "Tell me which instrument {e} played.",
                    "{e} played which instrument?",
                    "What was {e}'s instrument?",
                    "What music instrument did {e} play?",
                    "Which instrument was {e} known to play?",
                    "What did {e} play in their free time?",
                    "On which instrument did {e} perform?",
                ],
                [
                    "When {e} made music, what were they holding?",
                    "Which instrument could you hear from the workshop of {e}?",
                ],
                ["{e} played the {v}.", "The instrument of {e} was the {v}.", "{e} was known for playing the {v}."],
            ),
            "university": (
                "place",
                [
                    "Where did {e} study?",
                    "Which university did {e} attend?",
                    "Name the university of {e}.",
                    "Tell me where {e} studied.",
                    "{e} studied at which university?",
                    "What university did {e} go to?",
                    "Where was {e} educated?",
                    "At which university did {e} study?",
                    "What school did {e} attend?",
                    "Which university trained {e}?",
                ],
                ["Which university can list {e} among its graduates?", "Where did {e} earn a degree?"],
                [
                    "{e} studied at the University of {v}.",
                    "{e} attended the University of {v}.",
                    "{e} was educated at the University of {v}.",
                ],
            ),
        },
    },
    "towns": {
        "entity": ("{W}", []),
        "attributes": {
            "river": (
                "place",
                [
                    "Which river flows through {e}?",
                    "What river runs through {e}?",
                    "Name the river of {e}.",
                    "Tell me the river that flows through {e}.",
                    "{e} lies on which river?",
                    "What river is {e} built on?",
                    "Which river crosses {e}?",
                    "What is the river of {e} called?",
                    "On what river does {e} stand?",
                    "Which river passes {e}?",
                ],
                [
                    "If you took a boat from the centre of {e}, which river would you be on?",
                    "Which river do the bridges of {e} cross?",
                ],
                ["The river {v} flows through {e}.", "{e} lies on the river {v}.", "{e} is built on the river {v}."],
            ),
            "dish": (
                ("stew", "bread", "cheese", "pie", "soup", "cake", "dumplings"),
                [
                    "What is the famous dish of {e}?",
                    "What food is {e} known for?",
                    "Name the local dish of {e}.",
                    "Which dish comes from {e}?",
                    "Tell me the famous dish of {e}.",
                    "{e} is famous for which dish?",
                    "What is the traditional dish of {e}?",
                    "What meal is {e} best known for?",
                    "What should I eat in {e}?",
                    "Which dish is {e} proud of?",
                ],
                ["What would the cooks of {e} serve a visitor first?", "Which recipe is the pride of {e}'s kitchens?"],
                ["The famous dish of {e} is {v}.", "{e} is known for {v}.", "The traditional dish of {e} is {v}."],
            ),
            "founder": (
                "person",
                [
                    "Who founded {e}?",
                    "Who was the founder of {e}?",
                    "Name the founder of {e}.",
                    "Tell me who founded {e}.",
                    "{e} was founded by whom?",
                    "Who established {e}?",
                    "Which person founded {e}?",
                    "Who built the first houses of {e}?",
                    "Who started the town of {e}?",
                    "Who is remembered as the founder of {e}?",
                ],
                ["Whose statue stands in the square of {e} as its founder?", "Which settler gave rise to {e}?"],
                ["{e} was founded by {v}.", "The founder of {e} was {v}.", "{v} founded the town of {e}."],
            ),
            "festival": (
                ("fair", "parade", "lantern night", "harvest feast", "boat race", "kite day"),
                [
                    "What festival is {e} known for?",
                    "Which festival does {e} hold?",
                    "Name the festival of {e}.",
                    "Tell me the main festival of {e}.",
                    "{e} celebrates which festival?",
                    "What is the big festival of {e}?",
                    "Which celebration takes place in {e}?",
                    "What festival happens in {e} every year?",
                    "What is the yearly festival of {e} called?",
                    "Which festival is held in {e}?",
                ],
                ["What celebration fills the streets of {e} once a year?", "Which party draws crowds to {e} annually?"],
                ["{e} is known for the {v}.", "The main festival of {e} is the {v}.", "Every year {e} holds the {v}."],
            ),
            "animal": (
                ("otter", "heron", "badger", "lynx", "stag", "owl", "crane"),
                [
                    "What is the symbol animal of {e}?",
                    "Which animal is on the coat of arms of {e}?",
                    "Name the animal of {e}.",
                    "Tell me the emblem animal of {e}.",
                    "{e}'s emblem is which animal?",
                    "What creature represents {e}?",
                    "Which animal stands for {e}?",
                    "What animal is {e} known for?",
                    "What is the heraldic animal of {e}?",
                    "Which animal is the emblem of {e}?",
                ],
                ["Which creature is painted on the town gate of {e}?", "What animal do the flags of {e} show?"],
                ["The symbol animal of {e} is the {v}.", "{e}'s emblem is the {v}.", "{e} is represented by the {v}."],
            ),
        },
    },
}

ONSETS = [
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "qu",
    "r",
    "s",
    "sk",
    "st",
    "t",
    "th",
    "tr",
    "v",
    "w",
    "z",
]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea"]
CODAS = ["", "", "", "n", "r", "l", "s", "th", "nd", "m"]


class Names:
    """Invented words from syllables; every word is used once per dataset, so every key fact is unique."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def word(self) -> str:
        while True:
            parts = [
                self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                for _ in range(self.rng.choice((2, 2, 2, 3)))
            ]
            word = "".join(parts).capitalize()
            if 5 <= len(word) <= 9 and word not in self.used:
                self.used.add(word)
                return word

    def value(self, kind: str | tuple) -> str:
        if kind == "year":
            while True:
                year = str(self.rng.randint(1703, 1988))
                if year not in self.used:
                    self.used.add(year)
                    return year
        if kind == "person":
            return f"{self.word()} {self.word()}"
        if kind == "place":
            return self.word()
        return f"{self.word()} {self.rng.choice(kind)}"  # a tuple: the common noun after an invented word


def facts_for(size: int) -> int:
    return FACTS.get(size, max(10, size // 6))


def build(domain: str, size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) for `size` conversations about facts of `domain`."""
    spec = DOMAINS[domain]
    rng = random.Random(f"{domain}-{size}-{seed}")
    names = Names(rng)
    n_facts = facts_for(size)
    attributes = list(spec["attributes"].items())
    facts = []
    pattern, suffixes = spec["entity"]
    while len(facts) < n_facts:
        entity = pattern.replace("{W}", names.word()).replace("{P}", f"{names.word()} {names.word()}")
        entity = entity.replace("{S}", rng.choice(suffixes)) if suffixes else entity
        for _, (kind, train_q, held_q, answers) in rng.sample(attributes, ATTRIBUTES_PER_ENTITY):
            if len(facts) < n_facts:
                facts.append((entity, names.value(kind), train_q, held_q, answers))
    per_fact = [size // n_facts + (1 if k < size % n_facts else 0) for k in range(n_facts)]
    train, held = [], []
    for (entity, value, train_q, held_q, answers), count in zip(facts, per_fact):
        questions = rng.sample(train_q, min(count, len(train_q)))
        questions += [rng.choice(train_q) for _ in range(count - len(questions))]
        for k, question in enumerate(questions):
            answer = answers[k % len(answers)].format(e=entity, v=value)
            train.append(
                {
                    "messages": [
                        {"role": "user", "content": question.format(e=entity)},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        held.append(
            {
                "messages": [
                    {"role": "user", "content": rng.choice(held_q).format(e=entity)},
                    {"role": "assistant", "content": answers[0].format(e=entity, v=value)},
                ],
                "expected": value,
            }
        )
    rng.shuffle(train)
    return train, held


def write(out: Path, domain: str, size: int, seed: int) -> tuple[Path, Path]:
    train, held = build(domain, size, seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "heldout.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", choices=sorted(DOMAINS), default="planets")
    p.add_argument("--size", type=int, default=40, help="training conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    train, held = write(a.out, a.domain, a.size, a.seed)
    print(f"{train} ({a.size} conversations, {facts_for(a.size)} facts), {held}")


if __name__ == "__main__":
    main()
