"""Ranking metrics of premise selection, shared by BM25, SELECT and RERANK.

For theorem q with ground-truth premises P (corpus indices), every corpus entry stated before q
(order < q's order: the premises it could cite) is ranked by score, ties by library order (earlier
first: a stable sort). With r(p) the 0-based rank of p:
    recall@k(q) = |{p in P : r(p) < k}| / |P|        MRR(q) = 1 / (1 + min_p r(p))
both averaged over the theorems.
"""

import bisect
from itertools import pairwise

import numpy as np

KS = (1, 8, 32, 256)


def available_counts(corpus_orders: list[int], query_orders: list[int]) -> list[int]:
    """How many corpus entries (sorted by library order) precede each query: its candidate prefix."""
    if any(a > b for a, b in pairwise(corpus_orders)):
        raise ValueError("the corpus must be in library order")
    return [bisect.bisect_left(corpus_orders, q) for q in query_orders]


class RankingMetrics:
    """Accumulates recall@KS and MRR over queries, one score row at a time."""

    def __init__(self, ks=KS):
        self.ks, self.recall_sums, self.rr_sum, self.count = ks, np.zeros(len(ks)), 0.0, 0

    def add(self, scores: np.ndarray, available: int, relevant: list[int]) -> np.ndarray:
        """scores (N,) over the corpus; only the first `available` entries compete. Returns the
        candidates' ranking (indices, best first)."""
        ranking = np.argsort(-scores[:available], kind="stable")
        self.add_ranking(ranking, relevant)
        return ranking

    def add_ranking(self, ranking: np.ndarray, relevant: list[int]) -> None:
        """`ranking`: candidate indices best first (a top-K list ranks what it lists; the rest count as
        missed)."""
        self.add_ranks(np.flatnonzero(np.isin(ranking, relevant)), len(relevant))

    def add_ranks(self, ranks: np.ndarray, relevant_count: int) -> None:
        """ranks: the 0-based ranks of those of the query's `relevant_count` premises that are ranked."""
        ranks = np.asarray(ranks)
        self.recall_sums += [np.sum(ranks < k) / relevant_count for k in self.ks]
        self.rr_sum += 1.0 / (1 + ranks.min()) if ranks.size else 0.0
        self.count += 1

    def result(self) -> dict:
        n = max(self.count, 1)
        return {**{f"recall@{k}": s / n for k, s in zip(self.ks, self.recall_sums)},
                "mrr": self.rr_sum / n, "queries": self.count}


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table: one row per method."""
    cols = [f"recall@{k}" for k in KS] + ["mrr"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)
