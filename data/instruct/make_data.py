"""Writes the shipped instruct data (deterministic; see SOURCE.md):

    python data/instruct/make_data.py  -> data/instruct/{chat,eval,preference}.jsonl

Facts written for this project: country capitals, one-digit arithmetic, exact unit conversions, word
definitions, opposites. Each kind asks its facts in several phrasings; a question is a (fact, phrasing)
combination. eval.jsonl holds combinations that chat.jsonl never contains (every fact is still taught,
in other phrasings), some after a system prompt or an earlier answered turn: the held-out test of
whether a model answers rather than recites. chat.jsonl: single- and multi-turn conversations, some with
a system prompt. preference.jsonl: training combinations; the correct answer is chosen, the rejected
one is a wrong fact, a rude refusal or an off-topic reply.
"""

import json
import random
from pathlib import Path

CONVERSATIONS, PAIRS, HELD_OUT_PER_KIND = 2000, 300, 20

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Australia", "Canberra"),
    ("Russia", "Moscow"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("Ireland", "Dublin"), ("the United Kingdom", "London"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Iran", "Tehran"), ("Cuba", "Havana"),
    ("Iceland", "Reykjavik"), ("Austria", "Vienna"),
]
UNITS = [  # (from, to, factor): 1 from = factor to
    ("kilometers", "meters", 1000), ("hours", "minutes", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("feet", "inches", 12), ("years", "months", 12),
]
WORDS = {
    "library": "a place where books are kept for people to read or borrow",
    "volcano": "a mountain with an opening through which lava and gas come out",
    "bicycle": "a vehicle with two wheels that you ride by pushing pedals",
    "thermometer": "an instrument that measures temperature",
    "orchard": "a piece of land where fruit trees are grown",
    "glacier": "a large, slowly moving mass of ice",
    "harbor": "a sheltered area of water where ships can stay safely",
    "telescope": "an instrument that makes distant objects look nearer",
    "recipe": "a set of instructions for cooking a dish",
    "island": "a piece of land surrounded by water",
    "calendar": "a chart that shows the days, weeks and months of a year",
    "desert": "a dry area of land that gets very little rain",
    "bridge": "a structure built to cross a river, road or valley",
    "compass": "an instrument with a needle that points north",
    "dictionary": "a book that lists words and explains their meanings",
    "forest": "a large area covered with trees",
    "umbrella": "a folding cover that protects you from rain",
    "microscope": "an instrument that makes very small things look bigger",
    "museum": "a building where interesting old or valuable objects are shown",
    "planet": "a large body in space that moves around a star",
}
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"), ("happy", "sad"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("strong", "weak"), ("young", "old"),
    ("wet", "dry"), ("loud", "quiet"), ("rich", "poor"), ("hard", "soft"), ("thick", "thin"),
    ("high", "low"), ("long", "short"), ("clean", "dirty"), ("near", "far"),
]
SYSTEMS = [
    "You are a helpful assistant. Answer in one short sentence.",
    "You are a patient tutor for children.",
    "You are a concise assistant. Be correct and brief.",
    "You are a friendly geography and math teacher.",
]
RUDE = [
    "Figure it out yourself.", "That is a silly question and I will not answer it.",
    "Why would I tell you? Look it up.", "I don't care about that.", "Stop asking me boring things.",
]
OFF_TOPIC = [
    "I like turtles.", "The weather is nice today, isn't it?", "My favorite color is green.",
    "Did you know that bananas are berries?", "Let's talk about football instead.",
]


PHRASINGS = {
    "capital": ["What is the capital of {country}?", "Which city is the capital of {country}?",
                "Name the capital of {country}.", "Tell me the capital of {country}.",
                "Do you know the capital of {country}?"],
    "arithmetic": ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
                   "Calculate {a} {op} {b}.", "What do you get from {a} {op} {b}?"],
    "conversion": ["How many {dst} are in {n} {src}?", "Convert {n} {src} to {dst}.",
                   "What is {n} {src} in {dst}?", "Express {n} {src} in {dst}."],
    "definition": ["What does the word '{word}' mean?", "Define '{word}'.", "What is {article} {word}?",
                   "Explain the word '{word}'.", "What is the meaning of '{word}'?"],
    "opposite": ["What is the opposite of '{word}'?", "Give the opposite of '{word}'.",
                 "Name the opposite of '{word}'.", "Which word means the opposite of '{word}'?"],
}


def capital_facts():
    for country, city in CAPITALS:
        wrongs = [c for _, c in CAPITALS if c != city]
        yield dict(country=country), f"The capital of {country} is {city}.", \
            [f"The capital of {country} is {w}." for w in wrongs]


def arithmetic_facts():
    """Operands 1..6: a table small enough for a small model to learn every entry of."""
    for op, fn in (("+", int.__add__), ("-", int.__sub__), ("x", int.__mul__)):
        for a in range(1, 7):
            for b in range(1, 7):
                if op == "-" and b > a:
                    continue
                value = fn(a, b)
                yield dict(a=a, b=b, op=op), f"{a} {op} {b} = {value}.", \
                    [f"{a} {op} {b} = {value + d}." for d in (-2, -1, 1, 2, 10) if value + d >= 0]


def conversion_facts():
    for src, dst, factor in UNITS:
        for n in range(2, 7):
            wrongs = {n * factor + d for d in (-factor, factor, 1, -1)} - {n * factor}
            yield dict(n=n, src=src, dst=dst), f"{n} {src} is {n * factor} {dst}.", \
                [f"{n} {src} is {w} {dst}." for w in sorted(wrongs)]


def definition_facts():
    for word, meaning in sorted(WORDS.items()):
        article = "an" if word[0] in "aeiou" else "a"
        subject = f"{article.capitalize()} {word}"
        yield dict(word=word, article=article), f"{subject} is {meaning}.", \
            [f"{subject} is {WORDS[w]}." for w in sorted(WORDS) if w != word]


def opposite_facts():
    for word, opp in OPPOSITES:
        yield dict(word=word), f"The opposite of '{word}' is '{opp}'.", \
            [f"The opposite of '{word}' is '{o}'." for w, o in OPPOSITES if o != opp and w != word]


FACTS = {"capital": capital_facts, "arithmetic": arithmetic_facts, "conversion": conversion_facts,
         "definition": definition_facts, "opposite": opposite_facts}


def questions():
    """{kind: [[(question, answer, wrong answers) in each phrasing] for each fact]}."""
    return {kind: [[(phrasing.format(**slots), answer, wrongs) for phrasing in PHRASINGS[kind]]
                   for slots, answer, wrongs in facts()]
            for kind, facts in FACTS.items()}


def split_held_out(rng, per_kind):
    """(training facts: [[questions in the phrasings left for training]], held-out questions) with per_kind
    held-out questions of each kind, one phrasing of per_kind different facts: every fact stays in
    training under its other phrasings."""
    train, held_out = [], []
    for kind, facts in questions().items():
        chosen = set(rng.sample(range(len(facts)), per_kind))
        for i, phrasings in enumerate(facts):
            out = rng.randrange(len(phrasings)) if i in chosen else None
            if out is not None:
                held_out.append(phrasings[out])
            train.append([q for k, q in enumerate(phrasings) if k != out])
    return train, held_out


def ask(rng, facts):
    """A fact drawn uniformly (every fact equally often, whatever its kind), in one of its phrasings."""
    return rng.choice(rng.choice(facts))


def chat_records(rng, pool, n):
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            q, a, _ = ask(rng, pool)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        records.append({"messages": messages})
    return records


def eval_records(rng, train, held_out):
    """Every held-out question once: alone, after a system prompt, or after an answered training turn."""
    records = []
    for q, a, _ in held_out:
        context = rng.random()
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if context < 0.25 else []
        if context > 0.75:
            q0, a0, _ = ask(rng, train)
            messages += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
        records.append({"messages": messages + [{"role": "user", "content": q},
                                                {"role": "assistant", "content": a}]})
    return records


def preference_records(rng, pool, n):
    records = []
    for i in range(n):
        q, chosen, wrongs = ask(rng, pool)
        kind = rng.random()
        if kind < 0.5:  # prompt as a plain string
            prompt = q
        else:
            prompt = [{"role": "system", "content": rng.choice(SYSTEMS)}] if kind < 0.7 else []
            if kind >= 0.7 or rng.random() < 0.5:  # an earlier, answered turn
                q0, a0, _ = ask(rng, pool)
                prompt += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
            prompt.append({"role": "user", "content": q})
        r = rng.random()
        rejected = rng.choice(wrongs if r < 0.25 else RUDE if r < 0.625 else OFF_TOPIC)
        message = {"role": "assistant", "content": chosen}
        chosen_as = [chosen, message, [message]][i % 3]  # the three accepted answer forms
        records.append({"prompt": prompt, "chosen": chosen_as, "rejected": rejected})
    return records


def write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    here = Path(__file__).parent
    train, held_out = split_held_out(random.Random(99), HELD_OUT_PER_KIND)
    write_jsonl(here / "chat.jsonl", chat_records(random.Random(1234), train, CONVERSATIONS))
    write_jsonl(here / "eval.jsonl", eval_records(random.Random(4321), train, held_out))
    write_jsonl(here / "preference.jsonl", preference_records(random.Random(5678), train, PAIRS))
