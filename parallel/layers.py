"""Megatron-style tensor-parallel layers, each built from a single-device module by slicing its weight.

With tp ranks in `group`, rank r holds the r-th equal slice. Weights stay plain nn.Parameters under
their single-device names; each sharded one is marked for DeepSpeed and for checkpoints:
    p.tensor_model_parallel = True   DeepSpeed's is_model_parallel_parameter (runtime/utils.py): the
                                     grad norm counts it on every tp rank, replicated ones on tp rank 0
    p.partition_dim = dim            Megatron's name for the split dimension
    p._shard = (dim, rank, world)    this slice of the logical tensor (a list when split twice)

ColumnParallelLinear  y = x A^T, A (out, in) split on out:     x (B, T, in) -> y (B, T, out/tp)
    input:  replicated x -> copy_to_tp (bwd all-reduce); sequence_parallel: x (B, T/tp, in) ->
            all_gather_from_sp (fwd all-gather, bwd reduce-scatter); input_is_prepared: the caller
            already did one of these for several layers that share x (attention's wq/wk/wv).
    output: vocab/heads-sharded, or gather_output -> gather_from_tp (fwd all-gather the last dim).
RowParallelLinear     y = x A^T, A (out, in) split on in:      x (B, T, in/tp) -> y (B, T, out)
    input:  input_is_parallel: x already split on its last dim; else scatter_to_tp.
    output: partial sums -> reduce_from_tp (fwd all-reduce), or with sequence_parallel
            reduce_scatter_to_sp (fwd reduce-scatter of the sequence, bwd all-gather) -> (B, T/tp, out).
VocabParallelEmbedding  table (V, D) split on V; ids outside [r V/tp, (r+1) V/tp) give zeros, then
            reduce_from_tp, or with sequence_parallel reduce_scatter_to_sp -> (B, T/tp, D).
TensorParallelExperts   model.moe.Experts with each expert's hidden size F split over tp
            (w1, w3 (E, D, F/tp) on dim 2; w2 (E, F/tp, D) on dim 1); the tokens enter with
            copy_to_tp (or all_gather_from_sp of the token list) and the partial outputs leave with
            reduce_from_tp (or reduce_scatter_to_sp).
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.moe import Experts

from .mappings import (all_gather, all_gather_from_sp, copy_to_tp, gather_from_tp, group_rank, group_size,
                       reduce_from_tp, reduce_scatter_to_sp, scatter_to_tp)


def mark_sharded(param: nn.Parameter, dim: int, rank: int, world: int) -> nn.Parameter:
    """Record that `param` is slice `rank` of `world` equal slices of its logical tensor along `dim`."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    spec = (dim, rank, world)
    old = getattr(param, "_shard", None)
    param._shard = spec if old is None else [old, spec] if isinstance(old[0], int) else [*old, spec]
    return param


def shard_parameter(full: torch.Tensor, dim: int, group, what: str) -> nn.Parameter:
    """A new Parameter holding this rank's slice of `full` along `dim`, marked as sharded."""
    world, rank = group_size(group), group_rank(group)
    if full.shape[dim] % world:
        raise ValueError(f"{what}: size {full.shape[dim]} of dim {dim} is not divisible by tp ({world})")
    piece = full.detach().chunk(world, dim=dim)[rank].clone()
    param = nn.Parameter(piece, requires_grad=full.requires_grad)
    return mark_sharded(param, dim, rank, world) if world > 1 else param


def _no_bias(linear: nn.Linear, name: str):
    if linear.bias is not None:
        raise ValueError(f"{name}: a linear with a bias is not supported (Mixtral's linears have none)")


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, group, gather_output: bool = False,
                 sequence_parallel: bool = False, input_is_prepared: bool = False):
        super().__init__()
        self.weight, self.group = weight, group
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.input_is_prepared = input_is_prepared

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **options) -> "ColumnParallelLinear":
        _no_bias(linear, cls.__name__)
        weight = shard_parameter(linear.weight, 0, group, "ColumnParallelLinear out_features")
        return cls(weight, group, **options)

    def forward(self, x):
        if not self.input_is_prepared:
            x = all_gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        y = F.linear(x, self.weight)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, group, input_is_parallel: bool = True,
                 sequence_parallel: bool = False):
        super().__init__()
        self.weight, self.group = weight, group
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **options) -> "RowParallelLinear":
        _no_bias(linear, cls.__name__)
        weight = shard_parameter(linear.weight, 1, group, "RowParallelLinear in_features")
        return cls(weight, group, **options)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        partial = F.linear(x, self.weight)
        return reduce_scatter_to_sp(partial, self.group) if self.sequence_parallel \
            else reduce_from_tp(partial, self.group)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: nn.Parameter, group, sequence_parallel: bool = False):
        super().__init__()
        self.weight, self.group, self.sequence_parallel = weight, group, sequence_parallel
        self.vocab_start = group_rank(group) * weight.shape[0]

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group, **options) -> "VocabParallelEmbedding":
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("VocabParallelEmbedding: padding_idx and max_norm are not supported")
        weight = shard_parameter(embedding.weight, 0, group, "VocabParallelEmbedding num_embeddings")
        return cls(weight, group, **options)

    def forward(self, tokens):
        """tokens (B, T) -> (B, T, D), or (B, T/tp, D) with sequence_parallel."""
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        partial = F.embedding(local.masked_fill(outside, 0), self.weight)
        partial = partial.masked_fill(outside[..., None], 0.0)
        return reduce_scatter_to_sp(partial, self.group) if self.sequence_parallel \
            else reduce_from_tp(partial, self.group)


class TensorParallelExpertWeights:
    """The weights of a single-device experts class split over the tp ranks of `group`: each expert's
    hidden size F, w1, w3 (E, D, F/tp) on dim 2 and w2 (E, F/tp, D) on dim 1. Listed before that class
    (Experts or a subclass) so that this __init__ replaces the one that allocates the full weights, while
    the subclass's forward wraps the single-device forward (super().forward) in the tp collectives."""

    def __init__(self, w1, w3, w2, group, sequence_parallel: bool = False):
        nn.Module.__init__(self)
        self.num_experts = w1.shape[0]
        self.w1, self.w3, self.w2 = w1, w3, w2
        self.group, self.sequence_parallel = group, sequence_parallel

    @classmethod
    def from_experts(cls, experts: Experts, group, sequence_parallel: bool = False):
        what = f"{cls.__name__} expert_dim"
        return cls(shard_parameter(experts.w1, 2, group, what), shard_parameter(experts.w3, 2, group, what),
                   shard_parameter(experts.w2, 1, group, what), group, sequence_parallel)


class TensorParallelExperts(TensorParallelExpertWeights, Experts):
    def forward(self, x, indices, weights):
        """x (N, D), indices/weights (N, k) -> (N, D); with sequence_parallel N counts this rank's
        tokens only, and the experts run on the tokens of the whole tp group."""
        if self.sequence_parallel:
            x, weights = all_gather_from_sp(x, self.group, 0), all_gather_from_sp(weights, self.group, 0)
            partial = super().forward(x, all_gather(indices, 0, self.group), weights)
            return reduce_scatter_to_sp(partial, self.group, 0)
        x, weights = copy_to_tp(x, self.group), copy_to_tp(weights, self.group)
        return reduce_from_tp(super().forward(x, indices, weights), self.group)
