"""Tensor-parallel layers and the vocab-parallel cross entropy equal their unsharded counterparts.

On real gloo ranks (2 and 4, one spawn each), every rank builds the same unsharded module and data
from one seed, computes the reference (an nn.Linear, nn.Embedding, model.moe.Experts,
F.cross_entropy) and the sharded version, and compares outputs and input/weight gradients, the
sharded weight gradients all-gathered back to full shape. With sequence parallelism the rank's
sequence chunk of the reference is compared.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distributed import run_ranks
from model.moe import Experts
from parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_log_probs
from parallel.layers import (ColumnParallelLinear, RowParallelLinear, TensorParallelExperts,
                             VocabParallelEmbedding)
from parallel.mappings import all_gather

B, T, D_IN, D_OUT, V = 2, 8, 16, 24, 32


def close(a, b, what, tol=1e-5):
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert err < tol, f"{what}: relative error {err:.2e}"
    return err


def full_grad(param, group):
    dim = param._shard[0]
    return all_gather(param.grad, dim, group)


def seq_chunk(t, rank, world, dim=1):
    return t.chunk(world, dim=dim)[rank]


def check_column(group, rank, world, sp, gather_output):
    torch.manual_seed(0)
    ref = nn.Linear(D_IN, D_OUT, bias=False)
    x, g = torch.randn(B, T, D_IN), torch.randn(B, T, D_OUT)
    xr = x.clone().requires_grad_(True)
    (ref(xr) * g).sum().backward()

    layer = ColumnParallelLinear.from_linear(ref, group, gather_output=gather_output, sequence_parallel=sp)
    assert layer.weight.tensor_model_parallel and layer.weight._shard == (0, rank, world)
    xs = (seq_chunk(x, rank, world) if sp else x).clone().requires_grad_(True)
    y = layer(xs)
    expected = ref(x).detach()
    g_local = g if gather_output else g.chunk(world, dim=-1)[rank]
    close(y, expected if gather_output else expected.chunk(world, dim=-1)[rank], "column output")
    (y * g_local).sum().backward()
    close(xs.grad, seq_chunk(xr.grad, rank, world) if sp else xr.grad, "column input grad")
    close(full_grad(layer.weight, group), ref.weight.grad, "column weight grad")


def check_row(group, rank, world, sp, input_is_parallel):
    torch.manual_seed(1)
    ref = nn.Linear(D_IN, D_OUT, bias=False)
    x, g = torch.randn(B, T, D_IN), torch.randn(B, T, D_OUT)
    xr = x.clone().requires_grad_(True)
    (ref(xr) * g).sum().backward()

    layer = RowParallelLinear.from_linear(ref, group, input_is_parallel=input_is_parallel,
                                          sequence_parallel=sp)
    assert layer.weight._shard == (1, rank, world)
    xs = (x.chunk(world, dim=-1)[rank] if input_is_parallel else x).clone().requires_grad_(True)
    y = layer(xs)
    expected = ref(x).detach()
    close(y, seq_chunk(expected, rank, world) if sp else expected, "row output")
    (y * (seq_chunk(g, rank, world) if sp else g)).sum().backward()
    grad_in = xr.grad.chunk(world, dim=-1)[rank] if input_is_parallel else xr.grad
    close(xs.grad, grad_in, "row input grad")
    close(full_grad(layer.weight, group), ref.weight.grad, "row weight grad")


def check_embedding(group, rank, world, sp):
    torch.manual_seed(2)
    ref = nn.Embedding(V, D_IN)
    tokens = torch.randint(0, V, (B, T))
    tokens[0, :4] = torch.tensor([0, V - 1, V // 2 - 1, V // 2])  # both ends of every shard boundary
    g = torch.randn(B, T, D_IN)
    (ref(tokens) * g).sum().backward()

    layer = VocabParallelEmbedding.from_embedding(ref, group, sequence_parallel=sp)
    y = layer(tokens)
    expected = ref(tokens).detach()
    close(y, seq_chunk(expected, rank, world) if sp else expected, "embedding output")
    (y * (seq_chunk(g, rank, world) if sp else g)).sum().backward()
    close(full_grad(layer.weight, group), ref.weight.grad, "embedding weight grad")


def check_experts(group, rank, world, sp):
    torch.manual_seed(3)
    E, D, Fh, N, k = 4, 16, 32, 12, 2
    ref = Experts(E, D, Fh)
    for w in (ref.w1, ref.w3, ref.w2):
        nn.init.normal_(w, std=0.2)
    x, g = torch.randn(N, D), torch.randn(N, D)
    indices = torch.randn(N, E).topk(k, dim=-1).indices
    indices[:, 0] = torch.where(indices[:, 0] == E - 1, 0, indices[:, 0])  # expert E-1 only as 2nd choice
    weights = torch.rand(N, k)
    xr, wr = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    (ref(xr, indices, wr) * g).sum().backward()

    layer = TensorParallelExperts.from_experts(ref, group, sequence_parallel=sp)
    assert layer.w1._shard == (2, rank, world) and layer.w2._shard == (1, rank, world)
    pick = (lambda t: seq_chunk(t, rank, world, dim=0)) if sp else (lambda t: t)
    xs, ws = pick(x).clone().requires_grad_(True), pick(weights).clone().requires_grad_(True)
    y = layer(xs, pick(indices), ws)
    close(y, pick(ref(x, indices, weights).detach()), "experts output")
    (y * pick(g)).sum().backward()
    close(xs.grad, pick(xr.grad), "experts input grad")
    close(ws.grad, pick(wr.grad), "experts routing-weight grad")
    for name in ("w1", "w3", "w2"):
        close(full_grad(getattr(layer, name), group), getattr(ref, name).grad, f"experts {name} grad")


def check_cross_entropy(group, rank, world):
    torch.manual_seed(4)
    logits = 3 * torch.randn(B, T, V)
    targets = torch.randint(0, V, (B, T))
    targets[0, :3] = -100
    targets[1, :world] = torch.arange(world) * (V // world)  # a target in every shard
    g = torch.rand(B, T)

    ref_logits = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.view(-1, V), targets.view(-1), reduction="none").view(B, T)
    (ref * g).sum().backward()
    shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(shard, targets, group)
    close(loss, ref.detach(), "cross entropy")
    (loss * g).sum().backward()
    close(shard.grad, ref_logits.grad.chunk(world, dim=-1)[rank], "cross entropy grad")

    ref_logits.grad = None
    mask = targets != -100
    ref_lp = torch.log_softmax(ref_logits, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * mask
    (ref_lp * g).sum().backward()
    shard.grad = None
    lp = vocab_parallel_log_probs(shard, targets, group)
    close(lp, ref_lp.detach(), "log probs")
    (lp * g).sum().backward()
    close(shard.grad, ref_logits.grad.chunk(world, dim=-1)[rank], "log probs grad")


def layer_checks(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    for sp in (False, True):
        check_column(group, rank, world_size, sp, gather_output=False)
        check_row(group, rank, world_size, sp, input_is_parallel=True)
        check_embedding(group, rank, world_size, sp)
        check_experts(group, rank, world_size, sp)
    check_column(group, rank, world_size, False, gather_output=True)
    check_row(group, rank, world_size, False, input_is_parallel=False)
    check_cross_entropy(group, rank, world_size)
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layers_equal_unsharded(world_size):
    assert all(run_ranks(world_size, layer_checks))


def test_cross_entropy_on_one_device():
    torch.manual_seed(5)
    logits = torch.randn(3, 5, 11, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, 0] = -100
    loss = vocab_parallel_cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.float().view(-1, 11), targets.view(-1), reduction="none").view(3, 5)
    close(loss, ref, "cross entropy")
    g_ref, = torch.autograd.grad(ref.sum(), logits)
    g, = torch.autograd.grad(loss.sum(), logits)
    assert g.dtype == torch.bfloat16
    close(g.float(), g_ref.float(), "cross entropy grad")
