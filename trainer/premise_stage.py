"""The `premises` stage: Metamath database -> premise-selection split (data/metamath.py) -> the tuned
BM25 baseline on its held-out theorems (trainer/premise_bm25.py).

Writes into premises.output: corpus.jsonl, train.jsonl, valid.jsonl, counts.json (corpus sizes and
what was left out, with counts) and bm25.json (the chosen tokenization/k1/b and its held-out metrics, and those of ranking every premise by
how many train proofs use it: a query-blind baseline that any learned selector must beat).
"""

import json
import time
from pathlib import Path

from data.metamath import (
    find_database,
    parse_database,
    premise_counts,
    premise_split,
    read_split,
    write_split,
)

from . import distributed as D
from .premise_bm25 import BM25Ranker, evaluate_ranker, frequency_scores, tune_bm25


def run_premises_stage(cfg) -> bool:
    """The stage runner (trainer/stages.py): rank 0 does the work, the others wait at the barrier."""
    if D.is_main():
        run_premises(cfg.premises)
    return True


def run_premises(p) -> dict:
    """p: the PremisesStage config. Returns counts.json's content (with bm25's metrics when run)."""
    out = Path(p.output)
    t0 = time.perf_counter()
    path = find_database(p.database, p.cache_dir)
    assertions = parse_database(path)
    corpus, train, valid = premise_split(assertions, p.valid_fraction, str(path))
    write_split(out, corpus, train, valid)
    counts = dict(premise_counts(assertions, train, valid, corpus), database=str(path),
                  parse_seconds=time.perf_counter() - t0)
    (out / "counts.json").write_text(json.dumps(counts, indent=1))
    print(f"[premises] {path}: {json.dumps(counts)}", flush=True)
    if p.bm25_tune_queries:
        t0 = time.perf_counter()
        labels, texts, orders, train, valid = read_split(out)
        how, k1, b = tune_bm25(labels, texts, orders, train, p.bm25_tune_queries)
        ranker = BM25Ranker(labels, texts, how, k1, b)
        metrics = evaluate_ranker(ranker.scores, valid, {label: i for i, label in enumerate(labels)}, orders)
        result = {"tokenization": how, "k1": k1, "b": b, "seconds": time.perf_counter() - t0,
                  **{k: float(v) for k, v in metrics.items()}}
        freq = frequency_scores(labels, train)
        popularity = evaluate_ranker(lambda text: freq, valid, {label: i for i, label in enumerate(labels)}, orders)
        result["frequency_baseline"] = {k: float(v) for k, v in popularity.items()}
        (out / "bm25.json").write_text(json.dumps(result, indent=1))
        print(f"[premises] BM25 ({how}, k1={k1}, b={b}) on {len(valid)} held-out theorems: "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "queries")
              + "; ranking by train frequency alone: "
              + ", ".join(f"{k} {v:.4f}" for k, v in popularity.items() if k != "queries"), flush=True)
        counts["bm25"] = result
    return counts
