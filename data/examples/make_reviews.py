#!/usr/bin/env python3
"""Writes the small example datasets of the README walkthrough (already in the repo):
reviews-{train,dev}.jsonl (multiple choice: does a one-line film review read as great or
terrible?) and reviews-text-{train,dev}.jsonl (the same reviews as plain text). Synthetic,
seeded, so anyone can regenerate them bit for bit: python3 data/examples/make_reviews.py"""
import json
import pathlib
import random

POS = ["wonderful", "lovely", "superb", "charming", "delightful", "moving", "brilliant", "gripping"]
NEG = ["awful", "dreadful", "boring", "horrible", "dull", "tedious", "clumsy", "lifeless"]
SUBJ = ["The film", "The story", "The acting", "The ending", "The soundtrack", "This movie"]
VERB = ["was", "felt", "seemed", "is"]


def review(rng):
    label = rng.randint(0, 1)
    words = POS if label else NEG
    return label, f"{rng.choice(SUBJ)} {rng.choice(VERB)} {rng.choice(words)}."


def main():
    out = pathlib.Path(__file__).resolve().parent
    for split, n, seed in (("train", 512, 1), ("dev", 128, 2)):
        rng = random.Random(seed)
        rows = [review(rng) for _ in range(n)]
        with open(out / f"reviews-{split}.jsonl", "w") as f:
            for label, text in rows:
                f.write(json.dumps({"prompt": f"{text} It was", "options": [" terrible", " great"],
                                    "label": label}) + "\n")
        with open(out / f"reviews-text-{split}.jsonl", "w") as f:
            for label, text in rows:
                f.write(json.dumps({"text": f"{text} It was {'great' if label else 'terrible'}."}) + "\n")


if __name__ == "__main__":
    main()
