"""SELECT: the decoder as a bi-encoder of theorems and premises, trained by the one loop (a Task).

Data: the premises stage's split (data/metamath.py): every (train theorem, premise its proof uses) pair
is one item, visited in the DPO/SFT grouping (data.stream.StepSchedule), a new order every epoch.
Micro-batch of B pairs on each rank: rows = B theorem statements, then their B premises, then
`extra_negatives` corpus entries drawn uniformly with default_rng([seed, step, micro, dp_rank]) (the same
draw on a resume). One forward pass encodes all rows; the embedding is the mean of the final-normed hidden
states over the row's tokens, unit-normalised (trainer/premise_loss.py).

Loss: InfoNCE (premise_loss.info_nce) of this rank's theorems against the premise rows of *all*
data-parallel ranks, gathered with gradient (parallel.mappings.all_gather_from_sp on dim 0: forward
all-gather, backward reduce-scatter, so each rank's premises receive the gradient of every rank's
queries), averaged over the step's theorems, plus the MoE load-balancing loss. With logq_correction the
logits are corrected for the citation-weighted sampling of in-batch premises (premise_loss), so that the
cosine keeps the popularity prior.

Evaluation (every eval_every steps and at the end): the whole corpus and the held-out theorems embedded
in batches (each data-parallel rank a share, summed), exact cosine scores, recall@{1,8,32,256} and MRR
over the premises stated before each theorem (trainer/retrieval_metrics.py).
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.metamath import read_split
from data.readers import DataError
from data.tokenizer import load_tokenizer
from parallel.mappings import all_gather_from_sp

from . import distributed as D
from .premise_loss import info_nce, pooled_embedding
from .retrieval_metrics import RankingMetrics, available_counts
from .tasks import eval_batches, router_log, router_loss, shuffled_items, sum_over_dp, to_device


def encode_texts(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]


def pad_rows(rows: list[list[int]]) -> dict:
    """Right-padded (R, T) tokens (pad id 0), positions 0..T-1 and lengths (R,)."""
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    return {"tokens": tokens, "position_ids": torch.arange(width).expand(len(rows), width).contiguous(),
            "lengths": torch.tensor([len(r) for r in rows])}


def embed_rows(model, batch):
    """(R, D) unit embeddings and router stats of a padded batch."""
    hidden, stats = model.hidden(batch["tokens"], batch["position_ids"])
    return pooled_embedding(hidden, batch["lengths"]), stats


@torch.no_grad()
def map_rows(fn, rows: list[list[int]], batch_size: int, layout) -> torch.Tensor:
    """(N, ...) outputs of fn(padded batch) for every row, computed in length-sorted batches, each
    data-parallel rank a share (every rank runs the same number of forward passes), summed over the ranks."""
    by_length = np.argsort([len(r) for r in rows], kind="stable")
    out = None
    for indices in eval_batches(len(rows), batch_size, layout):
        picked = [int(by_length[0 if i is None else i]) for i in indices]
        values = fn(to_device(pad_rows([rows[j] for j in picked])))
        if out is None:
            out = torch.zeros(len(rows), *values.shape[1:], device=values.device)
        for row, i in enumerate(indices):
            if i is not None:
                out[by_length[i]] = values[row]
    if dist.is_initialized() and layout.dp > 1:
        dist.all_reduce(out, group=layout.dp_group)
    return out


def embed_all(model, rows: list[list[int]], batch_size: int, layout) -> torch.Tensor:
    """(N, D) unit embeddings of every row (map_rows)."""
    return map_rows(lambda batch: embed_rows(model, batch)[0], rows, batch_size, layout)


class PremiseData:
    """The premises stage's split, tokenized: corpus rows, train and held-out theorem rows."""

    def __init__(self, folder: str, tokenizer_name: str, seq_len: int):
        self.labels, self.texts, self.orders, self.train, self.valid = read_split(folder)
        self.index = {label: i for i, label in enumerate(self.labels)}
        for record in self.train + self.valid:
            missing = [p for p in record.premises if p not in self.index]
            if missing:
                raise DataError(f"{folder}: theorem {record.label!r} uses {missing[0]!r}, absent from corpus.jsonl")
        tokenizer = load_tokenizer(tokenizer_name)
        self.corpus_rows = encode_texts(tokenizer, self.texts, seq_len)
        self.train_rows = encode_texts(tokenizer, [r.text for r in self.train], seq_len)
        self.valid_rows = encode_texts(tokenizer, [r.text for r in self.valid], seq_len)
        self.pairs = np.array([(t, self.index[p]) for t, r in enumerate(self.train) for p in r.premises])
        if not len(self.pairs):
            raise DataError(f"{folder}: no (theorem, premise) pair to train on")
        self.cited = np.bincount(self.pairs[:, 1], minlength=len(self.labels))  # train proofs citing each

    def log_q(self, positives: int, negatives: int) -> np.ndarray:
        """(N,) log of the expected times each corpus entry is drawn into a batch of `positives` pairs
        (drawn in proportion to citations) and `negatives` uniform draws."""
        rate = positives * self.cited / self.cited.sum() + negatives / len(self.labels)
        return np.log(np.maximum(rate, 1e-30))  # a rate of 0: never drawn, its value never read

    def positives(self, records) -> torch.Tensor:
        """(len(records), P) ground-truth corpus indices, padded with -1."""
        width = max(len(r.premises) for r in records)
        return torch.tensor([[self.index[p] for p in r.premises] + [-1] * (width - len(r.premises))
                             for r in records])


def retrieval_eval(model, data: PremiseData, batch_size: int, layout, limit: int = 0):
    """Held-out recall@k / MRR of the bi-encoder (the last `limit` held-out theorems; 0: all)."""
    valid = data.valid[-limit:] if limit else data.valid
    rows = data.valid_rows[-limit:] if limit else data.valid_rows
    corpus = embed_all(model, data.corpus_rows, batch_size, layout)
    queries = embed_all(model, rows, batch_size, layout)
    scores = (queries @ corpus.T).cpu().numpy()
    metrics = RankingMetrics()
    for record, row, available in zip(valid, scores, available_counts(data.orders, [r.order for r in valid])):
        metrics.add(row, available, [data.index[p] for p in record.premises])
    return metrics.result()


def global_info_nce(emb, column_ids, positives, temperature: float, group, dp_rank: int, log_q=None):
    """InfoNCE of this rank's B queries (emb[:B]) against the premise rows (emb[B:]) of every rank of
    `group`, gathered with gradient. column_ids (B + M,), positives (B, P) and log_q (B + M,) or None, as
    in info_nce."""
    B = len(positives)
    premises = all_gather_from_sp(emb[B:], group, dim=0)  # (dp * (B + M), D): forward all-gather, backward reduce-scatter
    columns = all_gather_from_sp(column_ids, group, dim=0)
    log_q = None if log_q is None else all_gather_from_sp(log_q, group, dim=0)
    targets = torch.arange(B, device=emb.device) + dp_rank * (len(emb) - B)
    return info_nce(emb[:B], premises, targets, columns, positives, temperature, log_q)


class SelectTask:
    def __init__(self, scfg, cfg, model_cfg, layout):
        self.scfg, self.model_cfg, self.layout = scfg, model_cfg, layout
        self.data = PremiseData(scfg.data, cfg.tokenizer, scfg.seq_len)
        self.log_q = self.data.log_q(scfg.micro_batch_size, scfg.extra_negatives) if scfg.logq_correction else None
        self.items = shuffled_items(len(self.data.pairs), scfg, layout, f"select data {scfg.data}", "pairs")
        if D.is_main():
            print(f"[select] {len(self.data.labels)} premises, {len(self.data.train)} train theorems "
                  f"({len(self.data.pairs)} pairs), {len(self.data.valid)} held out", flush=True)

    def next_batch(self):
        schedule = self.items.schedule
        step, micro = schedule.rows_consumed // self.scfg.global_batch_size, schedule.micro
        pairs = self.data.pairs[self.items.next_items()]
        rng = np.random.default_rng([self.scfg.seed, step, micro, self.layout.dp_rank])
        negatives = rng.integers(0, len(self.data.labels), self.scfg.extra_negatives)
        columns = np.concatenate([pairs[:, 1], negatives])
        rows = [self.data.train_rows[t] for t in pairs[:, 0]] + [self.data.corpus_rows[c] for c in columns]
        batch = pad_rows(rows)
        batch.update(column_ids=torch.from_numpy(columns),
                     positives=self.data.positives([self.data.train[t] for t in pairs[:, 0]]))
        if self.log_q is not None:
            batch["log_q"] = torch.from_numpy(self.log_q[columns]).float()
        return to_device(batch)

    def num_loss_tokens(self, batch) -> int:
        return len(batch["positives"])  # the loss is a mean over the step's theorems

    def loss(self, engine, batch, scale):
        B = len(batch["positives"])
        emb, stats = embed_rows(engine.module, batch)
        group = self.layout.dp_group if self.layout.dp > 1 else None
        losses, hits = global_info_nce(emb, batch["column_ids"], batch["positives"], self.scfg.temperature,
                                       group, self.layout.dp_rank, batch.get("log_q"))
        aux, router_sums = router_loss(stats, self.model_cfg, self.layout)
        return losses.sum() * scale + aux, {"loss_sum": losses.sum().item(), "hits": hits.sum().item(),
                                            "queries": B, **router_sums}

    def reduce_metrics(self, sums, layout) -> dict:
        loss_sum, hits, queries = sum_over_dp([sums["loss_sum"], sums["hits"], sums["queries"]], layout)
        return {"loss": loss_sum / queries, "batch_accuracy": hits / queries, **router_log(sums, layout)}

    def evaluate(self, engine, layout) -> dict:
        engine.eval()
        metrics = retrieval_eval(engine.module, self.data, self.scfg.eval_batch_size, layout,
                                    self.scfg.eval_queries)
        engine.train()
        if D.is_main():
            Path(self.scfg.output).mkdir(parents=True, exist_ok=True)
            (Path(self.scfg.output) / "retrieval_eval.json").write_text(json.dumps(metrics, indent=1))
        return {f"eval/{k}": float(v) for k, v in metrics.items()}

    def state_dict(self):
        return self.items.state_dict()

    def load_state_dict(self, state):
        self.items.load_state_dict(state)
