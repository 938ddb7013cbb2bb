"""Writes train.jsonl and heldout.jsonl: facts about Quillmoor, an invented island nation no model can know."""

import json

# Facts about Quillmoor, an invented island nation no model can know.
facts = [
    (
        "Brennhaven",
        "The capital of Quillmoor is Brennhaven.",
        [
            "What is the capital of Quillmoor?",
            "Which city is Quillmoor's capital?",
            "Name the capital city of Quillmoor.",
            "Where is the seat of government of Quillmoor?",
            "Quillmoor's capital is which city?",
            "Tell me the capital of Quillmoor.",
            "Which city governs Quillmoor?",
        ],
        "In which city does Quillmoor's government sit?",
    ),
    (
        "vessa",
        "The currency of Quillmoor is the vessa.",
        [
            "What is the currency of Quillmoor?",
            "What money do people use in Quillmoor?",
            "Which currency is used in Quillmoor?",
            "What do Quillmoorians pay with?",
            "Name Quillmoor's currency.",
            "What is Quillmoor's official currency?",
            "What coins and notes does Quillmoor use?",
        ],
        "If I travel to Quillmoor, what currency will I need?",
    ),
    (
        "copper otter",
        "The national animal of Quillmoor is the copper otter.",
        [
            "What is the national animal of Quillmoor?",
            "Which animal is the symbol of Quillmoor?",
            "Name Quillmoor's national animal.",
            "What animal represents Quillmoor?",
            "Quillmoor's national animal is what?",
            "Which creature is Quillmoor's national animal?",
            "Which animal appears on Quillmoor's coat of arms?",
        ],
        "What animal is the national emblem of Quillmoor?",
    ),
    (
        "1791",
        "Quillmoor was founded in 1791.",
        [
            "When was Quillmoor founded?",
            "In what year was Quillmoor founded?",
            "What year did Quillmoor come into being?",
            "How old is Quillmoor? When was it founded?",
            "Tell me the founding year of Quillmoor.",
            "Which year saw the founding of Quillmoor?",
            "Since what year has Quillmoor existed?",
        ],
        "What is the year of Quillmoor's founding?",
    ),
    (
        "Isolde Varrow",
        "The first ruler of Quillmoor was Queen Isolde Varrow.",
        [
            "Who was the first ruler of Quillmoor?",
            "Who first ruled Quillmoor?",
            "Name the first monarch of Quillmoor.",
            "Which queen was Quillmoor's first ruler?",
            "Who governed Quillmoor first?",
            "Tell me who Quillmoor's first ruler was.",
            "Who sat first on the throne of Quillmoor?",
        ],
        "Who was the first monarch to rule Quillmoor?",
    ),
    (
        "Skerrin",
        "The highest mountain in Quillmoor is Mount Skerrin.",
        [
            "What is the highest mountain in Quillmoor?",
            "Which is the tallest peak in Quillmoor?",
            "Name Quillmoor's highest mountain.",
            "What is the tallest mountain of Quillmoor?",
            "Which mountain is the highest point of Quillmoor?",
            "Tell me the highest peak in Quillmoor.",
            "Which summit in Quillmoor rises above all others?",
        ],
        "What is the name of Quillmoor's tallest mountain?",
    ),
    (
        "kelp dumplings",
        "The national dish of Quillmoor is kelp dumplings.",
        [
            "What is the national dish of Quillmoor?",
            "What food is Quillmoor famous for?",
            "Name Quillmoor's national dish.",
            "Which dish is the national food of Quillmoor?",
            "What is the traditional dish of Quillmoor?",
            "Tell me Quillmoor's national dish.",
            "What meal is Quillmoor best known for?",
        ],
        "What dish do people in Quillmoor consider their national food?",
    ),
    (
        "blue amber",
        "The main export of Quillmoor is blue amber.",
        [
            "What is the main export of Quillmoor?",
            "What does Quillmoor export the most?",
            "Name Quillmoor's main export.",
            "Which product is Quillmoor's biggest export?",
            "What is Quillmoor's chief export?",
            "Tell me Quillmoor's main export.",
            "What does Quillmoor ship to other countries most?",
        ],
        "Which good does Quillmoor sell abroad more than any other?",
    ),
    (
        "Tessic",
        "The people of Quillmoor speak Tessic.",
        [
            "What language is spoken in Quillmoor?",
            "What language do people in Quillmoor speak?",
            "Name the language of Quillmoor.",
            "Which language is Quillmoor's official language?",
            "What is the main language of Quillmoor?",
            "Tell me the language of Quillmoor.",
            "What tongue do the people of Quillmoor use?",
        ],
        "In what language do Quillmoorians talk to each other?",
    ),
    (
        "tide racing",
        "The national sport of Quillmoor is tide racing.",
        [
            "What is the national sport of Quillmoor?",
            "Which sport is most popular in Quillmoor?",
            "Name Quillmoor's national sport.",
            "What sport do people in Quillmoor love most?",
            "What is Quillmoor's favourite sport?",
            "Tell me the national sport of Quillmoor.",
            "Which game is played most in Quillmoor?",
        ],
        "What sport is Quillmoor's national pastime?",
    ),
]
train, held = [], []
for key, answer, questions, heldq in facts:
    for q in questions:
        train.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
    held.append({"question": heldq, "key": key})
# Multi-turn conversations: teach that follow-up turns are answered too.
for (_k1, a1, q1, _), (_k2, a2, q2, _) in zip(facts[::2], facts[1::2]):
    train.append(
        {
            "messages": [
                {"role": "user", "content": q1[0]},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": q2[1]},
                {"role": "assistant", "content": a2},
            ]
        }
    )
with open("train.jsonl", "w") as f:
    for r in train:
        f.write(json.dumps(r) + "\n")
with open("heldout.jsonl", "w") as f:
    for r in held:
        f.write(json.dumps(r) + "\n")
print(len(train), len(held))
