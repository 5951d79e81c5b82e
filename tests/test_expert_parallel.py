"""Expert-parallel MoE layers against transformers' MixtralSparseMoeBlock, on real gloo ranks.

The test process builds a model.moe.MoE, the HF block with its weights (tests/test_model.py checks
the single-device MoE against that block) and tokens, and runs the block on all tokens. The tokens are
split unevenly over the ranks (some get none); each rank runs the expert-parallel layer on its own.
The block's results are the reference for each rank's outputs and input gradients, for the router
gradient summed over the ranks, and for this rank's experts' gradients summed over the ranks that hold
the same experts (the expert-data-parallel reduction DeepSpeed does in training).
"""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from conftest import sparse_moe_state
from distributed import run_ranks
from model.moe import MoE
from parallel.parallelize import expert_parallel_experts
from parallel.layout import Layout, LayoutError


@dataclass
class Case:
    name: str
    experts: int = 8
    top_k: int = 2
    dim: int = 32
    expert_dim: int = 48
    sizes: tuple = (13, 27)  # tokens per rank (2 ranks), or 4 ranks
    idle: int = 0  # router forced so that the last `idle` experts get no token
    moe_impl: str = "dropless"
    capacity_factor: float = 1.0
    kept: int = None  # every token picks experts 0 then 1: DeepSpeed's capacity serves only `kept` of them


CASES_2 = [
    Case("top2"),
    Case("idle-rank-sends-and-receives-nothing", sizes=(40, 0), idle=4),
    Case("fine-grained-16x-top4", experts=16, top_k=4, expert_dim=16, sizes=(0, 33)),
    # capacity >= any expert's load: nothing dropped, so DeepSpeed's classic layer equals the reference
    Case("deepspeed-top2", sizes=(20, 20), moe_impl="deepspeed", capacity_factor=8.0),
    Case("deepspeed-top4", experts=16, top_k=4, expert_dim=16, sizes=(24, 24), moe_impl="deepspeed",
         capacity_factor=16.0),
    # capacity max(ceil(8 tokens / 8 experts x 0.25 x k=2), 4) = 4: each rank's first 4 tokens are served
    Case("deepspeed-drops-beyond-capacity", sizes=(8, 8), moe_impl="deepspeed", capacity_factor=0.25, kept=4),
]
CASES_4 = [
    Case("top2", sizes=(7, 0, 21, 12)),
    Case("idle-experts", sizes=(0, 9, 30, 1), idle=2),
    Case("fine-grained-16x-top4", experts=16, top_k=4, expert_dim=16, sizes=(5, 17, 0, 3)),
]


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def reference(case: Case) -> dict:
    """The case's weights and tokens, and transformers' block's outputs and gradients on all tokens.
    Computed once in the test process: the ranks need not import transformers."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock


    torch.manual_seed(0)
    E, D, N, hidden = case.experts, case.dim, sum(case.sizes), case.expert_dim
    moe = MoE(D, E, case.top_k, hidden)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, g = torch.randn(N, D), torch.randn(N, D)
    if case.idle:  # positive inputs, negative logits for the idle experts
        x = x.abs()
        with torch.no_grad():
            moe.router.gate.weight.abs_()
            moe.router.gate.weight[E - case.idle:] *= -1
    if case.kept is not None:  # positive inputs, logits: expert 0 > expert 1 > 0 > the others
        x = x.abs()
        with torch.no_grad():
            moe.router.gate.weight.copy_(-moe.router.gate.weight.abs())
            moe.router.gate.weight[:2] = torch.tensor([[0.2], [0.1]])
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=hidden,
                                                num_local_experts=E, num_experts_per_tok=case.top_k))
    block.load_state_dict(sparse_moe_state(moe), strict=True)
    x_ref = x.clone().requires_grad_()
    out = block(x_ref[None])[0]
    (out * g).sum().backward()
    gate_up, down = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
    return dict(case=case, state=moe.state_dict(), x=x, g=g, out=out.detach(), x_grad=x_ref.grad,
                router_grad=block.gate.weight.grad, w1=gate_up[:, :hidden].transpose(1, 2),
                w3=gate_up[:, hidden:].transpose(1, 2), w2=down.transpose(1, 2))


def check_case(ref: dict, layout: Layout, rank: int) -> dict:
    case = ref["case"]
    E = case.experts
    moe = MoE(case.dim, E, case.top_k, case.expert_dim)
    moe.load_state_dict(ref["state"])
    names = [n for n, _ in moe.named_parameters()]
    moe.experts = expert_parallel_experts(moe.experts, layout, parallel_cfg(layout.ep, case))
    assert [n for n, _ in moe.named_parameters()] == names  # checkpoints and HF export map by name
    mine = slice(sum(case.sizes[:rank]), sum(case.sizes[:rank + 1]))
    xs = ref["x"][mine].clone().requires_grad_()
    out, stats = moe(xs[None])
    counts = stats[0]
    (out[0] * ref["g"][mine]).sum().backward()

    served = slice(None, case.kept)
    if case.kept is not None:
        assert out[0][case.kept:].abs().max() == 0
    errors = {"output": relative_error(out[0][served], ref["out"][mine][served]),
              "input grad": relative_error(xs.grad[served], ref["x_grad"][mine][served])}
    if case.kept is not None:  # the router's and experts' gradients lack the dropped tokens
        return errors
    router_grad = moe.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)
    errors["router grad"] = relative_error(router_grad, ref["router_grad"])
    local = slice(layout.ep_rank * E // layout.ep, (layout.ep_rank + 1) * E // layout.ep)
    for name, p in moe.experts.named_parameters():
        assert p.allreduce is False and p.group_name == f"ep_size_{layout.ep}"
        assert getattr(p, "_shard", None) == ((0, layout.ep_rank, layout.ep) if layout.ep > 1 else None)
        grad = p.grad.clone()
        dist.all_reduce(grad, group=layout.expert_dp_group)
        errors[f"{name} grad"] = relative_error(grad, ref[name][local])
    assert counts[E - case.idle:].sum() == 0
    return errors


def parallel_cfg(ep: int, case: Case):
    return SimpleNamespace(tp=1, ep=ep, sp=False, expert_tp=False, moe_impl=case.moe_impl,
                           capacity_factor=case.capacity_factor)


def model_shape(num_experts: int):
    return SimpleNamespace(num_experts=num_experts, num_heads=4, num_kv_heads=4, vocab_size=64, dim=32)


def check_ranks(rank, world, plan):
    """plan: [(ep, [reference...])]; returns {(ep, case name): {what: relative error}}."""
    results = {}
    for ep, refs in plan:
        layout = Layout.build(parallel_cfg(ep, Case("")), model_shape(16), None, world, rank)
        for ref in refs:
            results[(ep, ref["case"].name)] = check_case(ref, layout, rank)
    return results


def assert_close(results, tol=1e-5):
    """results: one {(ep, case): {what: relative error}} per rank."""
    bad = {(rank, *key, what): err for rank, r in enumerate(results) for key, errors in r.items()
           for what, err in errors.items() if not err < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def test_expert_parallel_on_2_ranks_equals_transformers():
    refs = [reference(c) for c in CASES_2]
    deepspeed_at_ep1 = [r for r in refs if r["case"].moe_impl == "deepspeed"]
    assert_close(run_ranks(2, check_ranks, [(2, refs), (1, deepspeed_at_ep1)]))


def test_expert_parallel_on_4_ranks_equals_transformers():
    """ep=4 (one expert-dp rank), then ep=2 inside dp=4 (expert gradients summed over 2 replicas)."""
    refs = [reference(c) for c in CASES_4]
    assert_close(run_ranks(4, check_ranks, [(4, refs), (2, refs[:1])]))


def test_num_experts_not_divisible_by_ep_is_named():
    with pytest.raises(LayoutError, match=r"model.num_experts \(6\) is not divisible by parallel.ep \(4\)"):
        Layout.plan(parallel_cfg(4, Case("")), model_shape(6), None, world_size=4)
