"""Writes the shipped evaluation corpora (deterministic; run from the repository root):

    python data/eval/make_eval.py

plays.jsonl  the first 40,000 characters of "The Life of King Henry V" from data/corpus/shakespeare.jsonl:
             the play the quickstart holds out of pretraining (document 11 of 15 with seed 1234)
code.jsonl   Python source: textwrap.py and heapq.py of CPython 3.11 (PSF license), one document each
math.jsonl   arithmetic questions and answers in the style of DeepMind Mathematics, drawn with seed 0
"""

import json
import random
import textwrap
import heapq
from pathlib import Path

HERE = Path(__file__).parent


def write(name: str, texts: list[str]) -> None:
    with open(HERE / name, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)


def math_texts(count: int = 40, per_document: int = 40) -> list[str]:
    rng = random.Random(0)
    documents = []
    for _ in range(count):
        lines = []
        for _ in range(per_document):
            a, b = rng.randint(2, 999), rng.randint(2, 99)
            op = rng.choice("+-*")
            value = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"Question: What is {a} {op} {b}?\nAnswer: {value}")
        documents.append("\n\n".join(lines))
    return documents


def main():
    plays = (HERE.parent / "corpus/shakespeare.jsonl").read_text().splitlines()
    write("plays.jsonl", [json.loads(plays[11])["text"][:40_000]])
    write("code.jsonl", [Path(m.__file__).read_text() for m in (textwrap, heapq)])
    write("math.jsonl", math_texts())


if __name__ == "__main__":
    main()
