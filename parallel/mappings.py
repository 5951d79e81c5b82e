"""Tensor- and sequence-parallel communication as autograd functions, in mirror-image pairs.

Every function takes its process group explicitly. `group=None` (or a group of one rank) means no
parallelism: each function is then the identity, so single-device code runs the same path.

    function               forward                          backward
    copy_to_tp             identity                         all-reduce (sum)
    reduce_from_tp         all-reduce (sum)                 identity
    scatter_to_tp          keep own chunk of the last dim   all-gather the last dim
    gather_from_tp         all-gather the last dim          keep own chunk of the last dim
    scatter_to_sp          keep own chunk of `dim`          all-gather `dim`
    gather_from_sp         all-gather `dim`                 keep own chunk of `dim`
    reduce_scatter_to_sp   reduce-scatter `dim` (sum)       all-gather `dim`
    all_gather_from_sp     all-gather `dim`                 reduce-scatter `dim` (sum)

The model's activations are (B, T, D), so the sequence dimension of the sp functions defaults to 1;
the experts' token lists (N, D) use dim=0. Chunks are equal: the size of `dim` must be divisible
by the group's size. Rank r's chunk is the r-th one (rank order within the group).

Reduce-scatter and all-gather run on dim 0 of a contiguous buffer (`movedim` to the front and
back). torch 2.13's gloo implements reduce_scatter and all_gather_into_tensor (checked on 2 ranks),
as NCCL does, so no all-reduce fallback is needed; the `*_single` names are torch 2.13's, the
`*_tensor` names those of older releases (torch 2.11 on the GPU machines).
"""

import torch
import torch.distributed as dist

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _check_divisible(x: torch.Tensor, dim: int, world: int, what: str):
    if x.shape[dim] % world:
        raise ValueError(f"{what}: size {x.shape[dim]} of dim {dim} (shape {tuple(x.shape)}) is not "
                         f"divisible by the group size {world}")


# ---------------------------------------------------------------- raw collectives (no autograd)

def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    # a fresh buffer: the input may be shared (autograd hands one gradient to both branches of a sum)
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, op=op, group=group)
    return x


def split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of `dim`."""
    world = group_size(group)
    if world == 1:
        return x
    _check_divisible(x, dim, world, "split")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenation over the group's ranks along `dim`."""
    world = group_size(group)
    if world == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((world * front.shape[0], *front.shape[1:]))
    _all_gather(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of `dim` of the sum over the group's ranks."""
    world = group_size(group)
    if world == 1:
        return x
    _check_divisible(x, dim, world, "reduce_scatter")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // world, *front.shape[1:]))
    _reduce_scatter(out, front, group=group)
    return out.movedim(0, dim).contiguous()


# ---------------------------------------------------------------- autograd pairs

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Split(torch.autograd.Function):  # forward: own chunk; backward: all-gather
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):  # forward: all-gather; backward: own chunk
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, ctx.dim, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):  # forward: reduce-scatter; backward: all-gather
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


class _AllGather(torch.autograd.Function):  # forward: all-gather; backward: reduce-scatter
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.dim, ctx.group), None, None


def copy_to_tp(x, group):
    """Forward identity, backward all-reduce: enter a tensor-parallel region from replicated input."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    """Forward all-reduce, backward identity: leave a tensor-parallel region with partial sums."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x, group):
    """Forward keep this rank's chunk of the last dim, backward all-gather it."""
    return x if group_size(group) == 1 else _Split.apply(x, -1, group)


def gather_from_tp(x, group):
    """Forward all-gather the last dim, backward keep this rank's chunk."""
    return x if group_size(group) == 1 else _Gather.apply(x, -1, group)


def scatter_to_sp(x, group, dim: int = 1):
    """Forward keep this rank's chunk of the sequence, backward all-gather the sequence."""
    return x if group_size(group) == 1 else _Split.apply(x, dim, group)


def gather_from_sp(x, group, dim: int = 1):
    """Forward all-gather the sequence, backward keep this rank's chunk (the consumer is replicated,
    its gradient already complete on every rank)."""
    return x if group_size(group) == 1 else _Gather.apply(x, dim, group)


def reduce_scatter_to_sp(x, group, dim: int = 1):
    """Forward reduce-scatter the sequence (partial sums -> own chunk of the sum), backward
    all-gather: leave a tensor-parallel region into the sequence-sharded residual stream."""
    return x if group_size(group) == 1 else _ReduceScatter.apply(x, dim, group)


def all_gather_from_sp(x, group, dim: int = 1):
    """Forward all-gather the sequence, backward reduce-scatter: enter a tensor-parallel region
    from the sequence-sharded residual stream (each rank's gradient is a partial sum)."""
    return x if group_size(group) == 1 else _AllGather.apply(x, dim, group)
