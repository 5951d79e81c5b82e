"""Cross entropy over vocabulary-sharded logits, never gathering the full (…, V) logits (Megatron's).

    logits_shard (..., V/tp) on tp rank r holds the logits of vocabulary ids [r V/tp, (r+1) V/tp).
    loss = logsumexp(logits) - logits[target], computed from three all-reduces over the tp group of
    (...)-shaped tensors: the max (for stability), the target's logit (found on one rank, 0 elsewhere)
    and the sum of exponentials.
Backward, with no communication: d loss / d logits_shard = softmax_shard - onehot_shard(target).
Targets equal to ignore_index give loss 0 and gradient 0. group=None (or one rank) is plain
single-device cross entropy. Computed in fp32 whatever the logits' dtype.
"""

import torch
import torch.distributed as dist

from .mappings import all_reduce, group_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, ignore_index):
        vocab_shard = logits.shape[-1]
        logits_max = all_reduce(logits.max(dim=-1).values, group, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max[..., None]

        ignored = targets == ignore_index
        local = targets - group_rank(group) * vocab_shard
        elsewhere = (local < 0) | (local >= vocab_shard) | ignored  # target not in this shard
        local = local.masked_fill(elsewhere, 0)
        target_logit = shifted.gather(-1, local[..., None]).squeeze(-1).masked_fill(elsewhere, 0.0)
        target_logit = all_reduce(target_logit, group)

        exp = shifted.exp_()  # shifted is a fresh tensor: reuse its memory
        sum_exp = all_reduce(exp.sum(dim=-1), group)
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp[..., None])
        ctx.save_for_backward(softmax, local, elsewhere, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, elsewhere, ignored = ctx.saved_tensors
        grad = softmax.clone()
        hit = (~elsewhere).to(grad.dtype)
        grad.scatter_add_(-1, local[..., None], -hit[..., None])
        grad.mul_(grad_loss.masked_fill(ignored, 0.0)[..., None])
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, group=None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """logits_shard (..., V/tp), targets (...) int -> per-token loss (...) fp32, 0 where ignored."""
    if logits_shard.shape[:-1] != targets.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits_shard.shape)} and targets "
                         f"{tuple(targets.shape)} do not match")
    return _VocabParallelCrossEntropy.apply(logits_shard.float(), targets, group, ignore_index)


def vocab_parallel_log_probs(logits_shard: torch.Tensor, targets: torch.Tensor, group=None,
                             ignore_index: int = -100) -> torch.Tensor:
    """Per-token log p(target) (...) fp32 from vocab-sharded logits (DPO's sequence log-likelihoods);
    0 where targets == ignore_index."""
    return -vocab_parallel_cross_entropy(logits_shard, targets, group, ignore_index)


def vocab_parallel_top1(logits_shard: torch.Tensor, targets: torch.Tensor, group=None,
                        ignore_index: int = -100) -> torch.Tensor:
    """(...) bool, no grad: the target's logit is the largest of the whole vocabulary (token accuracy),
    from two max all-reduces over the tp group; False where targets == ignore_index."""
    with torch.no_grad():
        logits, vocab_shard = logits_shard.float(), logits_shard.shape[-1]
        best = all_reduce(logits.max(dim=-1).values, group, op=dist.ReduceOp.MAX)
        local = targets - group_rank(group) * vocab_shard
        inside = (local >= 0) & (local < vocab_shard)
        target_logit = logits.gather(-1, local.clamp(0, vocab_shard - 1)[..., None]).squeeze(-1)
        target_logit = all_reduce(target_logit.masked_fill(~inside, float("-inf")), group,
                                  op=dist.ReduceOp.MAX)
        return (target_logit >= best) & (targets != ignore_index)


def vocab_parallel_argmax(logits_shard: torch.Tensor, group=None) -> torch.Tensor:
    """(..., V/tp) vocabulary-sharded logits -> (...) global arg-max ids, the lowest id on ties (as
    torch.argmax), from two all-reduces over the tp group: the max, then the smallest id holding it."""
    with torch.no_grad():
        value, index = logits_shard.float().max(dim=-1)
        index = index + group_rank(group) * logits_shard.shape[-1]
        best = all_reduce(value, group, op=dist.ReduceOp.MAX)
        candidate = torch.where(value == best, index, torch.full_like(index, torch.iinfo(index.dtype).max))
        return all_reduce(candidate, group, op=dist.ReduceOp.MIN)
