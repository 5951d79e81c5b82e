"""RERANK (trainer/premise_rerank.py): SELECT's rankings and the re-ranked metrics against brute force,
the stage end to end through the CLI (its eval table, its HF export scored by transformers), and its
loss and grad norm at two data-parallel ranks against one process."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_same_curves, run_cli
from test_premise_stage import chain_database

from trainer.premise_rerank import pair_row, rank_by_cosine, rerank_ranks
from trainer.retrieval_metrics import RankingMetrics


def stable_ranking(scores: np.ndarray, available: int) -> list[int]:
    return [int(i) for i in np.argsort(-scores[:available], kind="stable")]


def test_rank_by_cosine_against_a_full_sort():
    gen = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(7, 5, generator=gen), torch.randn(40, 5, generator=gen)
    available = [40, 3, 0, 25, 10, 40, 1]
    relevant = np.array([[0, 39], [2, -1], [-1, -1], [24, 5], [9, -1], [17, 3], [0, -1]])
    top, ranks = rank_by_cosine(queries, corpus, available, k=6, relevant=relevant, chunk=3)
    scores = (queries @ corpus.T).numpy()
    for q in range(7):
        full = stable_ranking(scores[q], available[q])
        assert top[q].tolist() == (full[:6] + [-1] * 6)[:6]
        assert ranks[q].tolist() == [full.index(p) if p >= 0 else -1 for p in relevant[q]]


def test_reranked_metrics_equal_a_full_ranking_with_the_top_reordered():
    """Re-ranking SELECT's top K (scores[q] over the corpus) by new scores, then computing the metrics,
    equals RankingMetrics over one score vector whose top K entries get the new scores lifted above all."""
    rng = np.random.default_rng(1)
    ours, reference = RankingMetrics(), RankingMetrics()
    for _ in range(20):
        select = rng.normal(size=300)
        relevant = rng.choice(300, size=4, replace=False)
        full = stable_ranking(select, 300)
        top, new = np.array(full[:32]), rng.normal(size=32)
        ours.add_ranks(rerank_ranks(top, new, np.append(relevant, -1),
                                    np.append([full.index(p) for p in relevant], -1)), len(relevant))
        lifted = select.copy()
        lifted[top] = 1e6 + new
        reference.add(lifted, 300, list(relevant))
    assert ours.result() == pytest.approx(reference.result())


def test_pair_row_keeps_the_premise_to_half():
    assert pair_row(list(range(10)), [100, 101, 102], 8) == [0, 1, 2, 3, 4, 100, 101, 102]
    assert pair_row(list(range(10)), list(range(100, 110)), 8) == [0, 1, 2, 3, 100, 101, 102, 103]
    assert pair_row([0, 1], [100, 101, 102, 103, 104], 8) == [0, 1, 100, 101, 102, 103]


SELECT_ARGS = ["premises.valid_fraction=0.1", "premises.bm25_tune_queries=5", "select.steps=3",
               "select.micro_batch_size=4", "select.global_batch_size=4", "select.extra_negatives=2",
               "select.warmup_steps=1", "select.eval_batch_size=16", "logging.progress=false"]
RERANK_ARGS = ["rerank.steps=3", "rerank.micro_batch_size=2", "rerank.global_batch_size=4", "rerank.negatives=3",
               "rerank.mine_k=8", "rerank.rerank_k=8", "rerank.warmup_steps=1", "rerank.log_every=1",
               "rerank.eval_batch_size=16", "rerank.seq_len=48"]


@pytest.fixture(scope="module")
def select_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("select")
    (run / "chain.mm").write_text(chain_database())
    run_cli("recipes/premise_selection.yaml", f"run_dir={run}", f"premises.database={run / 'chain.mm'}",
            "stages=[premises,select]", *SELECT_ARGS)
    return run


def test_rerank_stage_and_its_export(select_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    run_cli("recipes/premise_selection.yaml", f"run_dir={select_run}", "stages=[rerank]",
            f"rerank.output={tmp_path / 'rerank'}", f"rerank.export_hf={tmp_path / 'hf'}", *SELECT_ARGS, *RERANK_ARGS)
    table = json.loads((tmp_path / "rerank" / "eval.json").read_text())
    assert set(table) == {"BM25", "SELECT", "SELECT+RERANK"} and all(m["queries"] == 6 for m in table.values())
    select_eval = json.loads((select_run / "select" / "retrieval_eval.json").read_text())
    for key in ("recall@1", "recall@8", "recall@32", "mrr"):  # SELECT's ranks, mined anew, as select measured
        assert table["SELECT"][key] == pytest.approx(select_eval[key], abs=1e-6)
    bm25 = json.loads((select_run / "premises" / "bm25.json").read_text())
    assert table["BM25"]["recall@32"] == pytest.approx(bm25["recall@32"])
    # re-scoring the top 8 leaves recall@8 and beyond as SELECT had them
    assert table["SELECT+RERANK"]["recall@32"] == pytest.approx(table["SELECT"]["recall@32"])

    hf, tokenizer = AutoModel.from_pretrained(tmp_path / "hf"), AutoTokenizer.from_pretrained(tmp_path / "hf")
    head = load_file(tmp_path / "hf" / "rerank_head.safetensors")
    assert head["weight"].shape == (1, hf.config.hidden_size) and head["bias"].shape == (1,)
    corpus = [json.loads(line) for line in (select_run / "premises" / "corpus.jsonl").read_text().splitlines()]
    theorem, premise = (tokenizer(t["text"])["input_ids"] for t in corpus[-1:] + corpus[:1])
    ids = torch.tensor([pair_row(theorem, premise, 48)])
    with torch.no_grad():
        theirs = hf(ids).last_hidden_state[0, -1] @ head["weight"][0] + head["bias"][0]
    ours = _our_score(tmp_path / "rerank", ids)
    assert float(theirs) == pytest.approx(ours, abs=1e-4)


def _our_score(run, ids) -> float:
    from omegaconf import OmegaConf

    from model import ModelConfig
    from model.reranker import Reranker
    from trainer.checkpoint import CheckpointReader, latest_checkpoint

    reader = CheckpointReader(latest_checkpoint(run / "checkpoints"))
    mcfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(reader.path / "config.yaml").model, resolve=True))
    model = Reranker(mcfg)
    model.load_state_dict({name: reader.read(f"model/{name}") for name in reader.names()})
    with torch.no_grad():
        logits, _ = model(ids, torch.arange(ids.shape[1])[None], torch.tensor([ids.shape[1]]))
    return float(logits[0])


def test_rerank_on_two_ranks_equals_one_process(select_run, tmp_path):
    common = ["recipes/premise_selection.yaml", f"run_dir={select_run}", "stages=[rerank]", *SELECT_ARGS,
              *RERANK_ARGS, "rerank.eval_every=0"]
    run_cli(*common, f"rerank.output={tmp_path / 'one'}")
    run_cli(*common, f"rerank.output={tmp_path / 'two'}", nproc=2)
    assert_same_curves(tmp_path / "two", tmp_path / "one", 1e-5, 1e-5)
