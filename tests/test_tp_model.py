"""The whole model under tensor / sequence / expert-tensor parallelism equals one process; the Layout.

Model parity (fp32, debug preset with a 256-token vocabulary, same weights and packed batch): the
loss (token cross entropy + aux coefficient x load balancing + a z-loss term) and every parameter
gradient, gathered back to full shape, against the unparallelized model with F.cross_entropy and the
model's own stats on one process: relative error < 1e-5. One spawn per world size:
    2 ranks: TP2, TP2+SP, TP2+expert_tp, TP2+SP+expert_tp with full activation checkpointing, and
             DeepSpeed's ZeRO-2 gradient norm at TP2+SP (through layout.mpu) against one process
    4 ranks: TP2 x DP2 + SP (selective checkpointing), TP4+SP+expert_tp (4 kv heads), and the
             tp/dp/ep/expert-dp groups of TP2 x EP2 against the ones DeepSpeed builds from layout.mpu
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_ranks
from model import Mixtral, load_balancing_loss, model_config, router_z_loss
from parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.deepspeed_internals import release_expert_groups
from parallel.layout import Layout, LayoutError
from parallel.mappings import all_gather
from parallel.parallelize import parallelize, reduce_router_stats
from trainer.config import ParallelConfig

B, T, Z_COEF = 2, 16, 0.01


def batch(vocab):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[0, 5] = labels[1, :2] = -100
    position_ids = torch.cat([torch.cat([torch.arange(6), torch.arange(10)])[None],
                              torch.arange(T)[None]])  # row 0 packs two documents
    return tokens, labels, position_ids


def reference(cfg):
    """Loss and gradients of the single-device model, the plain way."""
    model = Mixtral(cfg)
    model.init_weights(0)
    tokens, labels, position_ids = batch(cfg.vocab_size)
    logits, stats = model(tokens, position_ids)
    ce = F.cross_entropy(logits.view(-1, cfg.vocab_size), labels.view(-1), ignore_index=-100)
    loss = ce + cfg.router_aux_loss_coef * load_balancing_loss(stats) + Z_COEF * router_z_loss(stats)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def parallel_run(cfg, layout, pcfg):
    model = Mixtral(cfg)
    model.init_weights(0)
    parallelize(model, layout, pcfg)
    tokens, labels, position_ids = batch(cfg.vocab_size)
    logits, stats = model(tokens, position_ids)
    assert logits.shape == (B, T, cfg.vocab_size // layout.tp)  # vocab-sharded, never gathered
    ce = vocab_parallel_cross_entropy(logits, labels, layout.tp_group).sum() / (labels != -100).sum()
    stats = reduce_router_stats(stats, layout)
    loss = ce + cfg.router_aux_loss_coef * load_balancing_loss(stats) + Z_COEF * router_z_loss(stats)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        spec = getattr(p, "_shard", None)
        grads[name] = p.grad if spec is None else all_gather(p.grad, spec[0], layout.tp_group)
    return loss.item(), grads


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def compare(cfg, layout, pcfg):
    ref_loss, ref_grads = reference(cfg)
    loss, grads = parallel_run(cfg, layout, pcfg)
    assert grads.keys() == ref_grads.keys()
    errors = {"loss": abs(loss - ref_loss) / abs(ref_loss)}
    errors.update({n: relative(grads[n], ref_grads[n]) for n in ref_grads})
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.2e}"
    return errors["loss"], errors[worst]


def train_shape(dp):
    return SimpleNamespace(micro_batch_size=B, global_batch_size=B * dp, seq_len=T)


def build(cfg, world_size, rank, **parallel):
    pcfg = ParallelConfig(**parallel)
    return Layout.build(pcfg, cfg, train_shape(world_size // pcfg.tp), world_size, rank), pcfg


def model_checks_2(rank, world_size):
    cfg = model_config("debug", vocab_size=256)
    results = {}
    for name, parallel in {"tp2": dict(tp=2), "tp2-sp": dict(tp=2, sp=True),
                           "tp2-expert_tp": dict(tp=2, expert_tp=True),
                           "tp2-sp-expert_tp-ckpt": dict(tp=2, sp=True, expert_tp=True,
                                                         activation_checkpointing="full")}.items():
        results[name] = compare(cfg, *build(cfg, world_size, rank, **parallel))
    results["zero2-grad-norm tp2-sp"] = deepspeed_grad_norm(cfg, *build(cfg, world_size, rank, tp=2, sp=True))
    return results


def deepspeed_grad_norm(cfg, layout, pcfg):
    """DeepSpeed (ZeRO-2, layout.mpu) computes the single-process gradient norm: the tp-sharded
    parameters count on every tp rank, the replicated ones once."""
    import deepspeed

    _, ref_grads = reference(cfg)
    ref_norm = torch.cat([g.flatten() for g in ref_grads.values()]).double().norm().item()
    model = Mixtral(cfg)
    model.init_weights(0)
    parallelize(model, layout, pcfg)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), mpu=layout.mpu,
        config={"train_batch_size": B * layout.dp, "train_micro_batch_size_per_gpu": B,
                "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
                "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9})
    tokens, labels, position_ids = batch(cfg.vocab_size)
    logits, stats = engine(tokens, position_ids)
    ce = vocab_parallel_cross_entropy(logits, labels, layout.tp_group).sum() / (labels != -100).sum()
    stats = reduce_router_stats(stats, layout)
    aux = cfg.router_aux_loss_coef * load_balancing_loss(stats) + Z_COEF * router_z_loss(stats)
    engine.backward(ce + aux)
    engine.step()
    error = abs(float(engine.get_global_grad_norm()) - ref_norm) / ref_norm
    assert error < 1e-5, f"DeepSpeed grad norm: relative error {error:.2e}"
    return 0.0, error


def group_ranks(group):
    return sorted(dist.get_global_rank(group, i) for i in range(dist.get_world_size(group)))


def model_checks_4(rank, world_size):
    from deepspeed.utils import groups

    cfg = model_config("debug", vocab_size=256)
    layout, _ = build(cfg, world_size, rank, tp=2, ep=2)
    expected = {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "ep": [[0, 2], [1, 3]],
                "expert_dp": [[0], [1], [2], [3]]}
    mine = {k: next(r for r in v if rank in r) for k, v in expected.items()}
    assert group_ranks(layout.tp_group) == mine["tp"] and group_ranks(layout.dp_group) == mine["dp"]
    assert group_ranks(layout.ep_group) == mine["ep"]
    assert group_ranks(layout.expert_dp_group) == mine["expert_dp"]
    assert list(groups._get_expert_parallel_group_ranks("ep_size_2")) == mine["ep"]
    assert list(groups._get_expert_data_parallel_group_ranks("ep_size_2")) == mine["expert_dp"]
    assert groups._get_data_parallel_world_size() == 2 and groups._get_model_parallel_world_size() == 2
    total = torch.tensor([float(rank)])
    dist.all_reduce(total, group=layout.ep_group)
    assert total.item() == sum(mine["ep"])
    mpu = layout.mpu
    assert (mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank()) == (rank % 2, rank // 2)

    results = {"tp2xdp2-sp-selective": compare(cfg, *build(cfg, world_size, rank, tp=2, sp=True,
                                                           activation_checkpointing="selective"))}
    release_expert_groups()  # DeepSpeed keys its groups by ep size only: one layout
    cfg4 = model_config("debug", vocab_size=256, num_kv_heads=4)  # per process, as in training
    results["tp4-sp-expert_tp"] = compare(cfg4, *build(cfg4, world_size, rank, tp=4, sp=True, expert_tp=True))
    return results


@pytest.mark.parametrize("world_size, checks", [(2, model_checks_2), (4, model_checks_4)])
def test_model_gradients_equal_one_process(world_size, checks):
    for results in run_ranks(world_size, checks):
        for name, (loss_err, worst_err) in results.items():
            assert loss_err < 1e-5 and worst_err < 1e-5, name


# ---------------------------------------------------------------- layout validation (no processes)

@pytest.mark.parametrize("world, parallel, model, train, message", [
    (6, dict(tp=4), {}, {}, "world size (6) is not divisible by parallel.tp (4)"),
    (8, dict(ep=4), dict(num_experts=6), {}, "model.num_experts (6) is not divisible by parallel.ep (4)"),
    (4, dict(tp=4), dict(num_heads=6, num_kv_heads=2, head_dim=16),
     {}, "model.num_heads (6) is not divisible by parallel.tp (4)"),
    (4, dict(tp=4), {}, {}, "model.num_kv_heads (2) is not divisible by parallel.tp (4)"),
    (2, dict(tp=2), dict(vocab_size=255), {}, "model.vocab_size (255) is not divisible by parallel.tp (2)"),
    (4, dict(tp=4, expert_tp=True), dict(num_kv_heads=4, expert_dim=130), {},
     "model.expert_dim (130) is not divisible by parallel.tp (4)"),
    (6, dict(tp=2, ep=2), {}, {}, "data-parallel size (3 = world size 6 / parallel.tp 2) is not divisible by "
                                  "parallel.ep (2)"),
    (2, {}, {}, dict(global_batch_size=10, micro_batch_size=4),
     "global_batch_size (10) is not divisible by micro_batch_size (4) x dp (2)"),
    (2, dict(sp=True), {}, {}, "parallel.sp=true needs parallel.tp > 1"),
    (2, dict(tp=2, sp=True), {}, dict(seq_len=15), "seq_len (15) is not divisible by parallel.tp (2)"),
    (4, dict(tp=2, ep=2, expert_tp=True), {}, {}, "parallel.expert_tp=true with parallel.ep > 1"),
])
def test_layout_errors_name_the_field(world, parallel, model, train, message):
    cfg = model_config("debug", **model)
    shape = {**dict(micro_batch_size=2, global_batch_size=8, seq_len=16), **train}
    with pytest.raises(LayoutError) as e:
        Layout.plan(ParallelConfig(**parallel), cfg, SimpleNamespace(**shape), world)
    assert message in str(e.value)


def test_layout_ranks():
    layout = Layout.plan(ParallelConfig(tp=2, ep=2), model_config("debug"), None, world_size=16, rank=13)
    assert (layout.tp_rank, layout.dp_rank, layout.ep_rank, layout.expert_dp_rank) == (1, 6, 0, 3)
    assert layout.tp_ranks_of(13) == [12, 13]
    assert layout.dp_ranks_of(13) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert layout.ep_ranks_of(13) == [13, 15]
    assert layout.expert_dp_ranks_of(13) == [1, 5, 9, 13]
    assert layout.describe() == dict(world_size=16, tp=2, dp=8, ep=2, expert_dp=4, sp=False, expert_tp=False)
