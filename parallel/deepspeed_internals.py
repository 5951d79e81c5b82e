"""Every private DeepSpeed (0.19) symbol the project relies on, each behind one small function.

Each is used only where DeepSpeed offers no public way to do the same; the docstrings say why.
`INTERNALS` names every symbol with what we rely on (its parameters, or a line of its source);
tests/test_deepspeed_internals.py checks them all against the installed DeepSpeed, so an upgrade that
removes or changes one fails there, naming the symbol, instead of somewhere deep in training.
"""

import torch
from deepspeed.moe.layer import MoE
from torch import nn

# symbol -> what we rely on: ("params", the first names of its signature), ("source", a line it holds)
# or ("attribute", None): it exists
INTERNALS = {
    "deepspeed.utils.groups.mpu": ("attribute", None),
    "deepspeed.utils.groups.expert_tensor_parallel_world_size": ("attribute", None),
    "deepspeed.utils.groups._create_expert_data_and_model_parallel":
        ("params", ["expert_parallel_size_", "mpu"]),
    "deepspeed.utils.groups._get_expert_parallel_group_dict": ("params", []),
    "deepspeed.utils.groups._get_expert_parallel_group": ("params", ["group_name"]),
    "deepspeed.utils.groups._get_expert_parallel_group_ranks": ("params", ["group_name"]),
    "deepspeed.utils.groups._get_expert_data_parallel_group": ("params", ["group_name"]),
    "deepspeed.utils.groups._get_expert_data_parallel_group_ranks": ("params", ["group_name"]),
    "deepspeed.utils.groups._release_process_group_references": ("params", ["group"]),
    "deepspeed.runtime.engine.DeepSpeedEngine._configure_distributed_model":
        ("source", "if isinstance(module, MoE):"),
    "deepspeed.runtime.engine.DeepSpeedEngine._take_model_step": ("source", "self.clip_fp32_gradients()"),
    "deepspeed.runtime.engine.DeepSpeedEngine.get_global_grad_norm": ("source", "self._global_grad_norm"),
    "deepspeed.runtime.engine.DeepSpeedEngine._backward_epilogue": ("source", "self.allreduce_gradients()"),
    "deepspeed.runtime.engine.DeepSpeedEngine._get_gradients_for_reduction":
        ("source", "param.grad = torch.zeros(param.size(), dtype=param.dtype, device=param.device)"),
    "deepspeed.moe.sharded_moe.MOELayer._set_ep_group": ("params", ["self", "ep_group"]),
    "deepspeed.moe.sharded_moe.top2gating": ("params", ["logits", "capacity_factor", "min_capacity",
                                                       "drop_tokens", "ep_group", "top2_2nd_expert_sampling",
                                                       "sparse_routes"]),
    "deepspeed.moe.sharded_moe.topkgating": ("params", ["logits", "k", "capacity_factor", "min_capacity",
                                                       "drop_tokens", "ep_group"]),
    "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state":
        ("source", "if not self._hp_optimizer_states_linked:"),
    "deepspeed.runtime.bf16_optimizer.BF16_Optimizer._lazy_init_hp_params_optimizer_state":
        ("source", "if not self._hp_optimizer_states_linked:"),
    "deepspeed.utils.tensor_fragment.safe_get_full_fp32_param": ("source", "_hp_mapping"),
}


# ---------------------------------------------------------------- expert-parallel groups

def expert_groups(ep: int, mpu, expert_tp_size: int) -> dict:
    """DeepSpeed's `ep_size_{ep}` groups, created from `mpu` if they do not exist yet: ranks and groups.

    The engine reduces expert gradients over groups it looks up by name in deepspeed.utils.groups
    (and its classic MoE uses them); the only way to have them be ours is to let DeepSpeed create them
    from our mpu and use its group objects. deepspeed.initialize creates them only while it wraps a
    model (too late for parallelize) and has no public getter. The builder also declares experts
    tensor-parallel; `expert_tp_size` sets what they really are (DeepSpeed's grad norm reads it)."""
    from deepspeed.utils import groups

    groups.mpu = mpu  # deepspeed.initialize sets the same; the group builder reads dp from it
    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_data_and_model_parallel(ep, mpu=mpu)
    groups.expert_tensor_parallel_world_size = expert_tp_size
    return dict(ep_ranks=list(groups._get_expert_parallel_group_ranks(name)),
                expert_dp_ranks=list(groups._get_expert_data_parallel_group_ranks(name)),
                ep_group=groups._get_expert_parallel_group(name),
                expert_dp_group=groups._get_expert_data_parallel_group(name))


def release_expert_groups() -> None:
    """Forget every group DeepSpeed registered: it keys expert groups by ep size only, so a process
    that builds a second layout with the same ep (tests) must drop the first one's. No public way."""
    from deepspeed.utils import groups

    groups._release_process_group_references()


# ---------------------------------------------------------------- MoE layers

class MoEMarker(MoE):
    """What DeepSpeed's engine needs to see in a model to turn its expert handling on (expert gradients
    reduced over the expert-data-parallel group, ZeRO partitions of the expert param groups): an
    instance of deepspeed.moe.layer.MoE (engine._configure_distributed_model tests isinstance; there is
    no registration API). MoE.__init__, which builds DeepSpeed's own gate and experts, is not run; the
    attributes the engine reads are set here."""

    def __init__(self, num_experts: int, ep_size: int, ep_group):
        nn.Module.__init__(self)
        self.num_experts, self.num_local_experts, self.ep_size = num_experts, num_experts // ep_size, ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.group = ep_group

    def set_deepspeed_parallelism(self, *args, **kwargs):
        """The engine calls this to create and attach the ep groups: expert_groups did."""


def set_moe_layer_ep_group(layer, group) -> None:
    """Give a deepspeed.moe.sharded_moe.MOELayer (and its gate) its ep group. MoE.__init__ does it via
    set_deepspeed_parallelism, which we skip (MoEMarker): _set_ep_group is the only setter."""
    layer._set_ep_group(group)


# ---------------------------------------------------------------- engine and optimizer

def replace_fp32_clipping(engine, clip_and_norm) -> None:
    """Make DeepSpeed's fp32 ZeRO-0 step clip with `clip_and_norm()` (which clips the gradients in place
    and returns their global norm) and report that norm from engine.get_global_grad_norm().

    The engine calls its clip_fp32_gradients between the gradient all-reduce and the optimizer step
    and drops the norm; there is no public hook at that point, and clipping outside the engine would
    need a second copy of its accumulation-boundary logic."""
    def clip_fp32_gradients():
        engine._global_grad_norm = clip_and_norm()

    engine.clip_fp32_gradients = clip_fp32_gradients


def skip_gradient_allreduce(engine) -> None:
    """Replace the engine's gradient all-reduce by the one part of it that a single data-parallel rank
    without ZeRO needs: at the accumulation boundary, a trainable parameter without a gradient gets a
    zero one (DeepSpeed's _get_gradients_for_reduction does so before reducing), so that AdamW steps
    it, weight decay and moments, as at any other layout (SELECT and RERANK never use the LM head).
    The rest flattened every gradient into buckets, all-reduced them over the one-rank group and
    copied them back: at the 86 M bench shape a 200 MB bucket and two passes over the gradients a
    step. Public no_sync() would also stop the accumulation bookkeeping and forbid engine.step()."""
    def allreduce_gradients(bucket_size=None):
        if not engine.is_gradient_accumulation_boundary():
            return
        for p in engine.module.parameters():
            if p.requires_grad and p.numel() and p.grad is None:
                p.grad = torch.zeros_like(p)

    engine.allreduce_gradients = allreduce_gradients


def relink_optimizer_state(optimizer) -> None:
    """Re-create ZeRO's / the bf16 optimizer's per-parameter views of Adam's state. DeepSpeed links
    them once, lazily, after stepping its first param group, so the views of later groups stay empty
    until the next step; safe_get/set_full_optimizer_state read through these views. No public way."""
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def holds_fp32_fragment(param: torch.Tensor) -> bool:
    """Whether ZeRO / the bf16 optimizer manage this parameter's fp32 master and Adam state (then
    deepspeed.utils.safe_set_full_* address them, also when this rank holds no fragment of it;
    otherwise the torch optimizer's state does). Only the private mapping attribute says so."""
    return hasattr(param, "_hp_mapping")
