"""The BM25 baseline of premise selection (bm25s: sparse-matrix BM25, scores of every document at once).

Metamath statements are whitespace-separated symbols (`|- ( ph -> ps )`), so the tokenizations tried
are built from symbols, never from a word regex that would drop `->` or `C_`:
  symbols        every symbol
  content        symbols without the structural ones that occur in nearly every statement
                 (`( ) |- $e ,` and the premise's `label :` prefix)
  content+pairs  content symbols plus adjacent pairs (`A->B` order: `( ph -> ps )` gives `ph|->`, ...)
Tuning (tune_bm25): each tokenization with the default k1/b, then a k1 x b grid on the best one, all
scored by recall@32 on the last `tune_queries` theorems of the *train* split (candidates: the premises
stated before each). The held-out split is touched once, by the chosen setting.
"""

import time
from itertools import pairwise

import numpy as np

from .retrieval_metrics import RankingMetrics, available_counts

STRUCTURAL = frozenset(["(", ")", "|-", "$e", ",", ":"])
TOKENIZATIONS = ("symbols", "content", "content+pairs")
K1_GRID, B_GRID = (0.6, 1.2, 2.0, 3.0), (0.4, 0.75, 1.0)


def tokenize(text: str, how: str, label: str | None = None) -> list[str]:
    symbols = text.split()
    if how != "symbols" and label is not None and symbols[:2] == [label, ":"]:
        symbols = symbols[2:]  # the premise's name is no statement symbol
    if how == "symbols":
        return symbols
    content = [s for s in symbols if s not in STRUCTURAL]
    if how == "content":
        return content
    if how == "content+pairs":
        return content + [f"{a}|{b}" for a, b in pairwise(content)]
    raise ValueError(f"unknown BM25 tokenization {how!r}; choose from {TOKENIZATIONS}")


class BM25Ranker:
    def __init__(self, corpus_labels, corpus_texts, how: str, k1: float, b: float):
        import bm25s

        self.how = how
        self.index = bm25s.BM25(k1=k1, b=b)
        self.index.index([tokenize(t, how, label) or ["<empty>"] for label, t in zip(corpus_labels, corpus_texts)],
                         show_progress=False)
        self.vocab = self.index.vocab_dict

    def scores(self, text: str) -> np.ndarray:
        ids = [self.vocab[t] for t in tokenize(text, self.how) if t in self.vocab]
        if not ids:
            return np.zeros(self.index.scores["num_docs"], dtype=np.float32)
        return self.index.get_scores(ids)


def evaluate_ranker(score_fn, records, corpus_index: dict, corpus_orders: list[int]) -> dict:
    """recall@k / MRR of score_fn(text) -> (N,) scores over `records` (data.metamath.Record)."""
    metrics = RankingMetrics()
    for record, available in zip(records, available_counts(corpus_orders, [r.order for r in records])):
        metrics.add(score_fn(record.text), available, [corpus_index[p] for p in record.premises])
    return metrics.result()


def frequency_scores(corpus_labels, train) -> np.ndarray:
    """The popularity baseline: each premise scored by how many train proofs use it (no look at the query)."""
    counts = dict.fromkeys(corpus_labels, 0)
    for record in train:
        for p in record.premises:
            counts[p] += 1
    return np.array([counts[label] for label in corpus_labels], dtype=np.float32)


def tune_bm25(corpus_labels, corpus_texts, corpus_orders, train, tune_queries: int, log=print):
    """The (tokenization, k1, b) with the best recall@32 on the last tune_queries train theorems."""
    index = {label: i for i, label in enumerate(corpus_labels)}
    queries = train[-tune_queries:]
    tried = {}

    def trial(how, k1, b):
        t0 = time.perf_counter()
        ranker = BM25Ranker(corpus_labels, corpus_texts, how, k1, b)
        result = evaluate_ranker(ranker.scores, queries, index, corpus_orders)
        tried[(how, k1, b)] = result["recall@32"]
        log(f"[bm25] tune {how} k1={k1} b={b}: recall@32 {result['recall@32']:.4f} on {len(queries)} "
            f"train theorems ({time.perf_counter() - t0:.1f} s)")

    for how in TOKENIZATIONS:
        trial(how, 1.2, 0.75)
    best_how = max(TOKENIZATIONS, key=lambda how: tried[(how, 1.2, 0.75)])
    for k1 in K1_GRID:
        for b in B_GRID:
            if (best_how, k1, b) not in tried:
                trial(best_how, k1, b)
    return max(tried, key=tried.get)
