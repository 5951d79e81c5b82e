"""DPO losses on sequence log-probabilities: pure functions, no model, no communication.

Inputs are (B,) summed answer log-probs log pi(y | x) of the policy and the frozen reference for the
chosen (y_w) and rejected (y_l) answers. With
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
and eps = label_smoothing, the per-pair losses (TRL's DPOTrainer, trl 1.16, unless noted):
  sigmoid  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
           DPO (Rafailov et al. 2023); eps > 0 is conservative DPO (cDPO, Mitchell 2023), the label
           smoothing TRL applied to "sigmoid" up to 0.x (1.16 applies it only to robust / exo)
  robust   (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps), eps in [0, 0.5):
           the unbiased loss under label flips with probability eps (Chowdhury et al. 2024)
  hinge    relu(1 - beta h)  (SLiC, Zhao et al. 2023)
  ipo      (h_avg - 1 / (2 beta))^2  (Azar et al. 2023, Eq. 17, beta = tau), where h_avg uses the log-ratios
           divided by the answer token counts: (pc - rc) / n_chosen - (pr - rr) / n_rejected, as TRL does
RPO (rpo_alpha > 0, any loss type): + rpo_alpha * (-policy_chosen / n_chosen), the chosen answer's
negative log-likelihood per token (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
Eq. 2; TRL's rpo_alpha averages it over the batch's chosen tokens instead, which ties it to the batch
layout): DPO alone may lower the chosen answers' likelihood as long as the rejected ones fall faster.
Rewards (every loss type): chosen_rewards = beta (policy_chosen - ref_chosen), rejected_rewards =
beta (policy_rejected - ref_rejected), detached. Metrics are batch means; under data parallelism
average them over ranks (they are means of per-pair values: equal batch sizes average exactly).
"""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def sequence_log_probs(token_log_probs: torch.Tensor, labels_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token log-probs of the labels, (B, T) bool mask (labels != -100) -> (B,) sums over the
    masked positions. Unmasked entries may hold anything (even -inf or nan): they are never added."""
    return torch.where(labels_mask, token_log_probs, torch.zeros((), dtype=token_log_probs.dtype,
                                                                 device=token_log_probs.device)).sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, rpo_alpha: float = 0.0):
    """-> (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); formulas in the module docstring.
    chosen_lengths / rejected_lengths: (B,) answer token counts, required by "ipo" and by rpo_alpha > 0."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: unknown {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing ({label_smoothing}) applies to the sigmoid and robust losses "
                         f"only, not {loss_type!r}")
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    if rpo_alpha and chosen_lengths is None:
        raise ValueError("rpo_alpha > 0 needs chosen_lengths (answer token counts)")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths (answer token "
                             "counts)")
        h_avg = (chosen_logratios / chosen_lengths.clamp(min=1)
                 - rejected_logratios / rejected_lengths.clamp(min=1))
        losses = (h_avg - 1 / (2 * beta)) ** 2
    if rpo_alpha:
        losses = losses - rpo_alpha * policy_chosen / chosen_lengths.clamp(min=1)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor,
                rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch means as detached 0-dim tensors, at least fp32 (all-reduce them to average over data-parallel
    ranks)."""
    def wide(x):
        return x.detach().to(torch.promote_types(x.dtype, torch.float32))

    chosen, rejected = wide(chosen_rewards), wide(rejected_rewards)
    return {
        "loss": wide(losses).mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracy": (chosen > rejected).to(chosen.dtype).mean(),
        "rewards/margin": (chosen - rejected).mean(),
    }
