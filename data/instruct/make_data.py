"""Writes the shipped instruct data (deterministic; see SOURCE.md):

    python data/instruct/make_data.py      -> data/instruct/chat.jsonl, data/instruct/preference.jsonl

Facts written for this project: country capitals, arithmetic, exact unit conversions, word definitions,
opposites. chat.jsonl: single- and multi-turn conversations, some with a system prompt. preference.jsonl:
the correct answer is chosen; the rejected one is a wrong fact, a rude refusal or an off-topic reply.
"""

import json
import random
from pathlib import Path

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Russia", "Moscow"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"),
    ("Norway", "Oslo"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"), ("Austria", "Vienna"), ("Switzerland", "Bern"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Ireland", "Dublin"), ("the United Kingdom", "London"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("the Philippines", "Manila"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"), ("Cuba", "Havana"), ("Iceland", "Reykjavik"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Venezuela", "Caracas"), ("Uruguay", "Montevideo"),
    ("Croatia", "Zagreb"), ("Serbia", "Belgrade"), ("Bulgaria", "Sofia"),
]
UNITS = [  # (from, to, factor): 1 from = factor to
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("feet", "inches", 12), ("yards", "feet", 3), ("liters", "milliliters", 1000), ("years", "months", 12),
    ("centimeters", "millimeters", 10),
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
    "puzzle": "a game or problem that tests your skill or cleverness",
    "river": "a large natural stream of water flowing to the sea or a lake",
    "shadow": "a dark shape made when something blocks the light",
    "ladder": "a set of steps between two long pieces, used for climbing",
    "alphabet": "the set of letters used to write a language",
    "teacher": "a person whose job is to help others learn",
    "battery": "a device that stores electricity and supplies it when needed",
    "vaccine": "a substance that helps the body learn to fight a disease",
    "continent": "one of the seven large land masses of the Earth",
    "kettle": "a container with a spout, used for boiling water",
}
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"), ("happy", "sad"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("strong", "weak"), ("young", "old"),
    ("wet", "dry"), ("loud", "quiet"), ("rich", "poor"), ("hard", "soft"), ("thick", "thin"),
    ("high", "low"), ("long", "short"), ("clean", "dirty"), ("near", "far"),
    ("first", "last"), ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("arrive", "leave"),
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


def capital(rng):
    country, city = rng.choice(CAPITALS)
    wrong = rng.choice([c for _, c in CAPITALS if c != city])
    q = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?",
                    "Name the capital of {}."])
    return q.format(country), f"The capital of {country} is {city}.", f"The capital of {country} is {wrong}."


def arithmetic(rng):
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(1, 60), rng.randint(1, 40))
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong = value + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    sign = {"+": "+", "-": "-", "*": "x"}[op]
    q = rng.choice(["What is {} {} {}?", "Compute {} {} {}.", "How much is {} {} {}?"]).format(a, sign, b)
    return q, f"{a} {sign} {b} = {value}.", f"{a} {sign} {b} = {wrong}."


def conversion(rng):
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 9)
    wrong = n * factor + (rng.choice([-factor, factor, 1, -1]) if factor > 3 else rng.choice([-1, 1]))
    q = rng.choice(["How many {dst} are in {n} {src}?", "Convert {n} {src} to {dst}."])
    q = q.format(n=n, src=src, dst=dst)
    return q, f"{n} {src} is {n * factor} {dst}.", f"{n} {src} is {wrong} {dst}."


def definition(rng):
    word = rng.choice(sorted(WORDS))
    other = rng.choice([w for w in sorted(WORDS) if w != word])
    article = "an" if word[0] in "aeiou" else "a"
    q = rng.choice(["What does the word '{}' mean?", "Define '{}'.", "What is {} {}?"])
    q = q.format(article, word) if q.count("{}") == 2 else q.format(word)
    subject = f"{article.capitalize()} {word}"
    return q, f"{subject} is {WORDS[word]}.", f"{subject} is {WORDS[other]}."


def opposite(rng):
    word, opp = rng.choice(OPPOSITES)
    wrong = rng.choice([o for w, o in OPPOSITES if o != opp and w != word])
    q = rng.choice(["What is the opposite of '{}'?", "Give the opposite of '{}'."]).format(word)
    return q, f"The opposite of '{word}' is '{opp}'.", f"The opposite of '{word}' is '{wrong}'."


TASKS = [capital, arithmetic, conversion, definition, opposite]


def chat_records(rng, n):
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 2, 2, 3])):
            q, a, _ = rng.choice(TASKS)(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        records.append({"messages": messages})
    return records


def preference_records(rng, n):
    records = []
    for i in range(n):
        q, chosen, wrong = rng.choice(TASKS)(rng)
        kind = rng.random()
        if kind < 0.5:  # prompt as a plain string
            prompt = q
        else:
            prompt = [{"role": "system", "content": rng.choice(SYSTEMS)}] if kind < 0.7 else []
            if kind >= 0.7 or rng.random() < 0.5:  # an earlier, answered turn
                q0, a0, _ = rng.choice(TASKS)(rng)
                prompt += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
            prompt.append({"role": "user", "content": q})
        r = rng.random()
        rejected = wrong if r < 0.25 else rng.choice(RUDE) if r < 0.625 else rng.choice(OFF_TOPIC)
        message = {"role": "assistant", "content": chosen}
        chosen_as = [chosen, message, [message]][i % 3]  # the three accepted answer forms
        records.append({"prompt": prompt, "chosen": chosen_as, "rejected": rejected})
    return records


def write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    here = Path(__file__).parent
    write_jsonl(here / "chat.jsonl", chat_records(random.Random(1234), 400))
    write_jsonl(here / "preference.jsonl", preference_records(random.Random(5678), 300))
