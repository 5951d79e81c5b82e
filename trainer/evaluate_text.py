"""Perplexity by corpus and by position, and the routing counts, in one pass over each held-out corpus.

A corpus is a .jsonl (its `text_field`) or .txt file (data.readers), tokenized as pretraining does
(<s> text </s> per document), or an indexed dataset prefix (prefix.idx + prefix.bin, data.indexed).
Each document is cut into consecutive windows of seq_len + 1 tokens sharing one token (every token is
predicted once, with the context of its window only); the first `max_tokens` predicted tokens count.
Loss by position: the mean next-token loss of the input positions in [start, end) of their window, in
buckets [0, 1), [1, 2), [2, 4), [4, 8), ... : does the loss keep falling as the context grows?
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.indexed import IndexedDataset
from data.readers import iter_texts

from .evaluate_routing import RouterRecorder, RoutingCounts


def corpus_documents(path: str, tokenizer, text_field: str = "text") -> list[np.ndarray]:
    if Path(f"{path}.idx").is_file():
        dataset = IndexedDataset(path)
        return [dataset[i] for i in range(len(dataset))]
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    texts = list(iter_texts(path, text_field))
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [np.array(head + doc + [tokenizer.eos_token_id]) for doc in ids]


def windows(documents: list[np.ndarray], seq_len: int, max_tokens: int = 0) -> list[np.ndarray]:
    """Pieces of seq_len + 1 tokens (a document's last one shorter), max_tokens predicted tokens in all."""
    out, budget = [], max_tokens or sum(map(len, documents))
    for doc in documents:
        for start in range(0, len(doc) - 1, seq_len):
            piece = doc[start:start + seq_len + 1][:budget + 1]
            out.append(piece)
            budget -= len(piece) - 1
            if budget <= 0:
                return out
    return out


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    bounds = [0] + [2 ** i for i in range(int(np.ceil(np.log2(seq_len))) + 1) if 2 ** i < seq_len] + [seq_len]
    return list(zip(bounds[:-1], bounds[1:]))


def batch_of(pieces: list[np.ndarray], seq_len: int) -> dict:
    """tokens, labels (-100 past a piece's end) (B, seq_len)."""
    tokens = torch.zeros((len(pieces), seq_len), dtype=torch.long)
    labels = torch.full((len(pieces), seq_len), -100, dtype=torch.long)
    for r, piece in enumerate(pieces):
        piece = torch.from_numpy(piece.astype(np.int64))
        tokens[r, :len(piece) - 1], labels[r, :len(piece) - 1] = piece[:-1], piece[1:]
    return {"tokens": tokens, "labels": labels}


def token_losses(model, hidden: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Next-token loss (nats) of every position, 0 where labels is -100; the logits a chunk at a time."""
    flat, targets = hidden.flatten(0, 1), labels.flatten()
    losses = [F.cross_entropy(model.output(flat[s:s + chunk_rows]).float(), targets[s:s + chunk_rows],
                              reduction="none") for s in range(0, len(flat), chunk_rows)]
    return torch.cat(losses).view_as(labels)


@torch.no_grad()
def evaluate_corpus(model, documents: list[np.ndarray], seq_len: int, max_tokens: int, batch_size: int,
                    device) -> dict:
    """{"loss", "perplexity", "tokens", "by_position": [{"start", "end", "loss", "tokens"}], "routing"}."""
    cfg = model.cfg
    pieces = windows(documents, seq_len, max_tokens)
    loss_sum, counts = torch.zeros(seq_len, dtype=torch.float64), torch.zeros(seq_len, dtype=torch.float64)
    with RouterRecorder(model) as recorder:
        routing = RoutingCounts(recorder.routers, cfg.num_experts, cfg.top_k)
        for start in range(0, len(pieces), batch_size):
            batch = batch_of(pieces[start:start + batch_size], seq_len)
            hidden, _ = model.hidden(batch["tokens"].to(device))
            valid = batch["labels"] != -100
            losses = token_losses(model, hidden, batch["labels"].to(device)).double().cpu()
            loss_sum += losses.sum(0)
            counts += valid.sum(0)
            routing.add(recorder.take(), valid)
    buckets = [{"start": a, "end": b, "tokens": int(counts[a:b].sum()),
                "loss": float(loss_sum[a:b].sum() / counts[a:b].sum())}
               for a, b in position_buckets(seq_len) if counts[a:b].sum()]
    loss = float(loss_sum.sum() / counts.sum())
    return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": int(counts.sum()),
            "by_position": buckets, "routing": routing.summary()}
