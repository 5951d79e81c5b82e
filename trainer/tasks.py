"""Tasks: what a stage feeds the loop (batches) and what it minimises (loss). Pretraining lives here;
SFT and DPO in sft.py and dpo.py. A task implements:

    next_batch() -> dict of (B, T) tensors on the device
    num_loss_tokens(batch) -> int        tokens that count in the loss (normalises the step)
    loss(engine, batch, scale) -> (loss tensor for backward, metric sums)
    reduce_metrics(sums, layout) -> dict  metric sums of one step -> step metrics, over all ranks
    evaluate(engine, layout) -> dict      held-out metrics ({} when there is no split)
    state_dict() / load_state_dict()      data position, for exact resume
"""

import math

import numpy as np
import torch
import torch.distributed as dist

from data.mixture import MixtureStream, open_sources, parse_mixture, source_names
from data.readers import DataError
from data.stream import PackedStream, ShuffledItems, split_documents
from model import load_balancing_loss, router_z_loss
from model.loss import fused_linear_cross_entropy
from parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.parallelize import reduce_router_stats

from . import distributed as D
from .config import pretrain_data


def to_device(batch: dict) -> dict:
    return {k: v.to(D.device(), non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def lm_loss_sum(engine, batch, layout):
    """(summed next-token loss over the labels != -100, router stats) of one micro-batch. Without tp the
    LM head is fused with the loss (model.loss: the (N, V) logits never exist whole, 1.4x the tokens/s
    on the CPU, bench/RESULTS.md); with tp the logits stay vocab-sharded for the parallel loss.
    batch["mix_mask"], when present, names the positions a Mixture of Tokens layer may mix."""
    mix_mask = batch.get("mix_mask")
    if layout.tp > 1:
        logits, stats = engine(batch["tokens"], batch["position_ids"], mix_mask)
        return vocab_parallel_cross_entropy(logits, batch["labels"], layout.tp_group).sum(), stats
    model = engine.module
    hidden, stats = model.hidden(batch["tokens"], batch["position_ids"], mix_mask)
    loss = fused_linear_cross_entropy(hidden.flatten(0, 1), model.output.weight, batch["labels"].flatten())
    return loss, stats


def router_loss(stats, model_cfg, layout):
    """Mixtral's load-balancing loss (+ z-loss) with their coefficients, over the tokens of the step's
    micro-batch on this data-parallel rank (sequence shards summed first), and the router sums that
    the logs report (router_log)."""
    stats = reduce_router_stats(stats, layout)
    loss = model_cfg.router_aux_loss_coef * load_balancing_loss(stats)
    if model_cfg.router_z_loss_coef:
        loss = loss + model_cfg.router_z_loss_coef * router_z_loss(stats)
    sums = {"aux_sum": loss.item(), "micro": 1, "expert_counts": stats.counts.detach(),
            "entropy_sum": stats.entropy_sum, "routed_tokens": float(stats.num_tokens)}
    return loss, sums


def router_log(sums: dict, layout) -> dict:
    """A step's router metrics over all data-parallel ranks: aux_loss (mean over micro-batches),
    expert_load[layer][expert] (share of the top-k assignments), expert_imbalance (max over layers of
    max/mean load: 1 is perfectly balanced) and router_entropy[layer] (mean nats per token)."""
    shape = sums["expert_counts"].shape  # (layers, experts)
    *per_layer, aux_sum, micro, routed = sum_over_dp(  # one all-reduce for all of them
        sums["expert_counts"].flatten().tolist() + sums["entropy_sum"].tolist()
        + [sums["aux_sum"], sums["micro"], sums["routed_tokens"]], layout)
    counts = torch.tensor(per_layer[:shape.numel()], dtype=torch.float64).view(shape)
    entropy = torch.tensor(per_layer[shape.numel():], dtype=torch.float64)
    load = counts / counts.sum(-1, keepdim=True)
    return {"aux_loss": aux_sum / micro, "expert_load": load.tolist(),
            "expert_imbalance": float((load.max(-1).values / load.mean(-1)).max()),
            "router_entropy": (entropy / routed).tolist()}


def token_loss_log(sums: dict, layout) -> dict:
    """A step's metrics of a next-token loss over all data-parallel ranks: loss (the mean over the step's
    loss tokens, from the micro-batches' loss_sum and tokens) and router_log's router metrics."""
    loss_sum, tokens = sum_over_dp([sums["loss_sum"], sums["tokens"]], layout)
    return {"loss": loss_sum / tokens, **router_log(sums, layout)}


def accumulation_steps(scfg, layout) -> int:
    return scfg.global_batch_size // (scfg.micro_batch_size * layout.dp)


def shuffled_items(n: int, scfg, layout, what: str, unit: str = "rows") -> ShuffledItems:
    """A stage's fixed list of n items as this rank reads them (data.stream.ShuffledItems)."""
    return ShuffledItems(n, scfg.seed, scfg.micro_batch_size, layout.dp_rank, layout.dp,
                         accumulation_steps(scfg, layout), what, unit)


def eval_batches(num_items: int, micro_batch_size: int, layout, limit: int = 0) -> list[list]:
    """This data-parallel rank's share of the first min(num_items, limit * micro_batch_size) held-out
    items (all of them when limit is 0: the same items at any layout), as micro-batches of item indices.
    Items are dealt round-robin over the dp ranks; the last micro-batches are padded with None so that
    every rank runs the same number of forward passes (the model's collectives, such as the expert-
    parallel all-to-all, need every rank)."""
    if limit:
        num_items = min(num_items, limit * micro_batch_size)
    per_round = micro_batch_size * layout.dp
    return [[i if i < num_items else None
             for i in range(r * per_round + layout.dp_rank, (r + 1) * per_round, layout.dp)]
            for r in range(math.ceil(num_items / per_round))]


def sum_over_dp(values: list[float], layout) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=D.device())
    if dist.is_initialized() and layout.dp > 1:
        dist.all_reduce(t, group=layout.dp_group)
    return t.tolist()


class PretrainTask:
    """Next-token loss on the packed stream of `scfg.data`: one dataset prefix or a weighted mixture of
    them (data.mixture). `valid_fraction` of each source's documents are held out; eval/loss is the
    mixture's held-out loss (the sources' losses on the first rows of their held-out streams, weighted
    by the mixture's shares), with eval/loss/<source> for each source of a mixture."""

    def __init__(self, scfg, model_cfg, layout):
        self.scfg, self.model_cfg, self.layout = scfg, model_cfg, layout
        sources = parse_mixture(pretrain_data(scfg), "data")
        datasets = open_sources(sources, "data", model_cfg.vocab_size)
        train, self.valid = [], []
        for source, dataset in zip(sources, datasets):
            try:
                train_docs, valid_docs = split_documents(len(dataset), scfg.valid_fraction, scfg.seed)
            except DataError as e:
                raise DataError(f"{source.path}: {e}") from None
            train.append(PackedStream(dataset, scfg.seq_len, 1, scfg.seed,
                                      documents=train_docs if len(valid_docs) else None))
            if len(valid_docs):
                self.valid.append(PackedStream(dataset, scfg.seq_len, scfg.micro_batch_size, scfg.seed,
                                               documents=valid_docs))
        self.names = source_names(sources)
        self.stream = MixtureStream(train, [s.weight for s in sources], self.names, scfg.micro_batch_size,
                                    dp_rank=layout.dp_rank, dp_size=layout.dp,
                                    accumulation=accumulation_steps(scfg, layout))
        if D.is_main():
            for line in self.stream.describe(scfg.steps * scfg.global_batch_size):
                print(f"[data] {line}", flush=True)

    def next_batch(self):
        return to_device(self.stream.next_batch())

    def num_loss_tokens(self, batch) -> int:
        return int((batch["labels"] != -100).sum())

    def loss(self, engine, batch, scale):
        ce_sum, stats = lm_loss_sum(engine, batch, self.layout)
        aux, router_sums = router_loss(stats, self.model_cfg, self.layout)
        return ce_sum * scale + aux, {"loss_sum": ce_sum.item(), "tokens": self.num_loss_tokens(batch),
                                      **router_sums}

    def reduce_metrics(self, sums, layout) -> dict:
        """token_loss_log's metrics, and epochs/<source>: how often each source has been seen."""
        return {**token_loss_log(sums, layout), **self.stream.epochs()}

    def evaluate(self, engine, layout) -> dict:
        if not self.valid:
            return {}
        sums = []
        engine.eval()
        with torch.no_grad():
            for valid in self.valid:
                loss_sum = tokens = 0.0
                for rows in eval_batches(valid.rows_per_epoch, self.scfg.micro_batch_size, layout,
                                         self.scfg.eval_batches):
                    batch = to_device(valid.batch_of(rows))
                    batch["mix_mask"] = batch["labels"] != -100  # filler rows mix into no other row
                    loss_sum += lm_loss_sum(engine, batch, layout)[0].item()
                    tokens += self.num_loss_tokens(batch)
                sums += [loss_sum, tokens]
        engine.train()
        sums = sum_over_dp(sums, layout)
        losses = [loss_sum / tokens for loss_sum, tokens in zip(sums[0::2], sums[1::2])]
        shares = self.stream.counts / self.stream.counts.sum()
        metrics = {"eval/loss": float(np.dot(shares, losses))}
        if len(losses) > 1:
            metrics.update({f"eval/loss/{name}": loss for name, loss in zip(self.names, losses)})
        return metrics

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)
