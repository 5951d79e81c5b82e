"""Rewrite a single-device Mixtral in place for a Layout (torchtitan's order), before DeepSpeed wraps it:

    parallelize(model, layout, cfg.parallel)
      1. tensor (+ sequence) parallelism by a plan keyed on module names (TP_PLAN below)
      2. expert parallelism: each layers.i.moe.experts replaced by parallel/expert_parallel.py's module
      3. with sp: gradients of the parameters every tp rank holds whole are summed over tp
      4. activation checkpointing: none | full (recompute whole blocks) | selective (op-level: keep matmul
         and attention outputs, recompute the element-wise work)

Layouts of the activations between modules (tp ranks r of `tp`):
    residual stream h (B, T, D)    replicated; with sp sequence-sharded (B, T/tp, D) (rank r: chunk r)
    attention input                copy_to_tp once (bwd all-reduce); with sp all_gather_from_sp once
                                   (fwd all-gather, bwd reduce-scatter), then wq/wk/wv column-parallel
                                   by heads (num_heads/tp query, num_kv_heads/tp key/value heads; the
                                   model's Attention reads T and the head counts from its inputs and
                                   weights, so it runs unchanged, rotary included, on the full sequence)
    wo                             row-parallel: all-reduce, with sp reduce-scatter of the sequence
    tok_embeddings                 vocab-parallel: all-reduce, with sp reduce-scatter of the sequence
    norms, router                  replicated; with sp they see this rank's tokens only
    experts                        replicated over tp (each rank computes its tokens: all of them, or
                                   its sequence chunk with sp); expert_tp: hidden size F split over tp
    Mixture of Tokens (moe_type=tokens): controller replicated like the router; its experts by
                                   parallel/mot.py (expert_tp, sp) and parallel/mot_expert_parallel.py (ep)
    output                         column-parallel, not gathered: logits (B, T, V/tp) stay vocab-
                                   sharded for vocab_parallel_cross_entropy (with sp it all-gathers
                                   its input sequence first)
With sp, the router statistics are sums over this rank's tokens: `reduce_router_stats` adds them
over tp before the auxiliary losses, so they equal the single-device values.
"""

from fnmatch import fnmatch
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from model.moe import Experts, RouterStats
from model.mot import MixtureExperts, MixtureOfTokens

from .layers import ColumnParallelLinear, RowParallelLinear, TensorParallelExperts, VocabParallelEmbedding
from .mappings import all_gather_from_sp, all_reduce, copy_to_tp, reduce_from_tp
from .mot import TensorParallelMixtureExperts, shard_mix_mask


def prepare_attention_input(attention: nn.Module, group, sequence_parallel: bool) -> nn.Module:
    """Bring the attention's input x (its first argument) into the tensor-parallel region once for the
    three projections that share it (torchtitan's PrepareModuleInput; Megatron fuses QKV instead)."""
    def enter(module, args):
        x = all_gather_from_sp(args[0], group) if sequence_parallel else copy_to_tp(args[0], group)
        return (x, *args[1:])

    attention.register_forward_pre_hook(enter)
    return attention


def tensor_parallel_plan(layout) -> dict:
    """Module-name pattern (fnmatch) -> function(module) -> the module to put in its place."""
    g, sp = layout.tp_group, layout.sp
    heads = lambda m: ColumnParallelLinear.from_linear(m, g, input_is_prepared=True)  # noqa: E731
    plan = {
        "tok_embeddings": lambda m: VocabParallelEmbedding.from_embedding(m, g, sequence_parallel=sp),
        "layers.*.attention": lambda m: prepare_attention_input(m, g, sp),
        "layers.*.attention.wq": heads,
        "layers.*.attention.wk": heads,
        "layers.*.attention.wv": heads,
        "layers.*.attention.wo": lambda m: RowParallelLinear.from_linear(m, g, input_is_parallel=True,
                                                                         sequence_parallel=sp),
        "output": lambda m: ColumnParallelLinear.from_linear(m, g, gather_output=False, sequence_parallel=sp),
    }
    if layout.expert_tp:
        plan["layers.*.moe.experts"] = lambda m: (TensorParallelMixtureExperts if isinstance(m, MixtureExperts)
                                                  else TensorParallelExperts).from_experts(m, g, sp)
    return plan


def apply_plan(model: nn.Module, plan: dict) -> None:
    """Replace (or modify) every module whose name matches a pattern; every pattern must match."""
    targets = [(name, style) for name, _ in model.named_modules()
               for pattern, style in plan.items() if fnmatch(name, pattern)]
    unused = [p for p in plan if not any(fnmatch(name, p) for name, _ in targets)]
    if unused:
        raise ValueError(f"tensor-parallel plan: {unused} matched no module of {type(model).__name__}")
    for name, style in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, style(getattr(parent, child)))


def expert_parallel_experts(experts: nn.Module, layout, parallel_cfg) -> nn.Module:
    """The expert-parallel replacement of one model.moe.Experts, its weights sliced to this ep rank:
    parallel/expert_parallel.py's dropless module or, with moe_impl=deepspeed, parallel/deepspeed_moe.py's
    (both keep the interface of model.moe.Experts) over layout.ep_group."""
    if type(experts) is MixtureExperts:
        if parallel_cfg.moe_impl == "deepspeed":
            raise ValueError("model.moe_type=tokens needs parallel.moe_impl=dropless")
        from .mot_expert_parallel import ExpertParallelMixtureExperts
        return ExpertParallelMixtureExperts(experts, layout)
    if type(experts) is not Experts:
        raise TypeError(f"expert parallelism needs model.moe.Experts, got {type(experts).__name__}: "
                        "parallel.expert_tp combines with neither parallel.ep > 1 nor moe_impl=deepspeed")
    if parallel_cfg.moe_impl == "deepspeed":
        from .deepspeed_moe import DeepSpeedExperts
        return DeepSpeedExperts(experts, layout, parallel_cfg.capacity_factor)
    from .expert_parallel import ExpertParallelExperts
    return ExpertParallelExperts(experts, layout)


def apply_expert_parallel(model: nn.Module, layout, parallel_cfg) -> None:
    """The expert-parallel plug point: with ep > 1 (or DeepSpeed's classic MoE) each
    layers.i.moe.experts becomes its expert_parallel_experts. Nothing to do (and nothing imported)
    otherwise."""
    if layout.ep == 1 and parallel_cfg.moe_impl == "dropless":
        return
    for block in model.layers:
        if not block.dense:
            block.moe.experts = expert_parallel_experts(block.moe.experts, layout, parallel_cfg)


def sum_replicated_grads_over_tp(model: nn.Module, group) -> None:
    """Under sp every tp rank holds the norms, the router (and the experts unless expert_tp) whole
    but feeds them only its own tokens: a hook sums their gradient over tp before it reaches .grad,
    so DeepSpeed's data-parallel reduction (which runs in backward hooks) sees the full gradient.
    The hooks are registered at the model's first forward: a tensor hook belongs to the tensor it was
    registered on, and a model parallelized on the meta device gets its real tensors afterwards
    (parallel/materialize.py)."""
    def register(module, args):
        for p in model.parameters():
            if p.requires_grad and not getattr(p, "tensor_model_parallel", False):
                p.register_hook(lambda grad: all_reduce(grad, group))
        handle.remove()

    handle = model.register_forward_pre_hook(register)


SAVED_BY_SELECTIVE = {  # outputs kept by selective checkpointing: the matmuls and attention
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.moe_train.grouped_mm.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def _run_checkpointed(context_fn, block, *inputs):
    if not torch.is_grad_enabled():  # evaluation: nothing to recompute
        return block(*inputs)
    return checkpoint(block, *inputs, use_reentrant=False, context_fn=context_fn)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """full: each block keeps only its input and recomputes all of its forward in backward.
    selective (torchtitan's op-level policy): each block keeps the outputs of its matmuls, grouped
    GEMMs and attention (SAVED_BY_SELECTIVE) and recomputes only the cheap element-wise work between
    them (norms, rotary, SwiGLU's activation, the router's softmax): most of full's memory saving on
    activations of the norm/activation kind, almost none of its recompute FLOPs."""
    choices = {"none": None, "full": noop_context_fn,
               "selective": partial(create_selective_checkpoint_contexts, _selective_policy)}
    if mode not in choices:
        raise ValueError(f"parallel.activation_checkpointing must be one of {sorted(choices)}, got {mode!r}")
    model.run_block = None if mode == "none" else partial(_run_checkpointed, choices[mode])


def parallelize(model: nn.Module, layout, parallel_cfg) -> nn.Module:
    """Rewrite `model` (a single-device Mixtral, on the meta device or with its weights) in place;
    returns it. On the meta device it only slices shapes: parallel/materialize.py then fills the shards."""
    if layout.tp > 1:
        apply_plan(model, tensor_parallel_plan(layout))
    apply_expert_parallel(model, layout, parallel_cfg)
    if layout.sp:
        sum_replicated_grads_over_tp(model, layout.tp_group)
        for block in model.layers:
            if isinstance(getattr(block, "moe", None), MixtureOfTokens):  # dense layers have no moe
                shard_mix_mask(block, layout.tp_group)
    apply_activation_checkpointing(model, parallel_cfg.activation_checkpointing)
    return model


def reduce_router_stats(stats: RouterStats, layout) -> RouterStats:
    """The router statistics of the tokens of the whole tp group. Under sp each tp rank routes its own
    T/tp tokens: counts, prob_sum, z_sum and entropy_sum are summed over tp (reduce_from_tp: fwd all-reduce, bwd
    identity, so each rank's gradient reaches its own tokens). num_tokens is already the full count
    (the model sees every token id). Without sp the stats are already whole: returned as they are."""
    if not layout.sp:
        return stats
    g = layout.tp_group
    return RouterStats(all_reduce(stats.counts, g), reduce_from_tp(stats.prob_sum, g),
                       reduce_from_tp(stats.z_sum, g), stats.num_tokens, all_reduce(stats.entropy_sum, g))
