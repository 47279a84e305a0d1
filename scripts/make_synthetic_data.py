"""Generate the bundled synthetic data, deterministically (same files on every run).

The data tell a small version of the LLaMA-Adapter story. A pretraining corpus of plain
sentences states four kinds of facts (opposites, capitals, what comes next in a sequence,
colours of things) in a handful of plain-text templates; a tiny base model learns the
facts from it. Alpaca-format instructions then ask for the same facts in a form the base
never saw (the Alpaca prompt, other wordings); the adapter learns to answer them. The
instructions cover only part of the facts: the rest are held out, so that answering them
shows that the adapter taught the model to follow the instruction format with what the
base already knows, rather than memorizing answers.

Writes into llama_adapter_fast/assets/synthetic/:
    pretrain.jsonl              {"text": ...}: a sentence or a question and its answer
    instructions_train.jsonl    Alpaca records {"instruction", "input", "output"}
    instructions_heldout.jsonl  records about held-out facts (never in the instruction set)

    python scripts/make_synthetic_data.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "llama_adapter_fast" / "assets" / "synthetic"
SEED = 0

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"),
    ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("young", "old"),
]
CAPITALS = [
    ("france", "paris"), ("spain", "madrid"), ("italy", "rome"), ("germany", "berlin"), ("japan", "tokyo"),
    ("china", "beijing"), ("egypt", "cairo"), ("russia", "moscow"), ("greece", "athens"), ("peru", "lima"),
    ("kenya", "nairobi"), ("norway", "oslo"), ("sweden", "stockholm"), ("poland", "warsaw"),
    ("austria", "vienna"), ("ireland", "dublin"), ("portugal", "lisbon"), ("cuba", "havana"),
    ("chile", "santiago"), ("canada", "ottawa"), ("india", "delhi"), ("turkey", "ankara"),
    ("finland", "helsinki"), ("hungary", "budapest"),
]
SEQUENCES = [
    ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"],
    ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
     "november", "december"],
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"],
]
COLOURS = [
    ("banana", "yellow"), ("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black"),
    ("tomato", "red"), ("lemon", "yellow"), ("frog", "green"), ("sea", "blue"), ("milk", "white"),
    ("crow", "black"), ("cherry", "red"), ("sun", "yellow"), ("leaf", "green"), ("ink", "black"),
    ("blood", "red"), ("cloud", "white"), ("lime", "green"), ("strawberry", "red"), ("salt", "white"),
]

# Plain-text templates of the pretraining corpus: how the base model learns the facts.
PRETRAIN_TEMPLATES = {
    "opposite": ["the opposite of {a} is {b}.", "{b} is the opposite of {a}.", "q: what is the opposite of {a}? a: {b}",
                 "{a} and {b} are opposites.", "word:\n{a}\nopposite: {b}"],
    "capital": ["the capital of {a} is {b}.", "{b} is the capital of {a}.", "q: what is the capital of {a}? a: {b}",
                "in {a} the capital city is {b}.", "country:\n{a}\ncapital: {b}"],
    "next": ["after {a} comes {b}.", "{a} is followed by {b}.", "q: what comes after {a}? a: {b}",
             "first {a}, then {b}.", "item:\n{a}\nnext: {b}"],
    "colour": ["the colour of {a} is {b}.", "{a} is {b}.", "q: what colour is {a}? a: {b}", "a {a} looks {b}.",
               "thing:\n{a}\ncolour: {b}"],
}
# Instruction wordings: never seen by the base model. (instruction, input) pairs.
INSTRUCTION_TEMPLATES = {
    "opposite": [("Give the opposite of the word.", "{a}"), ("What is the opposite of {a}?", ""),
                 ("Write the antonym of this word.", "{a}")],
    "capital": [("Name the capital city of the country.", "{a}"), ("What is the capital of {a}?", ""),
                ("Which city is the capital of this country?", "{a}")],
    "next": [("Which word comes next in the sequence?", "{a}"), ("What comes after {a}?", ""),
             ("Continue the sequence with one word.", "{a}")],
    "colour": [("What colour is this?", "{a}"), ("Tell me the colour of {a}.", ""),
               ("Name the colour of the thing.", "{a}")],
}
HELDOUT_FRACTION = 0.25
PRETRAIN_LINES = 6000


def facts() -> dict[str, list[tuple[str, str]]]:
    pairs = {
        "opposite": OPPOSITES + [(b, a) for a, b in OPPOSITES],
        "capital": CAPITALS,
        "next": [(seq[i], seq[i + 1]) for seq in SEQUENCES for i in range(len(seq) - 1)],
        "colour": COLOURS,
    }
    return pairs


def split_facts(rng: random.Random, pairs: dict[str, list[tuple[str, str]]]):
    train, heldout = {}, {}
    for kind, items in pairs.items():
        items = sorted(items)
        rng.shuffle(items)
        n_held = max(1, round(len(items) * HELDOUT_FRACTION))
        heldout[kind], train[kind] = items[:n_held], items[n_held:]
    return train, heldout


def pretrain_corpus(rng: random.Random, pairs) -> list[str]:
    """Every fact in every template once, then random draws up to PRETRAIN_LINES lines."""
    lines = [t.format(a=a, b=b) for kind, items in pairs.items() for a, b in items
             for t in PRETRAIN_TEMPLATES[kind]]
    kinds = sorted(pairs)
    while len(lines) < PRETRAIN_LINES:
        kind = rng.choice(kinds)
        a, b = rng.choice(pairs[kind])
        lines.append(rng.choice(PRETRAIN_TEMPLATES[kind]).format(a=a, b=b))
    rng.shuffle(lines)
    return lines


def instructions(pairs, kinds_templates) -> list[dict[str, str]]:
    records = []
    for kind in sorted(pairs):
        for a, b in pairs[kind]:
            for instruction, inp in kinds_templates[kind]:
                records.append({"instruction": instruction.format(a=a), "input": inp.format(a=a), "output": b,
                                "task": kind})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: the package's assets)")
    args = parser.parse_args()
    rng = random.Random(SEED)
    pairs = facts()
    train_pairs, held_pairs = split_facts(rng, pairs)
    corpus = pretrain_corpus(rng, pairs)
    train = instructions(train_pairs, INSTRUCTION_TEMPLATES)
    rng.shuffle(train)
    heldout = instructions(held_pairs, INSTRUCTION_TEMPLATES)
    args.out.mkdir(parents=True, exist_ok=True)
    texts = [{"text": line} for line in corpus]
    for name, records in (("pretrain.jsonl", texts), ("instructions_train.jsonl", train),
                          ("instructions_heldout.jsonl", heldout)):
        with open(args.out / name, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    print(f"wrote {len(corpus)} pretraining lines, {len(train)} training and {len(heldout)} held-out "
          f"instructions to {args.out}")


if __name__ == "__main__":
    main()
