"""Mixture of Tokens' experts under expert parallelism (see parallel/mot.py for the scheme). A module of
its own because expert_parallel.py imports DeepSpeed, which only ep > 1 needs."""

import torch
import torch.distributed as dist

from model.moe import swiglu_experts

from .expert_parallel import ExpertLayer, _AllToAll


class ExpertParallelMixtureExperts(ExpertLayer):
    def forward(self, mixed: torch.Tensor) -> torch.Tensor:
        E, M, D = mixed.shape
        ep, local = self.ep_size, self.num_local_experts
        sizes = torch.empty(ep, dtype=torch.long, device=mixed.device)  # M of each rank
        dist.all_to_all_single(sizes, torch.full_like(sizes, M), group=self.group)
        send = [local * M] * ep
        recv = [local * m for m in sizes.tolist()]
        rows = _AllToAll.apply(mixed.reshape(E * M, D), recv, send, self.group)
        # rows: per source rank, (local experts, its M) -> per local expert, all ranks' rows
        pieces = [p.view(local, -1, D) for p in rows.split(recv)]
        by_expert = torch.cat(pieces, dim=1)
        counts = torch.full((local,), by_expert.shape[1], dtype=torch.long, device=mixed.device)
        out = swiglu_experts(by_expert.reshape(-1, D), self.w1, self.w3, self.w2, counts).view_as(by_expert)
        back = torch.cat([p.reshape(-1, D) for p in out.split(sizes.tolist(), dim=1)])
        return _AllToAll.apply(back, send, recv, self.group).view(E, M, D)
