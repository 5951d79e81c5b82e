"""Routing analysis the way the Mixtral paper does it (Jiang et al. 2024, arXiv 2401.04088, section 5).

For each corpus and MoE layer, from the router's top-k choice of every token (its first choice is the
expert of the highest routing score; Router.forward returns the k indices in that order):
    share[e]        fraction of all top-k assignments that went to expert e (the paper's Figure 7, first
                    and second choices counted); uniform routing gives 1/E
    repeat_first    fraction of consecutive token pairs (i, i+1) of one document whose first choices are
                    the same expert (the paper's Table 5, "first choice")
    repeat_any      fraction of those pairs whose top-k sets share at least one expert (Table 5, "first or
                    second choice")
Chance rates (the paper's "random assignments": every token's top-k set a uniformly random k-subset of
the E experts, its first choice uniform):
    first:  1 / E                                           (E = 8: 12.5 %)
    any:    1 - C(E - k, k) / C(E, k)   the sets of token i+1 that miss all k experts of token i are
            the k-subsets of the other E - k experts, C(E - k, k) of the C(E, k) equally likely sets
                                                            (E = 8, k = 2: 1 - 15/28 = 46.4 %, the paper's 46 %)
repeat_first_given_load = sum_e q_e^2 (q_e the share of first choices that went to e) is the chance rate
of a router that draws each token's first choice independently with the observed loads: a router that
sends most tokens to one expert repeats often without any temporal locality.

The top-k indices are read with forward hooks on each sparse layer's router (`block.moe.router`, a
model.moe.Router); the model is not changed. Dense layers and Mixture of Tokens layers have no
token choice and are not analysed.
"""

from math import comb

import torch

from model.moe import MoE


def chance_repeat_first(num_experts: int) -> float:
    return 1 / num_experts


def chance_repeat_any(num_experts: int, top_k: int) -> float:
    return 1 - comb(num_experts - top_k, top_k) / comb(num_experts, top_k)


class RouterRecorder:
    """`with RouterRecorder(model) as rec:` ... forward ...; `rec.take()` -> {layer: indices (N, k)} of the
    last forward pass, for every block whose feed-forward is a token-choice MoE."""

    def __init__(self, model):
        self.routers = {i: block.moe.router for i, block in enumerate(model.layers)
                        if isinstance(getattr(block, "moe", None), MoE)}
        self.indices, self.handles = {}, []

    def __enter__(self):
        for layer, router in self.routers.items():
            self.handles.append(router.register_forward_hook(
                lambda module, args, out, layer=layer: self.indices.__setitem__(layer, out[2].detach())))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def take(self) -> dict:
        indices, self.indices = self.indices, {}
        return indices


class RoutingCounts:
    """Sums over the tokens of one corpus, per analysed layer; `summary()` gives the rates."""

    def __init__(self, layers, num_experts: int, top_k: int):
        self.E, self.k = num_experts, top_k
        self.layers = list(layers)
        self.assigned = {layer: torch.zeros(num_experts, dtype=torch.long) for layer in self.layers}
        self.first = {layer: torch.zeros(num_experts, dtype=torch.long) for layer in self.layers}
        self.pairs = dict.fromkeys(self.layers, 0)
        self.same_first = dict.fromkeys(self.layers, 0)
        self.same_any = dict.fromkeys(self.layers, 0)

    def add(self, indices: dict, valid: torch.Tensor) -> None:
        """indices {layer: (B * T, k)} of rows (B, T) of consecutive tokens; valid (B, T) bool marks the
        real tokens (padding is neither counted nor paired)."""
        B, T = valid.shape
        valid = valid.cpu()
        pair = valid[:, 1:] & valid[:, :-1]
        for layer in self.layers:
            idx = indices[layer].cpu().view(B, T, self.k)
            chosen = idx[valid]
            self.assigned[layer] += torch.bincount(chosen.flatten(), minlength=self.E)
            self.first[layer] += torch.bincount(chosen[:, 0], minlength=self.E)
            a, b = idx[:, :-1][pair], idx[:, 1:][pair]  # (pairs, k): token i, token i+1
            self.pairs[layer] += int(pair.sum())
            self.same_first[layer] += int((a[:, 0] == b[:, 0]).sum())
            self.same_any[layer] += int((a[:, :, None] == b[:, None, :]).any(-1).any(-1).sum())

    def summary(self) -> dict:
        out = {}
        for layer in self.layers:
            first = self.first[layer].double() / max(1, int(self.first[layer].sum()))
            pairs = max(1, self.pairs[layer])
            out[str(layer)] = {
                "share": (self.assigned[layer].double() / max(1, int(self.assigned[layer].sum()))).tolist(),
                "first_share": first.tolist(),
                "repeat_first": self.same_first[layer] / pairs, "repeat_any": self.same_any[layer] / pairs,
                "repeat_first_given_load": float(first.square().sum()), "pairs": self.pairs[layer]}
        return out
