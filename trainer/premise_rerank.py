"""RERANK, Magnushammer's second stage: a cross-encoder (model/reranker.py) on the SELECT backbone, trained
by the one loop (a Task) with binary cross-entropy on cited premises and SELECT's hard negatives.

Mining (once, at the stage's start; kept in <output>/candidates.npz with the settings it depends on, so
a resume reuses it): the SELECT model (`init`: a select run, one of its checkpoints, or its HF export)
embeds the corpus, the mined train theorems (all, or a seeded sample of mine_theorems) and the held-out
ones (the last eval_queries, 0: all), each cut to select_seq_len tokens as SELECT saw them. Each theorem
ranks the premises stated before it by cosine. A train theorem keeps its top mine_k: the cited premises
in it are the positives, the others hard negatives. Re-ranking sorts SELECT's top list, so training sees
the premises it will sort: cited premises that SELECT ranks far down would teach the head to demote the
popular premises SELECT lists first. A held-out theorem keeps its top rerank_k and SELECT's rank of each
of its ground-truth premises over the whole ranking (re-ranking the top K leaves every rank below K as it
was).

Rows: the theorem's tokens then the premise's, each as the tokenizer encodes it (so <s> separates them);
the premise is cut to seq_len // 2 tokens, the theorem to what is left. The score is the head's logit on
the last token.

Micro-batch: B (mined theorem, listed cited premise) pairs in the SFT/DPO grouping
(data.stream.StepSchedule), each followed by `negatives` rows drawn with replacement from its theorem's
hard negatives with default_rng([seed, g]), g the pair's place in the run (the same draw at any layout and
on a resume; none when SELECT's top mine_k held only ground truth). Loss: BCE with logits, label 1 on
pairs and 0 on negatives, the mean over every row of the step (all micro-batches and ranks), plus the MoE
load-balancing loss.

Evaluation (every eval_every steps and at the end): each held-out theorem's top rerank_k rows scored by
the cross-encoder (each data-parallel rank a share) and sorted by score; recall@{1,8,32,256} and MRR of
BM25 (the premises stage's tuned tokenization, k1, b), SELECT and SELECT+RERANK on the same theorems:
<output>/eval.json and eval_table.md.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.readers import DataError

from . import distributed as D
from .premise_bm25 import BM25Ranker, evaluate_ranker
from .premise_select import PremiseData, embed_all, map_rows, pad_rows
from .retrieval_metrics import RankingMetrics, available_counts, format_table
from .tasks import router_log, router_loss, shuffled_items, sum_over_dp, to_device


def pair_row(theorem: list[int], premise: list[int], seq_len: int) -> list[int]:
    premise = premise[:seq_len // 2]
    return theorem[:seq_len - len(premise)] + premise


def rank_by_cosine(queries: torch.Tensor, corpus: torch.Tensor, available: list[int], k: int,
                   relevant: np.ndarray = None, chunk: int = 512):
    """Each query's top k corpus indices among its first `available` entries, best first (-1 when fewer),
    and, with relevant (Q, P) corpus indices padded with -1, the 0-based rank of each (-1 on padding)."""
    n = len(corpus)
    top = np.full((len(queries), k), -1)
    ranks = None if relevant is None else np.full(relevant.shape, -1)
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk].float() @ corpus.float().T
        cut = torch.tensor(available[start:start + chunk], device=scores.device)
        scores = scores.masked_fill(torch.arange(n, device=scores.device)[None] >= cut[:, None], float("-inf"))
        values, indices = scores.topk(min(k, n), dim=1)
        indices[values == float("-inf")] = -1
        top[start:start + len(indices), :indices.shape[1]] = indices.cpu().numpy()
        for i in range(len(indices)) if relevant is not None else ():
            q, row, listed = start + i, scores[i], top[start + i].tolist()
            for j, p in enumerate(relevant[q]):
                if p >= 0:  # a listed premise takes its place in the list; below it, the count of better ones
                    ranks[q, j] = listed.index(p) if p in listed else int((row > row[p]).sum())
    return top, ranks


def padded(lists: list[list[int]]) -> np.ndarray:
    width = max([len(x) for x in lists] + [1])
    return np.array([list(x) + [-1] * (width - len(x)) for x in lists], dtype=np.int64).reshape(len(lists), width)


def mine(select_model, data: PremiseData, scfg, layout) -> dict:
    """The candidates.npz content (module docstring)."""
    cut = scfg.select_seq_len
    corpus = embed_all(select_model, [r[:cut] for r in data.corpus_rows], scfg.eval_batch_size, layout)
    train = np.arange(len(data.train))
    if scfg.mine_theorems and scfg.mine_theorems < len(train):
        train = np.sort(np.random.default_rng(scfg.seed).choice(train, scfg.mine_theorems, replace=False))
    valid = np.arange(len(data.valid))[-scfg.eval_queries if scfg.eval_queries else 0:]
    out = {"train_theorems": train, "valid_theorems": valid}
    for split, rows, records, picked, k in (("train", data.train_rows, data.train, train, scfg.mine_k),
                                            ("valid", data.valid_rows, data.valid, valid, scfg.rerank_k)):
        queries = embed_all(select_model, [rows[i][:cut] for i in picked], scfg.eval_batch_size, layout)
        available = available_counts(data.orders, [records[i].order for i in picked])
        if split == "train":
            out["train_top"], _ = rank_by_cosine(queries, corpus, available, k)
        else:
            relevant = padded([[data.index[p] for p in records[i].premises] for i in picked])
            top, ranks = rank_by_cosine(queries, corpus, available, k, relevant)
            out.update(valid_top=top, valid_relevant=relevant, valid_select_ranks=ranks)
    return out


def mining_settings(scfg) -> str:
    """What candidates.npz depends on: a file mined with other settings is mined again."""
    keys = ("init", "data", "select_seq_len", "mine_k", "mine_theorems", "rerank_k", "eval_queries", "seed")
    return json.dumps({k: scfg[k] for k in keys}, sort_keys=True)


def mined_with(path: Path):
    if not path.is_file():
        return None
    with np.load(path) as f:
        return str(f["settings"]) if "settings" in f.files else None


def load_or_mine(scfg, data: PremiseData, mcfg, layout, pcfg) -> dict:
    path = Path(scfg.output) / "candidates.npz"
    if mined_with(path) != mining_settings(scfg):
        from .engine import build_model

        select_model = build_model(mcfg, scfg.init, scfg.seed, layout, pcfg).eval()
        mined = dict(mine(select_model, data, scfg, layout), settings=np.array(mining_settings(scfg)))
        del select_model
        if D.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path.with_suffix(".tmp.npz"), **mined)
            os.replace(path.with_suffix(".tmp.npz"), path)  # a crash never leaves half a file
        D.barrier()
    with np.load(path) as f:
        return dict(f)


def rerank_ranks(top: np.ndarray, scores: np.ndarray, relevant: np.ndarray, select_ranks: np.ndarray) -> list:
    """The ranks of a query's ground truth after its listed candidates (top, -1 padded) are sorted by
    `scores` (one per listed candidate); unlisted premises keep SELECT's rank."""
    listed = top[top >= 0]
    order = listed[np.argsort(-scores, kind="stable")].tolist()
    return [order.index(p) if p in order else r for p, r in zip(relevant, select_ranks) if p >= 0]


class RerankTask:
    def __init__(self, scfg, model_cfg, layout, data: PremiseData, mined: dict):
        self.scfg, self.model_cfg, self.layout, self.data, self.mined = scfg, model_cfg, layout, data, mined
        self.pairs, self.negatives = [], []
        for m, (t, top) in enumerate(zip(mined["train_theorems"], mined["train_top"])):
            cited = {data.index[p] for p in data.train[t].premises}
            self.pairs += [(m, c) for c in top if c in cited]
            self.negatives.append([c for c in top if c >= 0 and c not in cited])
        self.pairs = np.array(self.pairs, dtype=np.int64).reshape(-1, 2)
        if not len(self.pairs):
            raise DataError(f"{scfg.output}/candidates.npz: SELECT's top {scfg.mine_k} of the mined train "
                            "theorems holds none of their cited premises: nothing to train on (raise rerank.mine_k)")
        self.items = shuffled_items(len(self.pairs), scfg, layout,
                                    f"rerank data {scfg.output}/candidates.npz", "pairs")
        self.bm25 = None  # BM25's metrics on the evaluated theorems, computed at the first evaluation
        if D.is_main():
            print(f"[rerank] {len(mined['train_theorems'])} mined train theorems ({len(self.pairs)} pairs), "
                  f"{len(mined['valid_theorems'])} held out, their SELECT top {scfg.rerank_k} re-scored", flush=True)

    def row(self, theorem_row, corpus_index: int) -> list[int]:
        return pair_row(theorem_row, self.data.corpus_rows[corpus_index], self.scfg.seq_len)

    def next_batch(self):
        rows, labels = [], []
        for g, item in self.items.next_rows():
            m, p = self.pairs[item]
            theorem = self.data.train_rows[self.mined["train_theorems"][m]]
            pool = self.negatives[m]
            rng = np.random.default_rng([self.scfg.seed, g])  # the g-th pair of the run draws alike at any layout
            drawn = rng.choice(pool, self.scfg.negatives) if len(pool) else []
            rows += [self.row(theorem, p)] + [self.row(theorem, n) for n in drawn]
            labels += [1.0] + [0.0] * len(drawn)
        batch = pad_rows(rows)
        batch["labels"] = torch.tensor(labels)
        return to_device(batch)

    def num_loss_tokens(self, batch) -> int:
        return len(batch["labels"])  # the loss is a mean over the step's rows

    def loss(self, engine, batch, scale):
        logits, stats = engine.module(batch["tokens"], batch["position_ids"], batch["lengths"])
        losses = F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="none")
        aux, router_sums = router_loss(stats, self.model_cfg, self.layout)
        correct = ((logits > 0).float() == batch["labels"]).sum().item()
        return losses.sum() * scale + aux, {"loss_sum": losses.sum().item(), "correct": correct,
                                            "rows": len(logits), **router_sums}

    def reduce_metrics(self, sums, layout) -> dict:
        loss_sum, correct, rows = sum_over_dp([sums["loss_sum"], sums["correct"], sums["rows"]], layout)
        return {"loss": loss_sum / rows, "accuracy": correct / rows, **router_log(sums, layout)}

    def evaluate(self, engine, layout) -> dict:
        m = self.mined
        queries = [self.data.valid_rows[q] for q in m["valid_theorems"]]
        rows = [self.row(theorem, c) for theorem, top in zip(queries, m["valid_top"]) for c in top if c >= 0]
        engine.eval()
        scores = map_rows(lambda b: engine.module(b["tokens"], b["position_ids"], b["lengths"])[0], rows,
                          self.scfg.eval_batch_size, layout).cpu().numpy()
        engine.train()
        select, rerank, start = RankingMetrics(), RankingMetrics(), 0
        for top, relevant, ranks in zip(m["valid_top"], m["valid_relevant"], m["valid_select_ranks"]):
            listed = int((top >= 0).sum())
            select.add_ranks(ranks[ranks >= 0], int((relevant >= 0).sum()))
            rerank.add_ranks(rerank_ranks(top, scores[start:start + listed], relevant, ranks),
                             int((relevant >= 0).sum()))
            start += listed
        table = {**self.bm25_metrics(), "SELECT": select.result(), "SELECT+RERANK": rerank.result()}
        if D.is_main():
            out = Path(self.scfg.output)
            (out / "eval.json").write_text(json.dumps(table, indent=1))
            (out / "eval_table.md").write_text(format_table(table) + "\n")
            print(f"[rerank] {len(queries)} held-out theorems:\n{format_table(table)}", flush=True)
        return {**{f"eval/{k}": float(v) for k, v in table["SELECT+RERANK"].items()},
                **{f"eval/select_{k}": float(v) for k, v in table["SELECT"].items() if k != "queries"}}

    def bm25_metrics(self) -> dict:
        """{"BM25": metrics} on the evaluated theorems with the premises stage's tuned BM25 ({} without it)."""
        path = Path(self.scfg.data) / "bm25.json"
        if self.bm25 is None and path.is_file():
            tuned = json.loads(path.read_text())
            ranker = BM25Ranker(self.data.labels, self.data.texts, tuned["tokenization"], tuned["k1"], tuned["b"])
            records = [self.data.valid[q] for q in self.mined["valid_theorems"]]
            self.bm25 = {"BM25": evaluate_ranker(ranker.scores, records, self.data.index, self.data.orders)}
        return self.bm25 or {}

    def state_dict(self):
        return self.items.state_dict()

    def load_state_dict(self, state):
        self.items.load_state_dict(state)


def export_reranker(ckpt, mcfg, out_dir, tokenizer) -> Path:
    """The decoder as an HF MixtralForCausalLM folder plus rerank_head.safetensors (model/reranker.py)."""
    from safetensors.torch import save_file

    from model.hf import export_hf
    from model.init import SubmoduleSource

    from .checkpoint import CheckpointReader, CheckpointSource

    export_hf(SubmoduleSource(CheckpointSource(ckpt), "decoder."), mcfg, out_dir, tokenizer=tokenizer,
              dtype=torch.float32)
    reader = CheckpointReader(ckpt)
    head = {name: reader.read(f"model/head.{name}") for name in ("weight", "bias")}
    save_file({k: v.float().contiguous() for k, v in head.items()}, str(Path(out_dir) / "rerank_head.safetensors"))
    return Path(out_dir)


def run_rerank(cfg) -> bool:
    """The stage runner (trainer/stages.py)."""
    from omegaconf import OmegaConf

    from data.tokenizer import load_tokenizer
    from model.reranker import Reranker, head_init
    from parallel.layout import Layout

    from .checkpoint import latest_checkpoint
    from .config import model_config_of, save_config
    from .engine import build_engine, build_wrapped_model, model_config_for
    from .loop import train

    scfg = cfg.rerank
    out = Path(scfg.output)
    mcfg = model_config_for(model_config_of(cfg), scfg.init)
    cfg = cfg.copy()
    cfg.model = OmegaConf.structured(mcfg)
    layout = Layout.build(cfg.parallel, mcfg, scfg, D.world_size(), D.rank())
    data = PremiseData(scfg.data, cfg.tokenizer, max(scfg.seq_len, scfg.select_seq_len))
    task = RerankTask(scfg, mcfg, layout, data, load_or_mine(scfg, data, mcfg, layout, cfg.parallel))
    model = build_wrapped_model(lambda: Reranker(mcfg), mcfg, scfg, lambda: head_init(mcfg, scfg.seed), layout,
                                cfg.parallel)
    engine = build_engine(model, scfg, cfg.parallel, layout)
    if D.is_main():
        save_config(cfg, out / "config.yaml")
    step, _ = train("rerank", scfg, cfg, engine, task, layout, mcfg)
    if step == scfg.steps and scfg.export_hf and D.is_main():
        path = export_reranker(latest_checkpoint(out / "checkpoints"), mcfg, scfg.export_hf,
                               load_tokenizer(cfg.tokenizer))
        print(f"[rerank] exported the cross-encoder to {path} (+ rerank_head.safetensors)", flush=True)
    return step == scfg.steps
