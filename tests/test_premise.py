"""Premise selection: InfoNCE, pooling, ranking metrics and BM25 against plain-loop references, and the
global-batch InfoNCE on 2 gloo ranks against one process."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed import run_ranks

from trainer.premise_bm25 import BM25Ranker, tokenize
from trainer.premise_loss import info_nce, pooled_embedding
from trainer.premise_select import global_info_nce
from trainer.retrieval_metrics import RankingMetrics, available_counts


def test_info_nce_against_plain_loop():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    p = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    targets = torch.tensor([0, 1, 2])
    column_ids = torch.tensor([10, 11, 10, 12, 13, 11])  # column 2 repeats premise 10, column 5 premise 11
    positives = torch.tensor([[10, -1], [11, 13], [10, 14]])
    log_q = torch.randn(6, generator=g)
    losses, hits = info_nce(q, p, targets, column_ids, positives, 0.1, log_q)
    for i in range(3):
        allowed = [c for c in range(6) if c == targets[i] or int(column_ids[c]) not in positives[i].tolist()]
        logits = {c: float(q[i] @ p[c]) / 0.1 - float(log_q[c]) for c in allowed}
        expected = -logits[int(targets[i])] + math.log(sum(math.exp(v) for v in logits.values()))
        assert losses[i].item() == pytest.approx(expected, rel=1e-5)
        assert hits[i].item() == float(max(logits, key=logits.get) == int(targets[i]))


def test_pooled_embedding_is_the_mean_of_real_positions():
    hidden = torch.randn(2, 4, 3)
    out = pooled_embedding(hidden, torch.tensor([4, 2]))
    for row, n in ((0, 4), (1, 2)):
        mean = [sum(hidden[row, t, d].item() for t in range(n)) / n for d in range(3)]
        norm = math.sqrt(sum(m * m for m in mean))
        assert out[row].tolist() == pytest.approx([m / norm for m in mean], rel=1e-5)


def test_ranking_metrics_by_hand():
    m = RankingMetrics(ks=(1, 2, 3))
    # only the first 4 entries are available; ranking by score: 2, 0, 3, 1 (entry 4 is later: excluded)
    m.add(np.array([0.5, 0.1, 0.9, 0.3, 5.0]), 4, [0, 1])
    # a tie (0.5, 0.5) goes to the earlier entry: ranking 0, 1, 2
    m.add(np.array([0.5, 0.5, 0.2]), 3, [1])
    r = m.result()
    # theorem 1: ranks of 0 and 1 are 1 and 3 -> recall@1 0, @2 1/2, @3 1/2; RR 1/2
    # theorem 2: rank of 1 is 1 -> recall@1 0, @2 1, @3 1; RR 1/2
    assert r["recall@1"] == 0 and r["recall@2"] == pytest.approx(0.75) and r["recall@3"] == pytest.approx(0.75)
    assert r["mrr"] == pytest.approx(0.5)
    assert available_counts([0, 3, 5, 9], [0, 4, 10]) == [0, 2, 4]


def test_bm25_against_the_lucene_formula():
    docs = ["|- ( ph -> ps )", "|- ch $e |- ( ps -> ch )", "|- A = A", "|- ( ph -> ( ps -> ph ) )"]
    labels = ["a", "b", "c", "d"]
    ranker = BM25Ranker(labels, [f"{label} : {d}" for label, d in zip(labels, docs)], "content", 1.2, 0.75)
    toks = [tokenize(d, "content") for d in docs]
    avgdl = sum(map(len, toks)) / len(toks)
    query = "|- ( ph -> ch )"
    expected = []
    for doc in toks:
        score = 0.0
        for t in set(tokenize(query, "content")):
            df = sum(t in d for d in toks)
            if df == 0 or t not in doc:
                continue
            idf, tf = math.log(1 + (len(toks) - df + 0.5) / (df + 0.5)), doc.count(t)
            score += idf * tf / (tf + 1.2 * (1 - 0.75 + 0.75 * len(doc) / avgdl))
        expected.append(score)
    assert ranker.scores(query).tolist() == pytest.approx(expected, rel=1e-5)
    assert tokenize("|- ( ph -> ps )", "content+pairs") == ["ph", "->", "ps", "ph|->", "->|ps"]


def _encoder_and_batch():
    """A linear 'encoder' of 2 x (B=2 queries + B positives + M=1 negative) rows, the rows of rank r being
    rows [5r, 5r+5)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 6, generator=g)
    inputs = torch.randn(10, 6, generator=g)
    column_ids = torch.tensor([7, 8, 9, 1, 2, 8])  # per rank: B positives + 1 negative (rank 1 draws 8 too)
    positives = torch.tensor([[7, -1], [8, 9], [1, -1], [2, 8]])
    log_q = torch.randn(6, generator=g)  # the sampling correction of each premise column
    return weight, inputs, column_ids, positives, log_q


def _rank_gradient(rank, world_size):
    import torch.distributed as dist
    weight, inputs, column_ids, positives, log_q = _encoder_and_batch()
    weight.requires_grad_(True)
    rows = inputs[5 * rank:5 * rank + 5]
    emb = F.normalize(rows @ weight.T, dim=-1)
    mine = slice(3 * rank, 3 * rank + 3)
    losses, _ = global_info_nce(emb, column_ids[mine], positives[2 * rank:2 * rank + 2], 0.2,
                                dist.group.WORLD, rank, log_q[mine])
    (losses.sum() * world_size / 4).backward()  # the loop's scale: dp x gas / the step's queries
    dist.all_reduce(weight.grad)
    return (weight.grad / world_size).tolist(), losses.tolist()  # data parallelism averages gradients


def test_global_batch_on_two_ranks_equals_one_process():
    weight, inputs, column_ids, positives, log_q = _encoder_and_batch()
    weight.requires_grad_(True)
    emb = F.normalize(inputs @ weight.T, dim=-1)
    queries = torch.cat([emb[0:2], emb[5:7]])
    premises = torch.cat([emb[2:5], emb[7:10]])
    losses, _ = info_nce(queries, premises, torch.tensor([0, 1, 3, 4]), column_ids, positives, 0.2, log_q)
    (losses.sum() / 4).backward()
    results = run_ranks(2, _rank_gradient)
    for rank, (grad, rank_losses) in enumerate(results):
        assert torch.allclose(torch.tensor(grad), weight.grad, atol=1e-6)
        assert torch.allclose(torch.tensor(rank_losses), losses[2 * rank:2 * rank + 2], atol=1e-6)
