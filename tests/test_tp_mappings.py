"""Each tensor-parallel mapping, forward and backward, gives the known sums across real gloo ranks.

Rank r of a group of W ranks feeds (r + 1) * something; the expected results are written by hand
from S = 1 + 2 + ... + W. At 4 ranks the checks run in two groups of 2 ([0, 1] and [2, 3]) and in
the world group, so the group argument is honoured.
"""

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from parallel import mappings as M


def _leaf(t):
    return t.clone().requires_grad_(True)


def check_group(group, members: list[int]):
    W, r = len(members), members.index(dist.get_rank())
    S = W * (W + 1) / 2
    c = r + 1.0
    base = torch.arange(2 * 4 * W * 3, dtype=torch.float32).view(2, 4 * W, 3)  # same on every rank
    ones = lambda *shape: torch.ones(*shape)  # noqa: E731

    # copy_to_tp: forward identity, backward all-reduce
    x = _leaf(c * base)
    y = M.copy_to_tp(x, group)
    assert torch.equal(y, c * base)
    y.backward(c * ones(*base.shape))
    assert torch.equal(x.grad, S * ones(*base.shape))

    # reduce_from_tp: forward all-reduce, backward identity
    x = _leaf(c * base)
    y = M.reduce_from_tp(x, group)
    assert torch.equal(y, S * base)
    y.backward(c * base)
    assert torch.equal(x.grad, c * base)
    assert torch.equal(x, c * base)  # the input is not reduced in place

    # scatter_to_tp / gather_from_tp along the last dim
    full = torch.arange(2 * 3 * W, dtype=torch.float32).view(2, 3 * W)
    x = _leaf(full)
    y = M.scatter_to_tp(x, group)
    assert torch.equal(y, full[:, 3 * r:3 * (r + 1)])
    y.backward(c * ones(2, 3))
    assert torch.equal(x.grad, torch.cat([(i + 1.0) * ones(2, 3) for i in range(W)], dim=1))

    x = _leaf(c * ones(2, 3))
    y = M.gather_from_tp(x, group)
    assert torch.equal(y, torch.cat([(i + 1.0) * ones(2, 3) for i in range(W)], dim=1))
    y.backward(full)
    assert torch.equal(x.grad, full[:, 3 * r:3 * (r + 1)])

    # scatter_to_sp / gather_from_sp along the sequence (dim 1 of (B, T, D))
    chunk = lambda t: t[:, 4 * r:4 * (r + 1)]  # noqa: E731
    x = _leaf(base)
    y = M.scatter_to_sp(x, group)
    assert torch.equal(y, chunk(base))
    y.backward(c * ones(2, 4, 3))
    assert torch.equal(x.grad, torch.cat([(i + 1.0) * ones(2, 4, 3) for i in range(W)], dim=1))

    x = _leaf(c * ones(2, 4, 3))
    y = M.gather_from_sp(x, group)
    assert torch.equal(y, torch.cat([(i + 1.0) * ones(2, 4, 3) for i in range(W)], dim=1))
    y.backward(base)
    assert torch.equal(x.grad, chunk(base))

    # reduce_scatter_to_sp: forward reduce-scatter, backward all-gather
    x = _leaf(c * base)
    y = M.reduce_scatter_to_sp(x, group)
    assert torch.equal(y, S * chunk(base))
    y.backward(c * ones(2, 4, 3))
    assert torch.equal(x.grad, torch.cat([(i + 1.0) * ones(2, 4, 3) for i in range(W)], dim=1))

    # all_gather_from_sp: forward all-gather, backward reduce-scatter
    x = _leaf(c * ones(2, 4, 3))
    y = M.all_gather_from_sp(x, group)
    assert torch.equal(y, torch.cat([(i + 1.0) * ones(2, 4, 3) for i in range(W)], dim=1))
    y.backward(c * base)
    assert torch.equal(x.grad, S * chunk(base))

    # the token dimension of the experts' (N, D) lists: dim 0
    x = _leaf(c * ones(3, 2))
    y = M.all_gather_from_sp(x, group, dim=0)
    assert torch.equal(y, torch.cat([(i + 1.0) * ones(3, 2) for i in range(W)], dim=0))
    y.backward(c * torch.arange(3.0 * W * 2).view(3 * W, 2))
    assert torch.equal(x.grad, S * torch.arange(3.0 * W * 2).view(3 * W, 2)[3 * r:3 * (r + 1)])

    with pytest.raises(ValueError, match="not divisible by the group size"):
        M.reduce_scatter_to_sp(torch.ones(2, 4 * W + 1, 3), group)


def mapping_checks(rank, world_size):
    world = list(range(world_size))
    check_group(dist.new_group(world), world)
    if world_size == 4:
        pairs = [[0, 1], [2, 3]]
        groups = [dist.new_group(p) for p in pairs]  # every rank creates every group, in order
        mine = rank // 2
        check_group(groups[mine], pairs[mine])
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_mappings_give_known_sums(world_size):
    assert all(run_ranks(world_size, mapping_checks))


def test_mappings_are_identities_without_a_group():
    x = torch.randn(2, 4, 3, requires_grad=True)
    for fn in (M.copy_to_tp, M.reduce_from_tp, M.scatter_to_tp, M.gather_from_tp, M.scatter_to_sp,
               M.gather_from_sp, M.reduce_scatter_to_sp, M.all_gather_from_sp):
        assert fn(x, None) is x
