"""Mixture of Tokens (Antoniak et al., arXiv 2310.15961): a continuous MoE layer, `model.moe_type=tokens`.

Groups: a micro-batch x (B, T, D) is cut into B/G groups of G consecutive rows (G = model.mot_group_size);
at each position t the G tokens of a group are mixed. For expert e, group n and position t:
    w[i, e] = softmax over the rows i of the group of  (x_i . c_e) * s / temperature
    m_e     = sum_i w[i, e] x_i                 one mixed token per expert
    y_i     = sum_e w[i, e] expert_e(m_e)       each token gets its weight times the expert's output back
c (E, D) is the controller, the sparse router's shape; s is 1, or a learned logit scale
(model.mot_learnable_temperature). Mixing runs across rows, never across positions, so the layer is
causal, fully differentiable, and needs no load balancing: every expert processes exactly one mixed
token per group and position, so a token costs E/G expert passes (sparse top-k: k).

Masking: positions outside `mix_mask` (padding, filler rows) get zero weight: they enter no mixture and
get no output. A micro-batch of fewer than G rows (evaluation or generation with a small batch) forms
one group of all its rows; a larger one must be divisible by G.

Experts are model.moe's stacked SwiGLU weights under the same names (experts.w1, w3, w2), so one
checkpoint format serves both layers, and trainer/transition.py turns this layer into the sparse one.
"""

from typing import Optional

import torch
from torch import nn

from .moe import Experts, swiglu_experts


class MixtureExperts(Experts):
    """The stacked experts, each applied to its own rows: mixed (E, M, D) -> (E, M, D).
    parallel/mot.py replaces it under tensor or expert parallelism, keeping this interface."""

    def forward(self, mixed: torch.Tensor) -> torch.Tensor:
        E, M, D = mixed.shape
        counts = torch.full((E,), M, dtype=torch.long, device=mixed.device)
        return swiglu_experts(mixed.reshape(E * M, D), self.w1, self.w3, self.w2, counts).view(E, M, D)


def group_rows(batch: int, group_size: int) -> int:
    """Rows per group for a micro-batch of `batch` rows (see the module docstring)."""
    if batch <= group_size:
        return batch
    if batch % group_size:
        raise ValueError(f"Mixture of Tokens: a micro-batch of {batch} rows is not divisible by "
                         f"model.mot_group_size ({group_size})")
    return group_size


def merge_weights(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the rows of each group (dim 1 of logits (n, G, T, E)); masked-out rows get weight 0
    (a group position with no row left gets none at all)."""
    if mask is None:
        return torch.softmax(logits, dim=1)
    keep = mask[..., None]
    weights = torch.softmax(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), dim=1)
    return weights * keep


class MixtureOfTokens(nn.Module):
    def __init__(self, dim: int, num_experts: int, expert_dim: int, group_size: int,
                 temperature: float = 1.0, learnable_temperature: bool = False):
        super().__init__()
        self.group_size, self.temperature = group_size, temperature
        self.controller = nn.Linear(dim, num_experts, bias=False)
        self.logit_scale = nn.Parameter(torch.ones(1)) if learnable_temperature else None
        self.experts = MixtureExperts(num_experts, dim, expert_dim)

    def forward(self, x: torch.Tensor, mix_mask: Optional[torch.Tensor] = None):
        """x (B, T, D), mix_mask (B, T) bool or None (all positions mix) -> (B, T, D), and router stats
        in model.moe's form (counts, prob_sum, z_sum, entropy_sum): every expert gets one mixed token per
        group and position, prob_sum and z_sum are zero (no auxiliary loss), and entropy_sum is scaled
        so that the logged router_entropy is the mean entropy of the merge weights (log G: uniform)."""
        B, T, D = x.shape
        G = group_rows(B, self.group_size)
        groups = x.reshape(B // G, G, T, D)
        logits = self.controller(groups).float() / self.temperature
        if self.logit_scale is not None:
            logits = logits * self.logit_scale.float()
        mask = None if mix_mask is None else mix_mask.reshape(B // G, G, T)
        weights = merge_weights(logits, mask)  # (n, G, T, E)
        w = weights.to(x.dtype)
        mixed = torch.einsum("ngte,ngtd->entd", w, groups)
        E = mixed.shape[0]
        out = self.experts(mixed.reshape(E, -1, D)).view_as(mixed)
        y = torch.einsum("ngte,entd->ngtd", w, out).reshape(B, T, D)
        return y, self.stats(weights, G)

    @staticmethod
    def stats(weights: torch.Tensor, G: int):
        n, _, T, E = weights.shape
        counts = torch.full((E,), float(n * T), device=weights.device)
        with torch.no_grad():
            entropy = -(weights * weights.clamp_min(1e-30).log()).sum(1)  # (n, T, E)
            entropy_sum = entropy.mean(-1).sum() * G  # / (B*T) tokens = mean over groups, positions, experts
        zero = weights.new_zeros(())
        return counts, weights.new_zeros(E), zero, entropy_sum
