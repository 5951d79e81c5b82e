"""Mixtral's sparse MoE: a top-k router over SwiGLU experts, computed dropless with grouped GEMMs.

Router (Mixtral semantics by default): p = softmax(x W_g^T) over all experts; the k largest are kept
and renormalised, which equals a softmax over the selected logits. No capacity, no jitter, no token drop.
Variants (ModelConfig.router_*): sigmoid scores (DeepSeek-V3), top-k renormalisation on or off, a
scaling factor on the weights, and a per-expert balancing bias added to the scores for the top-k choice
only (auxiliary-loss-free load balancing, `update_expert_bias`). The router always computes in fp32.
Shared experts (always on, optionally behind a sigmoid gate as in Qwen2-MoE) are one SwiGLU next to
the routed ones.

Experts are stored stacked so one grouped GEMM serves all of them:
    w1, w3: (E, D, F)    w2: (E, F, D)      expert_e(x) = (silu(x w1[e]) * (x w3[e])) w2[e]
`Experts.forward` sorts the (token, choice) pairs by expert, copies each token's row to its k places
(gather_rows), runs two grouped GEMMs (w1 and w3 together, then w2) with the routing weight applied to
the narrower of the hidden (F) and output (D) rows, and sums each token's k rows back (sum_rows).
Parallel versions (expert parallelism) replace `Experts` with a module of the same interface; the
router stays.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned row strides (and bf16 on CUDA); otherwise a loop does it."""
    aligned = all((s * x.element_size()) % 16 == 0 for s in (x.shape[-1], w.shape[-1]))
    return aligned and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


def _bounds(offsets: torch.Tensor) -> list[int]:
    return [0] + offsets.tolist()


@torch.library.custom_op("moe_train::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] @ w[e] for each e. x (N, K), w (E, K, M), offsets (E,) int32.

    A custom op over the private torch._grouped_mm (the one place it is called, with _grouped_weight_grad):
    torch.compile traces it through its own fake (shape) function and backward, where the built-in op's
    meta function would refuse fp32 inputs, and the loop fallback stays out of the traced graph.
    """
    if _aligned(x, w):
        return torch._grouped_mm(x, w, offs=offsets)
    b = _bounds(offsets)
    return torch.cat([x[b[e]:b[e + 1]] @ w[e] for e in range(w.shape[0])])


@torch.library.custom_op("moe_train::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """d(grouped_mm)/dw: (E, K, M) whose slice e is x[rows of e]^T @ grad[rows of e]."""
    if _aligned(x, grad):
        return torch._grouped_mm(x.t(), grad, offs=offsets)
    b = _bounds(offsets)
    return torch.stack([x[b[e]:b[e + 1]].t() @ grad[b[e]:b[e + 1]] for e in range(offsets.shape[0])])


@grouped_mm.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[2])


@_grouped_weight_grad.register_fake
def _(x, grad, offsets):
    return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad_x = grouped_mm(grad, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_weight_grad(x, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class _GateUp(torch.autograd.Function):
    """x (R, D) sorted by expert, w1 and w3 (E, D, F) -> (R, 2F) = [x w1[e] | x w3[e]]: one grouped GEMM
    of twice the width. The concatenated weights exist only while a GEMM runs (here and again in
    backward): saved for backward, every layer would keep a copy of its w1 and w3 until then."""

    @staticmethod
    def forward(ctx, x, w1, w3, offsets):
        ctx.save_for_backward(x, w1, w3, offsets)
        return grouped_mm(x, torch.cat([w1, w3], -1), offsets)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w3, offsets = ctx.saved_tensors
        grad_x = grad_w1 = grad_w3 = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad, torch.cat([w1, w3], -1).transpose(1, 2), offsets)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w1, grad_w3 = _grouped_weight_grad(x, grad, offsets).chunk(2, -1)
        return grad_x, grad_w1, grad_w3, None


class _SwiGLU(torch.autograd.Function):
    """h (R, 2F) = [gate | up] -> silu(gate) * up, times scale (R,) per row if given. Saves only h and
    scale (autograd's ops would keep gate, silu, up and the scaled up); the backward evaluates silu
    again and uses silu's fused backward kernel."""

    @staticmethod
    def forward(ctx, h, scale):
        ctx.save_for_backward(h, scale)
        gate, up = h.chunk(2, -1)
        out = F.silu(gate).mul_(up)
        return out if scale is None else out.mul_(scale[:, None])

    @staticmethod
    def backward(ctx, grad):
        h, scale = ctx.saved_tensors
        gate, up = h.chunk(2, -1)
        scaled = grad if scale is None else grad * scale[:, None]
        silu = F.silu(gate)
        grad_h = torch.cat([torch.ops.aten.silu_backward(scaled * up, gate), scaled * silu], -1)
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[1]:
            grad_scale = silu.mul_(up).mul_(grad).sum(-1)
        return grad_h, grad_scale


def swiglu_experts(x: torch.Tensor, w1, w3, w2, counts: torch.Tensor, row_weights=None) -> torch.Tensor:
    """x (N, D) sorted by expert, counts (E,) rows per expert -> (N, D), each row times its routing
    weight (row_weights (N,), if given). w1 and w3 run as one grouped GEMM (_GateUp). The weight
    scales the hidden row when F <= D (fine-grained experts) and the output row otherwise: the same
    product, one elementwise pass over the narrower."""
    offsets = counts.cumsum(0).to(torch.int32)
    h = _GateUp.apply(x, w1, w3, offsets)
    scale_hidden = row_weights is not None and w1.shape[-1] <= x.shape[-1]
    hidden = _SwiGLU.apply(h, row_weights.to(h.dtype) if scale_hidden else None)
    y = grouped_mm(hidden, w2, offsets)
    if row_weights is None or scale_hidden:
        return y
    return y * row_weights[:, None].to(y.dtype)


class _GatherRows(torch.autograd.Function):
    """x (N, D) -> (N k, D): row i is x[order[i] // k], the token of the i-th (token, choice) slot in
    expert order. Its backward is sum_rows: a permutation and a sum, no scattered accumulation (serial on
    the CPU, atomic adds on GPUs)."""

    @staticmethod
    def forward(ctx, x, order, k):
        ctx.save_for_backward(order)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return _SumRows.apply(grad, order, ctx.k), None, None


class _SumRows(torch.autograd.Function):
    """y (N k, D) in expert order -> (N, D): each token's k rows summed. The adjoint of _GatherRows,
    which is its backward. One embedding_bag over the inverse permutation reads each token's k rows
    where they lie: no (N k, D) copy in token order (on the CPU 10x faster than a copy and a sum)."""

    @staticmethod
    def forward(ctx, y, order, k):
        ctx.save_for_backward(order)
        ctx.k = k
        slots = torch.arange(order.numel(), device=order.device)
        slot_rows = torch.empty_like(order).scatter_(0, order, slots)
        return F.embedding_bag(slot_rows.view(-1, k), y, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return _GatherRows.apply(grad, order, ctx.k), None, None


def gather_rows(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    return _GatherRows.apply(x, order, k)


def sum_rows(y: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    return _SumRows.apply(y, order, k)


def sort_by_expert(indices: torch.Tensor, num_experts: int):
    """indices (N, k) -> (order: the (token, choice) slots sorted by expert, stable; counts (E,))."""
    flat = indices.flatten()
    return flat.argsort(stable=True), torch.bincount(flat, minlength=num_experts)


class Router(nn.Module):
    """x -> top-k experts and their weights. score: "softmax" (Mixtral) or "sigmoid" (DeepSeek-V3);
    norm_topk: divide the k weights by their sum; scale: multiply them by it (routed_scaling_factor).
    With balance_bias the buffer expert_bias (E,) fp32 is added to the scores for the choice of the
    k experts only, never to their weights; the trainer updates it (update_expert_bias) when
    router_bias_rate > 0. Sigmoid routers always carry it (zero unless updated), as GLM-4-MoE's and
    DeepSeek-V3's do, so that their checkpoints map one to one."""

    def __init__(self, dim: int, num_experts: int, top_k: int, score: str = "softmax",
                 norm_topk: bool = True, scale: float = 1.0, balance_bias: bool = False):
        super().__init__()
        self.top_k, self.score, self.norm_topk, self.scale = top_k, score, norm_topk, scale
        self.gate = nn.Linear(dim, num_experts, bias=False)
        if balance_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor):
        """x (N, D) -> logits (N, E) fp32, weights (N, k) fp32, indices (N, k). In fp32 whatever the
        model's dtype: input and gate weight are cast before the matmul (Megatron's moe_router_dtype)."""
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = torch.softmax(logits, dim=-1) if self.score == "softmax" else torch.sigmoid(logits)
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
        indices = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights * self.scale, indices


@torch.no_grad()
def update_expert_bias(model: nn.Module, load, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2; Megatron-Core's sign update): each
    router's expert_bias += rate * sign(mean load - load of the expert). `load` (layers, E): the step's
    share (or count) of the top-k assignments per expert, over the whole step's tokens (all micro-batches
    and data-parallel ranks), so every rank makes the same update. The bias is kept in fp32 (a bf16
    cast of the module would make it so). The routers are the model's balanced ones, in layer order."""
    routers = [m for m in model.modules() if isinstance(m, Router) and m.expert_bias is not None]
    load = torch.as_tensor(load, dtype=torch.float64)
    offsets = torch.sign(load.mean(-1, keepdim=True) - load)
    for router, offset in zip(routers, offsets, strict=True):
        bias = router.expert_bias
        router.expert_bias = (bias.float() + rate * offset.to(bias.device, torch.float32))


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP, (silu(x w1^T) * x w3^T) w2^T: the shared experts and the feed-forward of the
    dense layers (ModelConfig.dense_layers)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    def __init__(self, num_experts: int, dim: int, expert_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, expert_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, expert_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, expert_dim, dim))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), indices/weights (N, k) -> (N, D) = sum_k weights * expert_indices(x)."""
        k = indices.shape[1]
        order, counts = sort_by_expert(indices, self.num_experts)
        rows = swiglu_experts(gather_rows(x, order, k), self.w1, self.w3, self.w2, counts,
                              weights.flatten()[order])
        return sum_rows(rows, order, k)


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


def layer_router_stats(logits: torch.Tensor, indices: torch.Tensor, score: str = "softmax"):
    """One layer's (counts (E,), prob_sum (E,), z_sum (), entropy_sum ()) for router logits (N, E),
    indices (N, k). The probabilities are the softmax of the logits, or with sigmoid scores the
    scores normalised to sum 1 per token (DeepSeek-V3's balance loss)."""
    E = logits.shape[-1]
    counts = torch.bincount(indices.flatten(), minlength=E).to(torch.float32)
    if score == "softmax":
        probs, log_probs = torch.softmax(logits, dim=-1), torch.log_softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
        log_probs = probs.detach().clamp_min(1e-30).log()
    z_sum = torch.logsumexp(logits, dim=-1).square().sum()
    with torch.no_grad():
        entropy_sum = -(probs * log_probs).sum()
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
    """Routed experts, and with shared_dim > 0 a shared SwiGLU every token passes through (times
    sigmoid(x w_gate^T), a (1, D) gate, with shared_gate)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, expert_dim: int, score: str = "softmax",
                 norm_topk: bool = True, scale: float = 1.0, balance_bias: bool = False,
                 shared_dim: int = 0, shared_gate: bool = False):
        super().__init__()
        self.router = Router(dim, num_experts, top_k, score, norm_topk, scale, balance_bias)
        self.experts = Experts(num_experts, dim, expert_dim)
        self.shared = SwiGLU(dim, shared_dim) if shared_dim else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_dim and shared_gate else None

    @classmethod
    def from_config(cls, cfg) -> "MoE":
        balance_bias = cfg.router_bias_rate > 0 or cfg.router_score == "sigmoid"
        return cls(cfg.dim, cfg.num_experts, cfg.top_k, cfg.expert_dim, cfg.router_score, cfg.router_norm_topk,
                   cfg.router_scale, balance_bias, cfg.shared_expert_dim, cfg.shared_expert_gate)

    def forward(self, x: torch.Tensor):
        """x (B, T, D) -> (B, T, D), and this layer's router stats (see layer_router_stats)."""
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, indices = self.router(flat)
        out = self.experts(flat, indices, weights).view_as(x)
        if self.shared is not None:
            shared = self.shared(x)
            out = out + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * shared)
        return out, layer_router_stats(logits, indices, self.router.score)

