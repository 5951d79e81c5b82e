"""Expert parallelism: each MoE layer's experts split over the ep ranks of layout.ep_group.

    block.moe.experts = expert_parallel_experts(block.moe.experts, layout, parallel_cfg)   (parallelize.py)

parallel.moe_impl = "dropless" gives ExpertParallelExperts (here), "deepspeed" DeepSpeed's classic
capacity-based layer (parallel/deepspeed_moe.py, built on ExpertLayer). Both keep model.moe.Experts' interface
forward(x (N, D), indices (N, k), weights (N, k)) -> (N, D); the router stays replicated.

Dropless dispatch (Mixtral semantics: every token reaches its k experts, no capacity), per layer:
  1. sort the N*k (token, choice) rows by global expert: ep rank r owns experts [r E/ep, (r+1) E/ep),
     so the rows for each rank are contiguous
  2. all-to-all of the per-expert counts: each rank learns how many rows each peer sends to each of
     its experts
  3. all-to-all of the rows with those uneven splits (all_to_all_single with split sizes: NCCL and
     torch 2.13's gloo both take uneven and zero splits)
  4. regroup the received rows (ordered by source rank, then expert) by local expert, run the local
     experts as one grouped GEMM (model.moe.swiglu_experts), undo the regrouping
  5. all-to-all back, rows back to (token, choice) order, each token the sum of its k rows (the routing
     weights travel with the rows in step 3 and scale them in the experts, model.moe.swiglu_experts)
Autograd: the all-to-all's backward is the all-to-all with the splits swapped (Megatron's _AllToAll).

Parameters keep their single-device names w1, w3 (E/ep, D, F), w2 (E/ep, F, D): rows
[r E/ep, (r+1) E/ep) of the stacked tensors, marked
    p._shard = (0, ep_rank, ep)       trainer/checkpoint.py: this slice of the logical tensor
    p.allreduce = False               deepspeed.moe.utils.is_moe_param: DeepSpeed reduces the gradient
    p.group_name = "ep_size_{ep}"     over this group's expert-data-parallel ranks, not over dp
They are not tensor_model_parallel (they are replicated over tp: the grad norm counts them on tp rank 0).

Gradient scale. The trainer scales each rank's loss so that the dp ranks' losses add up to dp x the
global loss (trainer/loop.py); DeepSpeed sums dense gradients over dp and divides by dp. An expert's
gradient on its owner already holds the contributions of the tokens of all ep ranks (they come back
through the all-to-all); DeepSpeed 0.19 sums it over the expert-dp group and divides it by dp too
(engine._reduce_expert_gradients and ZeRO-1/2's average_tensor divide by the dp size, not the
expert-dp size), so every dp rank's tokens count once and the result equals one process: no rescaling
here. tests/test_trainer.py (ep2, tp2-ep2) checks it against a single-process run.
Gradient clipping: ZeRO-1/2 add the squared norms of the expert partitions over dp (right); DeepSpeed's
stage 0 (fp32 clip_grad_norm_, the bf16 optimizer) averages the ranks' norms, which differ under expert
parallelism, so with ep > 1 and clipping stage 0 drifts from one process: use zero_stage 1 or 2.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.moe import Experts, gather_rows, sort_by_expert, sum_rows, swiglu_experts

from .deepspeed_internals import MoEMarker


def expert_shard(full: torch.Tensor, layout) -> nn.Parameter:
    """This ep rank's experts (dim 0) of a stacked expert weight, tagged for DeepSpeed and checkpoints."""
    ep = layout.ep
    p = nn.Parameter(full.detach().chunk(ep, dim=0)[layout.ep_rank].clone(), requires_grad=full.requires_grad)
    p.allreduce, p.group_name = False, f"ep_size_{ep}"
    if ep > 1:
        p._shard = (0, layout.ep_rank, ep)
    return p


class ExpertLayer(MoEMarker):
    """What both expert-parallel layers share: this rank's slice of w1, w3, w2 and the ep group, in a
    module DeepSpeed's engine recognises as an MoE layer (parallel/deepspeed_internals.py)."""

    def __init__(self, experts: Experts, layout):
        super().__init__(experts.num_experts, layout.ep, layout.ep_group)
        self.w1, self.w3, self.w2 = (expert_shard(w, layout) for w in (experts.w1, experts.w3, experts.w2))


class _AllToAll(torch.autograd.Function):
    """Rows exchanged with uneven splits; backward: the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class ExpertParallelExperts(ExpertLayer):
    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), indices/weights (N, k) -> (N, D) = sum_k weights * expert_indices(x). N may differ
        between ranks, and be 0."""
        ep, local_experts, k = self.ep_size, self.num_local_experts, indices.shape[1]
        order, counts = sort_by_expert(indices, self.num_experts)
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(ep, local_experts)  # rows from (source rank, local expert)
        send_splits, recv_splits = counts.view(ep, -1).sum(1).tolist(), received.sum(1).tolist()

        rows = _AllToAll.apply(gather_rows(x, order, k), recv_splits, send_splits, self.group)
        row_weights = _AllToAll.apply(weights.flatten()[order, None], recv_splits, send_splits, self.group)
        expert = torch.arange(local_experts, device=x.device).repeat(ep).repeat_interleave(received.flatten())
        by_expert = expert.argsort(stable=True)
        y = self._experts(rows[by_expert], received.sum(0), row_weights[by_expert, 0])[by_expert.argsort()]
        y = _AllToAll.apply(y, send_splits, recv_splits, self.group)
        return sum_rows(y, order, k)

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        """The local experts on rows sorted by expert. A rank that receives no row still runs them on one
        zero row appended to its (empty) input: output and gradients stay zero. torch 2.13's _grouped_mm
        backward rejects an empty input, and the graph must still reach every parameter (ZeRO's gradient
        hooks are collectives) and both first all-to-alls (their backwards are collectives too)."""
        if rows.shape[0]:
            return swiglu_experts(rows, self.w1, self.w3, self.w2, counts, row_weights)
        one = counts.clone()
        one[-1] = 1
        return swiglu_experts(F.pad(rows, (0, 0, 0, 1)), self.w1, self.w3, self.w2, one,
                              F.pad(row_weights, (0, 1)))[:0]
