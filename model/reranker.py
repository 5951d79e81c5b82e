"""A cross-encoder for one device: our Mixtral decoder reads `query + candidate` as one row and a linear
head turns the final-normed hidden state of the row's last token (causal attention: the one position
that has seen both) into one relevance logit. Magnushammer's RERANK model (trainer/premise_rerank.py).

The head is stored on its own as `rerank_head.safetensors` next to an HF export of the decoder:
    score = hidden[last] @ weight.T + bias        weight (1, dim), bias (1,)
with `hidden` the last hidden state of transformers' MixtralModel (after its final norm).
"""

import torch
from torch import nn

from .config import ModelConfig
from .mixtral import Mixtral


class Reranker(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Mixtral(cfg)
        self.head = nn.Linear(cfg.dim, 1)

    def forward(self, tokens, position_ids, lengths):
        """Right-padded rows (R, T) with their lengths (R,) -> (R,) fp32 logits and the router stats."""
        hidden, stats = self.decoder.hidden(tokens, position_ids)
        last = hidden[torch.arange(len(tokens), device=tokens.device), lengths - 1]
        return self.head(last).float().squeeze(-1), stats


def head_init(cfg: ModelConfig, seed: int) -> dict:
    """head.weight ~ Normal(0, init_std) (generator seeded with `seed`), head.bias = 0."""
    gen = torch.Generator().manual_seed(seed)
    return {"head.weight": torch.randn(1, cfg.dim, generator=gen) * cfg.init_std, "head.bias": torch.zeros(1)}
