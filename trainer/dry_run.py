"""One rank of the real layout, built in one CPU process without GPUs, peers or weights:

    python -m trainer RECIPE --dry-run [--rank R] [--world-size N] [--stage S] [key=value ...]

Runs what a training stage runs before its first step, for rank R of N (default: the SLURM job's
ranks): config and layout checks (slurm.submit.check), the process groups over torch's fake
process-group backend (every collective returns at once), the model built on the meta device and
parallelized (parallel/parallelize.py), and prints the rank's local parameter shapes, the stage's
sbatch lines, and the planner's per-GPU bytes (trainer/plan.py) next to the bytes this rank would
allocate for weights, gradients, fp32 master weights and Adam, counted from its meta parameters.
No weight is allocated, so a full-size model fits on a laptop. It stops before deepspeed.initialize:
DeepSpeed's engine moves the model to an accelerator and allocates ZeRO's flat buffers, which
neither meta tensors nor the fake backend can serve.
"""

import resource

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from .config import TRAINING_STAGES, ConfigError, model_config_of

GIB = 2 ** 30


def init_fake_process_group(rank: int, world_size: int) -> None:
    """torch.distributed over the fake backend of torch's test utilities (private: used only here)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def counted_bytes(model, layout, dtype: str, zero_stage: int) -> dict:
    """Bytes this rank allocates for its parameters' state, from their (meta) shapes, by DeepSpeed's
    rules: ZeRO >= 1 (or bf16) keeps an fp32 master copy and fp32 gradients of the partition it steps,
    Adam two fp32 moments of it; the partition is 1/dp of the dense and 1/expert_dp of the expert
    parameters (DeepSpeed tags experts with allreduce=False); ZeRO 2 also partitions the model's
    gradients."""
    b = 2 if dtype == "bf16" else 4
    local = partition = 0
    for p in model.parameters():
        local += p.numel()
        expert = not getattr(p, "allreduce", True)
        partition += p.numel() if zero_stage == 0 else p.numel() / (layout.expert_dp if expert else layout.dp)
    master = 4 * partition if (zero_stage > 0 or dtype == "bf16") else 0
    return {"params_local": local, "params_partitioned": partition, "weights": b * local, "optimizer": 8 * partition + master,
            "gradients": b * (partition if zero_stage == 2 else local) + (4 * partition if master else 0)}


def dry_run(cfg, recipe: str, overrides: list[str], rank: int, world_size: int = None, stage: str = None) -> dict:
    from parallel.layout import Layout
    from parallel.parallelize import parallelize
    from slurm.submit import check, job_shape, render

    from model import Mixtral

    from .engine import deepspeed_config, model_config_for, starting_source
    from .plan import plan_recipe

    stage = stage or next((s for s in cfg.stages if s in TRAINING_STAGES), None)
    if stage not in TRAINING_STAGES:
        raise ConfigError(f"--dry-run needs a training stage ({', '.join(TRAINING_STAGES)}); stages: {list(cfg.stages)}")
    check(cfg)
    nodes, tasks, _ = job_shape(cfg, stage)
    world_size = world_size or nodes * tasks
    scfg = cfg[stage]
    earlier = cfg.stages[:cfg.stages.index(stage)] if stage in cfg.stages else []
    if scfg.init is not None and scfg.init in [cfg[s].output for s in earlier if s in TRAINING_STAGES]:
        mcfg = model_config_of(cfg)  # an earlier stage of this recipe writes the init: the recipe's shape
    else:
        mcfg = model_config_for(model_config_of(cfg), scfg.init)
        starting_source(mcfg, scfg.init, scfg.seed)  # an HF folder's shards and shapes, a checkpoint's manifest
    cfg = cfg.copy()
    cfg.model = OmegaConf.structured(mcfg)
    layout = Layout.plan(cfg.parallel, mcfg, scfg, world_size, rank)  # LayoutError before anything else
    init_fake_process_group(rank, world_size)
    layout.build_groups()
    with torch.device("meta"):
        model = Mixtral(mcfg)
    parallelize(model, layout, cfg.parallel)

    print(f"[dry-run] {stage}: rank {rank} of {world_size}, layout {layout.describe()}")
    print(f"[dry-run] tp rank {layout.tp_rank}, dp rank {layout.dp_rank}, ep rank {layout.ep_rank}, "
          f"expert-dp rank {layout.expert_dp_rank}")
    for name, p in model.named_parameters():
        print(f"  {name:40s} {str(tuple(p.shape)):24s} {p.numel():>14,}")
    zero = deepspeed_config(scfg, layout, cfg.parallel.zero_stage)["zero_optimization"]["stage"]
    counted = counted_bytes(model, layout, scfg.dtype, zero)
    planned = plan_recipe(cfg, stage, world_size)
    print(f"[dry-run] local parameters: {counted['params_local']}, optimizer partition: "
          f"{counted['params_partitioned']:.0f}")
    print(f"[dry-run] per-GPU bytes ({scfg.dtype}, ZeRO {zero}): planner vs counted from this rank's parameters")
    for key in ("weights", "gradients", "optimizer"):
        print(f"  {key:10s} planner {planned[key] / GIB:9.2f} GiB   counted {counted[key] / GIB:9.2f} GiB")
    print(f"  planner peak (with activations and buckets) {planned['peak'] / GIB:.2f} GiB")
    sbatch = [line for line in render(cfg, stage, recipe, overrides).splitlines() if line.startswith("#SBATCH")]
    print("[dry-run] sbatch:\n" + "\n".join(sbatch))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"[dry-run] peak RSS of this process: {peak_kib / 2 ** 20:.2f} GiB")
    dist.destroy_process_group()
    return {"counted": counted, "planned": planned}
