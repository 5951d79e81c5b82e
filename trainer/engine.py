"""Model + optimizer + DeepSpeed engine for one training stage.

Order (torchtitan's): build the single-device model, load its starting weights, parallelize it
(tensor/sequence/expert parallelism, activation checkpointing), then hand it to DeepSpeed for ZeRO
data parallelism, bf16 with fp32 master weights, gradient accumulation and clipping.
"""

import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from model import Mixtral, ModelConfig
from model.hf import import_hf, model_config_from_hf
from parallel.layout import Layout
from parallel.parallelize import parallelize

from .checkpoint import CheckpointReader, latest_checkpoint
from .tasks import accumulation_steps


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


def build_model(mcfg: ModelConfig, init, seed: int) -> Mixtral:
    """Single-device model with its starting weights (random with `seed`, or from `init`)."""
    model = Mixtral(mcfg)
    kind, path = starting_point(init)
    if kind is None:
        model.init_weights(seed)
    elif kind == "hf":
        _, state = import_hf(path)
        model.load_state_dict(state, strict=True)
    else:
        reader = CheckpointReader(path)
        state = {name: reader.read(f"model/{name}") for name in reader.names("model")}
        model.load_state_dict(state, strict=True)
    return model


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
    """parallelize -> AdamW + warmup/cosine -> deepspeed.initialize. Returns the DeepSpeed engine."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from .distributed import device

    parallelize(model, layout, pcfg)
    model.to(device())
    groups = split_params_into_different_moe_groups_for_optimizer(
        param_groups(model, scfg.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=scfg.lr, betas=(scfg.beta1, scfg.beta2), eps=scfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, scfg.warmup_steps, scfg.steps, scfg.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=layout.mpu,
        config=deepspeed_config(scfg, layout, pcfg.zero_stage))
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        keep_fp32_grad_norm(engine)
    return engine


def keep_fp32_grad_norm(engine):
    """DeepSpeed's fp32 ZeRO-0 path clips with runtime.utils.clip_grad_norm_ (tensor-parallel aware
    through the mpu) but drops the norm it computes; this keeps it for get_global_grad_norm()."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)
    engine.clip_fp32_gradients = clip_fp32_gradients
