"""Losses and pooling of premise selection (Magnushammer's SELECT and RERANK objectives).

SELECT, InfoNCE over the global batch: query i (a theorem) with unit embedding q_i, the premise columns
p_c (every rank's in-batch positives and extra sampled negatives, gathered with gradient), t_i its own
positive's column, tau the temperature:
    loss_i = -log softmax_c(q_i . p_c / tau)[t_i]
Columns holding another ground-truth premise of theorem i (a premise drawn twice, or a second premise of
the same theorem) are false negatives: they are left out of the softmax (logit -inf).

Sampling-bias correction (logQ, Yi et al. 2019): in-batch positives are drawn in proportion to how often
proofs cite each premise, so plain in-batch InfoNCE learns p(premise | theorem) / p(premise) and drops
the popularity prior. Subtracting log Q(c), the log of the expected number of times column c's premise is
drawn into a batch, from every column's logit makes the sampled softmax estimate the full-corpus one.
"""

import torch
import torch.nn.functional as F


def pooled_embedding(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden (R, T, D) of right-padded rows, lengths (R,) -> (R, D) unit vectors: the mean of each row's
    first `lengths` positions (causal attention: padding after a row changes none of its positions)."""
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).to(hidden.dtype)
    mean = (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
    return F.normalize(mean.float(), dim=-1)


def info_nce(queries: torch.Tensor, premises: torch.Tensor, targets: torch.Tensor, column_ids: torch.Tensor,
             positives: torch.Tensor, temperature: float,
             log_q: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) losses and (B,) hits (the target scores highest) of B queries.

    queries (B, D) and premises (C, D) unit vectors; targets (B,) the column of each query's positive;
    column_ids (C,) the corpus index in each column; positives (B, P) each query's ground-truth corpus
    indices, padded with -1; log_q (C,) the sampling correction of each column (None: none)."""
    logits = queries @ premises.T / temperature  # (B, C)
    if log_q is not None:
        logits = logits - log_q[None]
    false_negative = (column_ids[None, :, None] == positives[:, None, :]).any(-1)  # (B, C)
    false_negative[torch.arange(len(targets)), targets] = False
    logits = logits.masked_fill(false_negative, float("-inf"))
    losses = F.cross_entropy(logits, targets, reduction="none")
    return losses, (logits.argmax(-1) == targets).float()
