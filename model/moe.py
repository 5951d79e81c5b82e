"""Mixtral's sparse MoE: a top-k router over SwiGLU experts, computed dropless with grouped GEMMs.

Router (Mixtral semantics): p = softmax(x W_g^T) over all experts; the k largest are kept and
renormalised, which equals a softmax over the selected logits. No capacity, no jitter, no token drop.

Experts are stored stacked so one grouped GEMM serves all of them:
    w1, w3: (E, D, F)    w2: (E, F, D)      expert_e(x) = (silu(x w1[e]) * (x w3[e])) w2[e]
`Experts.forward` sorts the (token, choice) pairs by expert, runs three grouped GEMMs and scatters
the weighted results back. Parallel versions (expert parallelism) replace `Experts` with a module of
the same interface; the router stays.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] @ w[e] for each e. x (N, K), w (E, K, M), offsets (E,) int32.

    torch._grouped_mm needs 16-byte aligned strides (and bf16 on CUDA); otherwise a loop does it.
    """
    aligned = all((s * x.element_size()) % 16 == 0 for s in (x.shape[1], w.shape[2]))
    if aligned and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        return torch._grouped_mm(x, w, offs=offsets)
    bounds = [0] + offsets.tolist()
    return torch.cat([x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])])


def swiglu_experts(x: torch.Tensor, w1, w3, w2, counts: torch.Tensor) -> torch.Tensor:
    """x (N, D) sorted by expert, counts (E,) rows per expert -> (N, D)."""
    offsets = counts.cumsum(0).to(torch.int32)
    h = F.silu(grouped_mm(x, w1, offsets)) * grouped_mm(x, w3, offsets)
    return grouped_mm(h, w2, offsets)


class Router(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor):
        """x (N, D) -> logits (N, E) fp32, weights (N, k) fp32, indices (N, k)."""
        logits = self.gate(x).float()
        probs = torch.softmax(logits, dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, indices


class Experts(nn.Module):
    def __init__(self, num_experts: int, dim: int, expert_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, expert_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, expert_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, expert_dim, dim))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), indices/weights (N, k) -> (N, D) = sum_k weights * expert_indices(x)."""
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        token = order // indices.shape[1]
        y = swiglu_experts(x[token], self.w1, self.w3, self.w2, counts)
        y = y * weights.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)


@dataclass
class RouterStats:
    """Per-layer sums from which the auxiliary losses and the load statistics are computed.

    Sums rather than means so that shards of the tokens (sequence or data parallel) add up.
    """
    counts: torch.Tensor  # (L, E) top-k assignments per expert, no grad
    prob_sum: torch.Tensor  # (L, E) sum over tokens of the router probabilities
    z_sum: torch.Tensor  # (L,) sum over tokens of logsumexp(logits)^2
    num_tokens: torch.Tensor  # () tokens per layer
    entropy_sum: torch.Tensor = None  # (L,) sum over tokens of the router's entropy (nats), no grad


def layer_router_stats(logits: torch.Tensor, indices: torch.Tensor):
    """One layer's (counts (E,), prob_sum (E,), z_sum (), entropy_sum ()) for router logits (N, E),
    indices (N, k)."""
    E = logits.shape[-1]
    counts = torch.bincount(indices.flatten(), minlength=E).to(torch.float32)
    probs = torch.softmax(logits, dim=-1)
    z_sum = torch.logsumexp(logits, dim=-1).square().sum()
    with torch.no_grad():
        entropy_sum = -(probs * torch.log_softmax(logits, dim=-1)).sum()
    return counts, probs.sum(0), z_sum, entropy_sum


def load_balancing_loss(stats: RouterStats) -> torch.Tensor:
    """Mixtral's (Switch) loss, as transformers' load_balancing_loss_func computes it:
    E * sum_e f_e * P_e with f_e and P_e the fraction of assignments and the mean router
    probability of expert e, both averaged over all layers' tokens together."""
    L, E = stats.counts.shape
    rows = L * stats.num_tokens
    f = stats.counts.sum(0) / rows
    P = stats.prob_sum.sum(0) / rows
    return E * (f * P).sum()


def router_z_loss(stats: RouterStats) -> torch.Tensor:
    """ST-MoE z-loss: mean over layers and tokens of logsumexp(router logits)^2."""
    return stats.z_sum.sum() / (stats.counts.shape[0] * stats.num_tokens)


class MoE(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, expert_dim: int):
        super().__init__()
        self.router = Router(dim, num_experts, top_k)
        self.experts = Experts(num_experts, dim, expert_dim)

    def forward(self, x: torch.Tensor):
        """x (B, T, D) -> (B, T, D), and this layer's router stats (see layer_router_stats)."""
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, indices = self.router(flat)
        out = self.experts(flat, indices, weights).view_as(x)
        return out, layer_router_stats(logits, indices)
