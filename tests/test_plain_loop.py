"""The trainer against a plain PyTorch loop: the independent reference for the whole optimizer step.

Five steps through the trainer's loop (trainer/loop.py: DeepSpeed engine, warmup/cosine schedule,
gradient clipping, weight-decay groups, 2 micro-batches of accumulation) against the same five steps
written by hand: the bare single-device model, F.cross_entropy on full logits plus the load-balancing
loss, torch.optim.AdamW with its two groups, the schedule's formula, torch's clipping. Both start from
the same weights and read the same micro-batches. After every step each parameter must agree within
1e-6, and the logged grad_norm must equal the plain loop's pre-clipping norm within 1e-6 relative.
"""

import math

import torch
import torch.nn.functional as F

from conftest import ROOT
from distributed import run_ranks

STEPS, LR, WARMUP, MIN_RATIO, WEIGHT_DECAY = 5, 1e-3, 2, 0.1, 0.1
GRAD_CLIP = 1.7  # the pre-clipping norms are ~1.5-2.0: some steps are clipped, some not
# Adam moves an element by lr * g / (|g| + eps): where |g| is near eps, fp32 rounding of g (the fused
# LM-head loss and F.cross_entropy sum in other orders) is amplified by lr / eps. Measured: lr 1e-2 and
# eps 1e-8 give 9e-6 after one step; lr 1e-3 and eps 1e-6 stay under 1e-6 over the five steps.
EPS = 1e-6


def overrides(corpus, run_dir) -> list[str]:
    return ["stages=[pretrain]", f"run_dir={run_dir}", "model.preset=debug", f"pretrain.data={corpus}",
            f"pretrain.steps={STEPS}", "pretrain.seq_len=32", "pretrain.micro_batch_size=2",
            "pretrain.global_batch_size=4", f"pretrain.lr={LR}", f"pretrain.warmup_steps={WARMUP}",
            f"pretrain.min_lr_ratio={MIN_RATIO}", f"pretrain.weight_decay={WEIGHT_DECAY}",
            f"pretrain.grad_clip={GRAD_CLIP}", f"pretrain.eps={EPS}", "pretrain.log_every=1",
            "pretrain.save_every=1000",
            "pretrain.valid_fraction=0", "parallel.zero_stage=0",
            "logging.progress=false", "logging.wandb=disabled"]


def schedule(step: int) -> float:
    """Linear warmup over WARMUP steps, then cosine from 1 to MIN_RATIO at STEPS (written out here)."""
    if step < WARMUP:
        return (step + 1) / (WARMUP + 1)
    return MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def trainer_run(rank, world, args) -> tuple:
    """The trainer's loop for STEPS steps (its weights read after every optimizer step), then the plain
    loop from the same initial weights. Returns per step: the largest parameter difference, the largest change of a parameter in that step, the logged grad
    norm and the plain loop's norm."""
    from conftest import read_metrics
    from parallel.layout import Layout
    from trainer import distributed as D
    from trainer.config import load_config, model_config_of
    from trainer.engine import build_engine, build_model
    from trainer.loop import train
    from trainer.stages import make_task

    D.init_distributed()
    cfg = load_config(str(ROOT / "recipes/quickstart.yaml"), args)
    scfg, mcfg = cfg.pretrain, model_config_of(cfg)
    layout = Layout.build(cfg.parallel, mcfg, scfg, 1, 0)
    model = build_model(mcfg, None, scfg.seed, layout, cfg.parallel)
    engine = build_engine(model, scfg, cfg.parallel, layout)
    snapshot = lambda: {n: p.detach().clone() for n, p in engine.module.named_parameters()}  # noqa: E731
    weights = [snapshot()]
    engine.optimizer.register_step_post_hook(lambda *_: weights.append(snapshot()))
    train("pretrain", scfg, cfg, engine, make_task("pretrain", scfg, cfg, mcfg, layout), layout, mcfg)
    norms = [m["grad_norm"] for m in read_metrics(scfg.output) if "grad_norm" in m]
    plain_weights, plain_norms = plain_loop(weights[0], scfg, mcfg)
    assert len(weights) == len(plain_weights) + 1 == STEPS + 1
    worst = [max((a[n] - b[n]).abs().max().item() for n in b) for a, b in zip(weights[1:], plain_weights)]
    moved = [max((a[n] - b[n]).abs().max().item() for n in b) for a, b in zip(weights[1:], weights)]
    return worst, moved, norms, plain_norms


def plain_loop(initial: dict, scfg, mcfg) -> tuple[list[dict], list[float]]:
    """The same steps with the bare model and torch: weights after every step, pre-clipping norms."""
    from data.indexed import IndexedDataset
    from data.stream import PackedStream
    from model import Mixtral, load_balancing_loss

    model = Mixtral(mcfg)
    model.load_state_dict(initial)
    matrices = [p for p in model.parameters() if p.dim() > 1]
    vectors = [p for p in model.parameters() if p.dim() == 1]
    optimizer = torch.optim.AdamW([dict(params=matrices, weight_decay=WEIGHT_DECAY),
                                   dict(params=vectors, weight_decay=0.0)],
                                  lr=LR, betas=(scfg.beta1, scfg.beta2), eps=scfg.eps)
    accumulation = scfg.global_batch_size // scfg.micro_batch_size
    stream = PackedStream(IndexedDataset(scfg.data), scfg.seq_len, scfg.micro_batch_size, scfg.seed,
                          accumulation=accumulation)
    weights, norms = [], []
    for step in range(STEPS):
        batches = [stream.next_batch() for _ in range(accumulation)]
        tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        optimizer.zero_grad()
        for b in batches:  # the step's loss: token mean over all micro-batches + mean load-balancing loss
            logits, stats = model(b["tokens"], b["position_ids"])
            ce = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum")
            (ce / tokens + mcfg.router_aux_loss_coef * load_balancing_loss(stats) / accumulation).backward()
        params = list(model.parameters())
        norm = torch.nn.utils.get_total_norm([p.grad.double() for p in params])  # fp64: exact enough
        torch.nn.utils.clip_grads_with_norm_(params, GRAD_CLIP, norm)
        for group in optimizer.param_groups:
            group["lr"] = LR * schedule(step)
        optimizer.step()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        norms.append(norm.item())
    return weights, norms


def test_trainer_steps_equal_a_plain_pytorch_loop(corpus, tmp_path):
    (worst, moved, norms, plain_norms), = run_ranks(1, trainer_run, overrides(corpus, tmp_path))
    assert any(n > GRAD_CLIP for n in plain_norms) and any(n < GRAD_CLIP for n in plain_norms), plain_norms
    for step, (w, m) in enumerate(zip(worst, moved), start=1):
        assert w < 1e-6 < m, f"step {step}: parameters differ by {w:.2e} (the step moved them by {m:.2e})"
    errors = [abs(a - b) / b for a, b in zip(norms, plain_norms)]
    assert len(norms) == STEPS and max(errors) < 1e-6, (norms, plain_norms)
