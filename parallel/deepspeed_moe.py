"""DeepSpeed's classic capacity-based MoE (GShard, DeepSpeed-MoE) in place of the dropless experts:

    parallel.moe_impl=deepspeed  parallel.capacity_factor=C

deepspeed.moe.sharded_moe.MOELayer puts the tokens into fixed (E, capacity, D) buffers, exchanges them
with equal-split all-to-alls over the ep group and combines the results. An expert takes at most
capacity = max(ceil(k N / E * C), 4) of a rank's N tokens; the rest of its assignments are dropped
(k=2: top2gating, first choices before second ones; other k: topkgating, highest probabilities
first) and a token's remaining weights are renormalised. With C large enough that nothing is dropped
(C >= E / k suffices) the layer equals the dropless one. All ranks must route the same number of
tokens (equal buffers), as the trainer's fixed micro-batch shape guarantees.

Routing stays the model's Router. DeepSpeed's TopKGate would compute its own logits with its own
weight; here a stand-in gate receives the router's choice as logits log(w) on the k chosen experts and
-inf elsewhere, so DeepSpeed's softmax and top-k select exactly the router's experts with its weights
(and pass their gradients back), and DeepSpeed's capacity logic decides what is dropped. DeepSpeed's
l_aux is not used: the auxiliary losses come from model.moe.RouterStats.

The local experts are three batched GEMMs over (E/ep, ep x capacity, D) with the stacked w1, w3, w2,
which keep the dropless layer's names, slicing and DeepSpeed tags (expert_parallel.ExpertLayer).
Only parallel.tp=1: with tp > 1 DeepSpeed's MOELayer splits each expert's capacity over the tp ranks,
which leaves every tp rank with a partial expert gradient that DeepSpeed does not sum over tp.
"""

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import MOELayer, top2gating, topkgating
from torch import nn

from .deepspeed_internals import set_moe_layer_ep_group
from .expert_parallel import ExpertLayer
from .layout import LayoutError

MIN_CAPACITY = 4  # deepspeed.moe.layer.MoE's default


class RoutedGate(nn.Module):
    """TopKGate's place in MOELayer. MOELayer calls gate(tokens, input[1], sparse_routes, use_tutel);
    its second input here is the router's (indices, weights)."""

    def __init__(self, num_experts: int, capacity_factor: float):
        super().__init__()
        self.num_experts, self.capacity_factor, self.ep_group = num_experts, capacity_factor, None

    def _set_ep_group(self, group):
        self.ep_group = group

    def forward(self, tokens, routing, sparse_routes: bool = True, use_tutel: bool = False):
        indices, weights = routing
        k = indices.shape[1]
        logits = weights.new_full((indices.shape[0], self.num_experts), float("-inf"))
        logits = logits.scatter(1, indices, weights.float().log())
        args = (self.capacity_factor, MIN_CAPACITY, True, self.ep_group)  # drop_tokens=True
        if k == 2:
            return top2gating(logits, *args, top2_2nd_expert_sampling=False, sparse_routes=sparse_routes)
        return topkgating(logits, k, *args, sparse_routes=sparse_routes)


class DeepSpeedExperts(ExpertLayer):
    def __init__(self, experts, layout, capacity_factor: float):
        if layout.tp > 1:
            raise LayoutError(f"parallel.moe_impl=deepspeed needs parallel.tp=1, got parallel.tp={layout.tp} "
                              "(use moe_impl=dropless)")
        super().__init__(experts, layout)
        gate = RoutedGate(self.num_experts, float(capacity_factor))
        self.deepspeed_moe = MOELayer(gate, self._local_experts, self.expert_group_name, self.ep_size,
                                      self.num_local_experts)
        set_moe_layer_ep_group(self.deepspeed_moe, self.group)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), indices/weights (N, k) -> (N, D); assignments over capacity contribute nothing."""
        return self.deepspeed_moe(x, (indices, weights))

    def _local_experts(self, x: torch.Tensor) -> torch.Tensor:
        """(ep, E/ep, capacity, D) buffers from every ep rank for this rank's experts -> the same shape."""
        ep, local, capacity, dim = x.shape
        x = x.transpose(0, 1).reshape(local, ep * capacity, dim)
        h = F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3)
        return torch.bmm(h, self.w2).view(local, ep, capacity, dim).transpose(0, 1)
