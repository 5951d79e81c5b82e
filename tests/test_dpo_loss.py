"""DPO losses, rewards and metrics equal an independent scalar implementation of the published formulas
(written here in plain Python floats), for every loss type, on random log-probs; sequence log-probs equal a
per-row loop over the answer tokens of a real preference batch."""

import math
from pathlib import Path

import pytest
import torch

from trainer.dpo_loss import LOSS_TYPES, dpo_loss, dpo_metrics, sequence_log_probs


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_loss(pc, pr, rc, rr, beta, loss_type, eps, n_c, n_r) -> float:
    """One pair. DPO (Rafailov et al. 2023, Eq. 7) with cDPO label smoothing; robust DPO (Chowdhury et al.
    2024, Eq. 6); hinge (SLiC-HF, Zhao et al. 2023); IPO (Azar et al. 2023, Eq. 17, on log-ratios averaged
    per answer token as TRL does)."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "robust":
        return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    return ((pc - rc) / n_c - (pr - rr) / n_r - 1 / (2 * beta)) ** 2


def random_logps(B, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (2, B), generator=g)
    logps = -torch.rand(4, B, generator=g, dtype=torch.float64) * 60  # policy c/r, ref c/r
    logps[0] += torch.randn(B, generator=g, dtype=torch.float64) * 5  # spread the margins widely
    return logps, lengths


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0),
                                            ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_and_rewards_equal_published_formulas(loss_type, eps, beta):
    seed = LOSS_TYPES.index(loss_type) * 100 + round(eps * 10) * 10 + round(beta * 10)
    (pc, pr, rc, rr), (n_c, n_r) = random_logps(64, seed)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps,
                                                        chosen_lengths=n_c, rejected_lengths=n_r)
    expect = [reference_loss(*map(float, (pc[i], pr[i], rc[i], rr[i])), beta, loss_type, eps,
                             int(n_c[i]), int(n_r[i])) for i in range(64)]
    torch.testing.assert_close(losses, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr))
    metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards)
    wins = [beta * (float(pc[i]) - float(rc[i])) > beta * (float(pr[i]) - float(rr[i])) for i in range(64)]
    assert 0 < sum(wins) < 64  # both cases occur
    assert metrics["rewards/accuracy"].item() == pytest.approx(sum(wins) / 64)
    assert metrics["loss"].item() == pytest.approx(sum(expect) / 64, rel=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(beta * float((pc - rc).mean()), rel=1e-6)
    assert metrics["rewards/rejected"].item() == pytest.approx(beta * float((pr - rr).mean()), rel=1e-6)
    margins = [beta * ((float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))) for i in range(64)]
    assert metrics["rewards/margin"].item() == pytest.approx(sum(margins) / 64, rel=1e-6, abs=1e-9)


def test_sigmoid_gradient_is_the_dpo_gradient():
    """d loss / d policy_chosen = -beta sigma(-beta h) (Rafailov et al. 2023, Sec. 4); rewards carry no
    gradient."""
    (pc, pr, rc, rr), _ = random_logps(16, seed=7)
    pc.requires_grad_(True)
    losses, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr, 0.3, "sigmoid")
    losses.sum().backward()
    h = (pc - rc - pr + rr).detach()
    torch.testing.assert_close(pc.grad, -0.3 * torch.sigmoid(-0.3 * h))
    assert not chosen_rewards.requires_grad


def test_at_the_reference_the_sigmoid_loss_is_log_2():
    logps = torch.tensor([-10.0, -3.0])
    losses, c, r = dpo_loss(logps, logps + 1, logps, logps + 1, 0.1, "sigmoid")
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    assert dpo_metrics(losses, c, r)["rewards/accuracy"].item() == 0.0  # ties are not wins


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rpo_adds_the_chosen_nll_per_token(loss_type):
    """RPO (Pang et al. 2024, Eq. 2): loss + alpha * (-log pi(y_w | x) / |y_w|), on top of any loss type;
    its gradient on the chosen log-prob is the DPO one minus alpha / |y_w|."""
    (pc, pr, rc, rr), (n_c, n_r) = random_logps(32, seed=11)
    pc.requires_grad_(True)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, 0.2, loss_type, chosen_lengths=n_c, rejected_lengths=n_r)
    rpo, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr, 0.2, loss_type, chosen_lengths=n_c,
                                      rejected_lengths=n_r, rpo_alpha=0.5)
    expect = [reference_loss(*map(float, (pc[i], pr[i], rc[i], rr[i])), 0.2, loss_type, 0.0, int(n_c[i]),
                             int(n_r[i])) - 0.5 * float(pc[i]) / int(n_c[i]) for i in range(32)]
    torch.testing.assert_close(rpo, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, 0.2 * (pc - rc).detach())  # rewards are unchanged
    (grad_plain,) = torch.autograd.grad(plain.sum(), pc)
    (grad_rpo,) = torch.autograd.grad(rpo.sum(), pc)
    torch.testing.assert_close(grad_rpo, grad_plain - 0.5 / n_c)


def test_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="unknown 'kto'"):
        dpo_loss(x, x, x, x, 0.1, "kto")
    with pytest.raises(ValueError, match="sigmoid and robust losses only"):
        dpo_loss(x, x, x, x, 0.1, "hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        dpo_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ValueError, match="rpo_alpha > 0 needs chosen_lengths"):
        dpo_loss(x, x, x, x, 0.1, "sigmoid", rpo_alpha=1.0)
    with pytest.raises(ValueError, match="rpo_alpha must be >= 0"):
        dpo_loss(x, x, x, x, 0.1, "sigmoid", chosen_lengths=x, rpo_alpha=-1.0)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(x, x, x, x, 0.1, "robust", label_smoothing=0.5)
    assert set(LOSS_TYPES) == {"sigmoid", "ipo", "hinge", "robust"}


def test_sequence_log_probs_of_a_preference_batch():
    """Summed over the answer tokens only: equal to a loop over each pair's answer, from full logits."""
    from data.preference import collate_pairs, load_pairs

    pairs, _ = load_pairs(Path(__file__).parent.parent / "data" / "instruct" / "preference.jsonl")
    batch = collate_pairs(pairs, [3, 1, 4, 1, 5])
    R, T = batch["tokens"].shape
    logits = torch.randn(R, T, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = batch["labels"]
    vocab_labels = labels.remainder(50)  # a 50-word toy vocabulary: map the ids into it
    token_log_probs = torch.log_softmax(logits, -1).gather(-1, vocab_labels[..., None])[..., 0]
    token_log_probs = token_log_probs.masked_fill(labels == -100, float("-inf"))  # garbage off the answers
    got = sequence_log_probs(token_log_probs, labels != -100)
    for r in range(R):
        pair = pairs[[3, 1, 4, 1, 5][r % 5]]
        answer = pair.chosen if r < 5 else pair.rejected
        P = len(pair.prompt)
        expect = sum(float(torch.log_softmax(logits[r, P - 1 + k], -1)[token % 50])
                     for k, token in enumerate(answer))
        assert float(got[r]) == pytest.approx(expect, rel=1e-12)
    chosen, rejected = got.chunk(2)
    assert chosen.shape == rejected.shape == (5,)
