"""Loaders of the local lm-eval tasks in this folder: their examples sit next to them, no Hub access."""

import json
from pathlib import Path


def load_capitals(**metadata):
    import datasets

    lines = Path(__file__).with_name("capitals.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
