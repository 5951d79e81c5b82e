"""Mixture of Tokens (model/mot.py) under tensor and expert parallelism; data parallelism needs nothing
(each rank forms its groups inside its own micro-batch, the same micro-batches as one process that
accumulates them, data/stream.py).

The controller stays replicated, like the sparse router. Only model.mot.MixtureExperts is replaced,
keeping its interface mixed (E, M, D) -> (E, M, D), M = this rank's groups x positions:
  TensorParallelMixtureExperts   each expert's hidden size F split over tp (w1, w3 on dim 2, w2 on dim 1,
                                 as TensorParallelExperts): copy_to_tp in, reduce_from_tp out; with sp each
                                 rank holds its sequence chunk's mixtures, all-gathered over tp for the
                                 experts and reduce-scattered back.
  ExpertParallelMixtureExperts   (parallel/mot_expert_parallel.py) rank r of ep holds experts [r E/ep, (r+1) E/ep) (expert_parallel.py's
                                 shards, names and DeepSpeed tags). Every rank mixes its own tokens for all
                                 E experts; one all-to-all brings each owner its experts' mixtures from
                                 every rank of the ep group, it runs them as one grouped GEMM, and a second
                                 all-to-all returns the outputs. Every expert gets exactly one mixture per
                                 group and position: the splits are even, M E/ep rows per peer (M may
                                 differ between ranks).
Under sp the residual stream holds T/tp positions per rank; a mixture never crosses positions, so the
layer runs on its chunk unchanged once `shard_mix_mask` has cut the mask to the same chunk.
"""

import torch
from torch import nn

from model.mot import MixtureExperts

from .layers import TensorParallelExpertWeights
from .mappings import all_gather_from_sp, copy_to_tp, reduce_from_tp, reduce_scatter_to_sp, split


class TensorParallelMixtureExperts(TensorParallelExpertWeights, MixtureExperts):
    def forward(self, mixed: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            partial = super().forward(all_gather_from_sp(mixed, self.group, 1))
            return reduce_scatter_to_sp(partial, self.group, 1)
        return reduce_from_tp(super().forward(copy_to_tp(mixed, self.group)), self.group)


def shard_mix_mask(block: nn.Module, group) -> None:
    """Under sp a block's MoT layer sees this rank's sequence chunk: cut its mix_mask (B, T) alike."""
    def cut(module, args):
        if len(args) < 2 or args[1] is None:
            return None
        return (args[0], split(args[1], 1, group), *args[2:])

    block.moe.register_forward_pre_hook(cut)
