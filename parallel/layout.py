"""How the ranks are split: tensor (TP) x data (DP) parallel, experts over EP inside DP.

    layout = Layout.build(cfg.parallel, model_cfg, stage_cfg, world_size, rank)

`Layout.plan(...)` validates every degree against the model and batch shapes and computes the ranks;
it needs no torch.distributed, so configuration errors come first and name the field and numbers.
`layout.build_groups()` then creates the process groups once (every rank calls new_group for every
group, in the same order); `Layout.build` does both.

Rank order (Megatron's): tp fastest, then dp:   global rank = dp_rank * tp + tp_rank.
    tp group          the tp consecutive ranks that share a dp_rank
    dp group          the dp ranks that share a tp_rank (dense gradients are averaged over it)
    ep group          ep consecutive dp ranks (same tp_rank): experts are split over them
    expert-dp group   the dp / ep ranks (same tp_rank) that hold the same experts
This equals deepspeed.utils.groups._get_expert_parallel_ranks (E + M + D): `build_groups` lets
DeepSpeed create its `ep_size_{ep}` groups from `layout.mpu` (parallel/deepspeed_internals.py), checks
their ranks against these and uses DeepSpeed's group objects, so our expert layers and DeepSpeed's
expert-gradient reduction use the same communicators.

`layout.mpu` is the model-parallel unit `deepspeed.initialize(mpu=...)` expects; its "model
parallel" group is the tp group.
"""

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist


class LayoutError(ValueError):
    """A parallel degree does not fit the world size, the model or the batch; the message names it."""


def _check(ok: bool, message: str):
    if not ok:
        raise LayoutError(message)


@dataclass
class Layout:
    world_size: int
    rank: int
    tp: int = 1
    ep: int = 1
    sp: bool = False
    expert_tp: bool = False
    tp_group: Any = field(default=None, repr=False)  # set by build_groups
    dp_group: Any = field(default=None, repr=False)
    ep_group: Any = field(default=None, repr=False)
    expert_dp_group: Any = field(default=None, repr=False)

    # ------------------------------------------------------------ construction

    @classmethod
    def plan(cls, parallel, model, train, world_size: int, rank: int = 0) -> "Layout":
        """Validate and compute the ranks; no process group is created. `parallel` has tp, ep, sp,
        expert_tp (ParallelConfig); `model` the ModelConfig; `train` micro_batch_size,
        global_batch_size and seq_len (a training stage's config), or None to skip batch checks."""
        tp, ep = int(parallel.tp), int(parallel.ep)
        sp, expert_tp = bool(parallel.sp), bool(parallel.expert_tp)
        _check(tp >= 1, f"parallel.tp must be >= 1, got {tp}")
        _check(ep >= 1, f"parallel.ep must be >= 1, got {ep}")
        _check(0 <= rank < world_size, f"rank {rank} is outside the world size ({world_size})")
        _check(world_size % tp == 0, f"world size ({world_size}) is not divisible by parallel.tp ({tp})")
        dp = world_size // tp
        _check(dp % ep == 0, f"data-parallel size ({dp} = world size {world_size} / parallel.tp {tp}) "
                             f"is not divisible by parallel.ep ({ep})")
        _check(model.num_experts % ep == 0,
               f"model.num_experts ({model.num_experts}) is not divisible by parallel.ep ({ep})")
        sharded = {"num_heads": model.num_heads, "num_kv_heads": model.num_kv_heads,
                   "vocab_size": model.vocab_size, "dim": model.dim}
        if expert_tp:
            sharded["expert_dim"] = model.expert_dim
        for name, value in sharded.items():
            _check(value % tp == 0, f"model.{name} ({value}) is not divisible by parallel.tp ({tp})")
        _check(not sp or tp > 1, f"parallel.sp=true needs parallel.tp > 1, got parallel.tp={tp}")
        _check(not (expert_tp and ep > 1), "parallel.expert_tp=true with parallel.ep > 1 "
                                           f"(ep={ep}) is not supported: use one or the other")
        if train is not None:
            micro, glob = int(train.micro_batch_size), int(train.global_batch_size)
            _check(micro >= 1, f"micro_batch_size must be >= 1, got {micro}")
            _check(glob % (micro * dp) == 0,
                   f"global_batch_size ({glob}) is not divisible by micro_batch_size ({micro}) x dp ({dp})")
            _check(not sp or train.seq_len % tp == 0,
                   f"seq_len ({train.seq_len}) is not divisible by parallel.tp ({tp}); sequence "
                   "parallelism splits every sequence over the tp ranks")
        return cls(world_size, rank, tp, ep, sp, expert_tp)

    @classmethod
    def build(cls, parallel, model, train, world_size: int, rank: int) -> "Layout":
        return cls.plan(parallel, model, train, world_size, rank).build_groups()

    def build_groups(self) -> "Layout":
        """Create the tp, dp, ep and expert-dp groups (collective: every rank must call it)."""
        _check(dist.is_initialized(), "Layout.build_groups needs torch.distributed to be initialised")
        _check(dist.get_world_size() == self.world_size,
               f"torch.distributed has {dist.get_world_size()} ranks, the layout {self.world_size}")
        for d in range(self.dp):
            group = dist.new_group(self.tp_ranks_of(d * self.tp))
            if d == self.dp_rank:
                self.tp_group = group
        for t in range(self.tp):
            group = dist.new_group(self.dp_ranks_of(t))
            if t == self.tp_rank:
                self.dp_group = group
        self._build_deepspeed_expert_groups()
        return self

    def _build_deepspeed_expert_groups(self):
        import deepspeed

        from .deepspeed_internals import expert_groups

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        # experts are tensor-parallel only with expert_tp (DeepSpeed's grad norm reads this)
        made = expert_groups(self.ep, self.mpu, expert_tp_size=self.tp if self.expert_tp else 1)
        ep_ranks, edp_ranks = made["ep_ranks"], made["expert_dp_ranks"]
        _check(ep_ranks == self.ep_ranks_of(self.rank) and edp_ranks == self.expert_dp_ranks_of(self.rank),
               f"DeepSpeed's ep_size_{self.ep} groups (ep {ep_ranks}, expert-dp {edp_ranks}) differ from the "
               f"layout's (ep {self.ep_ranks_of(self.rank)}, expert-dp {self.expert_dp_ranks_of(self.rank)})")
        self.ep_group, self.expert_dp_group = made["ep_group"], made["expert_dp_group"]

    # ------------------------------------------------------------ sizes and ranks

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def expert_dp(self) -> int:
        return self.dp // self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def expert_dp_rank(self) -> int:
        return self.dp_rank // self.ep

    def tp_ranks_of(self, rank: int) -> list[int]:
        start = rank - rank % self.tp
        return list(range(start, start + self.tp))

    def dp_ranks_of(self, rank: int) -> list[int]:
        return list(range(rank % self.tp, self.world_size, self.tp))

    def ep_ranks_of(self, rank: int) -> list[int]:
        d, t = rank // self.tp, rank % self.tp
        first = d - d % self.ep
        return [(first + e) * self.tp + t for e in range(self.ep)]

    def expert_dp_ranks_of(self, rank: int) -> list[int]:
        d, t = rank // self.tp, rank % self.tp
        return [(j * self.ep + d % self.ep) * self.tp + t for j in range(self.expert_dp)]

    def describe(self) -> dict:
        return dict(world_size=self.world_size, tp=self.tp, dp=self.dp, ep=self.ep, expert_dp=self.expert_dp,
                    sp=self.sp, expert_tp=self.expert_tp)

    @property
    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed 0.19 queries (runtime/engine.py, zero/stage_1_and_2.py,
    utils/groups.py, utils/bwc.py). Model parallel = tensor parallel (no pipeline). It deliberately has
    no get_sequence_parallel_* methods: those mean DeepSpeed-Ulysses, which rescales gradients."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def get_tensor_model_parallel_group(self):
        return self.layout.tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.layout.tp_ranks_of(self.layout.rank)[0]

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_data_parallel_group(self):
        return self.layout.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.layout.dp_ranks_of(self.layout.rank)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0
