"""Model + optimizer + DeepSpeed engine for one training stage.

Order (torchtitan's): build the single-device model on the meta device, parallelize it there
(tensor/sequence/expert parallelism, activation checkpointing), materialize only this rank's shards
from the starting weights, then hand it to DeepSpeed for ZeRO data parallelism, bf16 with fp32
master weights, gradient accumulation and clipping.
"""

import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from model import Mixtral, ModelConfig
from model.hf import HFFolder, model_config_from_hf
from model.init import PrefixedSource, RandomInit, StateDictSource
from parallel.layout import Layout
from parallel.materialize import materialize
from parallel.parallelize import parallelize

from .checkpoint import CheckpointSource, latest_checkpoint
from .distributed import device
from .tasks import accumulation_steps


def torch_dtype(name: str) -> torch.dtype:
    """A stage's dtype setting ("bf16" or "fp32") as a torch dtype."""
    return torch.bfloat16 if name == "bf16" else torch.float32


def starting_point(init):
    """'hf' for an HF Mixtral folder, 'checkpoint' for one of ours (a run folder or a step), or None."""
    if init is None:
        return None, None
    path = Path(init)
    if (path / "config.json").is_file():
        return "hf", path
    ckpt = path if (path / "manifest.json").is_file() else latest_checkpoint(path / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"init: {init} is neither an HF Mixtral folder nor a run folder "
                                "with checkpoints")
    return "checkpoint", ckpt


def model_config_for(mcfg: ModelConfig, init) -> ModelConfig:
    """The recipe's model shape, or the shape of the HF folder a stage starts from."""
    kind, path = starting_point(init)
    if kind == "hf":
        import json
        cfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
        cfg.attention = mcfg.attention
        return cfg
    return mcfg


def starting_source(mcfg: ModelConfig, init, seed: int):
    """Where the starting weights come from: random (per-block init with `seed`), an HF folder or one
    of our checkpoints; each answers read(name, full_shape, offsets, shape) for any box (model/init.py)."""
    kind, path = starting_point(init)
    if kind is None:
        return RandomInit(mcfg.init_std, seed)
    return HFFolder(path) if kind == "hf" else CheckpointSource(path)


def build_model(mcfg: ModelConfig, init, seed: int, layout: Layout, pcfg,
                dtype: torch.dtype = torch.float32, source=None) -> Mixtral:
    """This rank's parallelized model with its starting weights (random with `seed`, or from `init`, or
    from `source` when given: any source of boxes, model/init.py).

    Built on the meta device, parallelized there (slicing meta tensors costs nothing), then each
    parameter is allocated on the device in `dtype` and filled with only the box of the logical tensor
    this rank holds (parallel/materialize.py): no rank ever holds the whole model. bf16 training
    materializes in bf16 directly: DeepSpeed casts the model to bf16 and derives its fp32 master
    weights from those, so the result is the same and no fp32 copy passes through memory."""
    source = source or starting_source(mcfg, init, seed)
    with torch.device("meta"):
        model = Mixtral(mcfg)
    parallelize(model, layout, pcfg)
    return materialize(model, source, device(), dtype)



def build_wrapped_model(make, decoder_cfg: ModelConfig, scfg, own_parts, layout: Layout, pcfg):
    """build_model for a model that holds our decoder as `.decoder` next to parts of its own (model/
    multimodal.py, model/reranker.py): make() builds it on the meta device, the decoder is parallelized,
    every parameter materialized in the stage's dtype from the stage's latest checkpoint, or else the
    decoder from `scfg.init` (starting_source) and the other parts from own_parts(), a state dict."""
    resume = latest_checkpoint(Path(scfg.output) / "checkpoints")
    source = CheckpointSource(resume) if resume else PrefixedSource(
        "decoder.", starting_source(decoder_cfg, scfg.init, scfg.seed), StateDictSource(own_parts()))
    with torch.device("meta"):
        model = make()
    parallelize(model.decoder, layout, pcfg)
    return materialize(model, source, device(), torch_dtype(scfg.dtype))


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices, none on norms (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [dict(name="decay", params=decay, weight_decay=weight_decay),  # names: DeepSpeed's MoE
            dict(name="no_decay", params=no_decay, weight_decay=0.0)]      # group split needs them


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(scfg: DictConfig, layout: Layout, zero_stage: int) -> dict:
    """ZeRO partitions over data parallelism: with one data-parallel rank it only adds flat-buffer
    copies (about 100 ms a step on the tiny preset, bench/RESULTS.md), so fp32 uses stage 0 there
    (bf16 keeps ZeRO: its fp32 master weights and Adam state live in ZeRO's optimizer)."""
    zero_stage = 0 if layout.dp == 1 and scfg.dtype == "fp32" else zero_stage
    return {
        "train_batch_size": scfg.global_batch_size,
        "train_micro_batch_size_per_gpu": scfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(scfg, layout),
        "gradient_clipping": scfg.grad_clip,
        # 50 M-element gradient buckets (DeepSpeed's default is 500 M: 1.9 GB of fp32 per bucket)
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": 50_000_000,
                              "allgather_bucket_size": 50_000_000},
        "bf16": {"enabled": scfg.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: Mixtral, scfg: DictConfig, pcfg: DictConfig, layout: Layout):
    """AdamW + warmup/cosine -> deepspeed.initialize for a model from build_model (parallelized, on
    its device). Returns the DeepSpeed engine."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from parallel.deepspeed_internals import skip_gradient_allreduce

    groups = split_params_into_different_moe_groups_for_optimizer(
        param_groups(model, scfg.weight_decay))
    # fused: one kernel over all tensors (torch's default on the CPU is a loop over them: 87 M fp32
    # parameters step in 3.4 s there against 0.5 s fused, bench/RESULTS.md)
    optimizer = torch.optim.AdamW(groups, lr=scfg.lr, betas=(scfg.beta1, scfg.beta2), eps=scfg.eps,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, scfg.warmup_steps, scfg.steps, scfg.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=layout.mpu,
        config=deepspeed_config(scfg, layout, pcfg.zero_stage))
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        keep_fp32_grad_norm(engine)
        if layout.dp == 1:
            skip_gradient_allreduce(engine)
    return engine


def keep_fp32_grad_norm(engine):
    """DeepSpeed's fp32 ZeRO-0 step clips with runtime.utils.clip_grad_norm_, which drops the norm it
    computes and sums fp32 per-tensor norms: torch's fp32 vector_norm on the CPU is off by ~6e-5
    relative on a 3 M-element tensor (the debug preset's embedding), so one process reported a norm
    that no other layout did. This clips with global_grad_norm (fp64, as ZeRO-1/2 compute it) and keeps
    the norm for get_global_grad_norm()."""
    from parallel.deepspeed_internals import replace_fp32_clipping

    def clip_and_norm():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params, engine.mpu)
        coef = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
        return norm
    replace_fp32_clipping(engine, clip_and_norm)


def global_grad_norm(params, mpu) -> torch.Tensor:
    """L2 norm of the gradients of the whole (single-device) model, in fp64: tensor-parallel shards
    (p.tensor_model_parallel) count on every tp rank, parameters every tp rank holds whole on tp rank 0
    only; the squares are summed over the tp group. For ZeRO 0, where every data-parallel rank holds
    the same reduced gradients (expert parallelism needs ZeRO 1/2, trainer/config.py)."""
    tp_rank = mpu.get_tensor_model_parallel_rank() if mpu is not None else 0
    square = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
    for p in params:
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            square += p.grad.detach().double().square().sum()
    if mpu is not None and mpu.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(square, group=mpu.get_tensor_model_parallel_group())
    return square.sqrt()
