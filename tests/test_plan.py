"""trainer/plan.py against a hand count and against the measured peak memory of real training steps.

Measured: three optimizer steps through trainer.engine.build_engine (DeepSpeed, world of one, gloo,
in a spawned process) with the trainer's loss (cross entropy + load balancing). The peak is read from
torch's CPU memory profiler: every tensor allocation and free made while it records, summed in time
order; the largest sum is the CPU analogue of torch.cuda.max_memory_allocated (no allocator slack).
"""

import torch

from distributed import run_ranks
from model import model_config
from trainer.plan import local_params, main, plan

# one rank each: in a world of one the engine runs fp32 at ZeRO stage 0 (trainer.engine.deepspeed_config)
CONFIGS = [  # three small layouts: loss path, checkpointing, packed documents
    dict(preset="tiny", micro_batch=8, seq_len=256, zero_stage=0, dtype="fp32",
         activation_checkpointing="none", fused_loss=False, documents=4),
    dict(preset="tiny", micro_batch=4, seq_len=256, zero_stage=0, dtype="fp32",
         activation_checkpointing="selective", fused_loss=True, documents=0),
    dict(preset="debug", micro_batch=4, seq_len=128, zero_stage=0, dtype="fp32",
         activation_checkpointing="full", fused_loss=True, documents=0),
]


def step_loss(engine, layout, mcfg, tokens, positions, fused_loss: bool):
    """The loss as trainer/tasks.PretrainTask computes it (or with the fused LM head + loss); its
    locals (the logits) are freed on return, before backward, as in the trainer."""
    from model import load_balancing_loss
    from model.loss import fused_linear_cross_entropy
    from parallel.cross_entropy import vocab_parallel_cross_entropy

    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if fused_loss:
        h, stats = engine.module.hidden(inputs, positions)
        ce_sum = fused_linear_cross_entropy(h, engine.module.output.weight, labels)
    else:
        logits, stats = engine(inputs, positions)
        ce_sum = vocab_parallel_cross_entropy(logits.float(), labels, layout.tp_group).sum()
    return ce_sum / labels.numel() + mcfg.router_aux_loss_coef * load_balancing_loss(stats)


def measure_peak(rank, world_size, c):
    from torch.profiler import ProfilerActivity, profile

    from model import Mixtral
    from parallel.layout import Layout
    from trainer.config import load_config, model_config_of
    from trainer.engine import build_engine

    cfg = load_config(None, [f"model.preset={c['preset']}", f"pretrain.micro_batch_size={c['micro_batch']}",
                             f"pretrain.global_batch_size={c['micro_batch']}", f"pretrain.seq_len={c['seq_len']}",
                             f"pretrain.dtype={c['dtype']}", f"parallel.zero_stage={c['zero_stage']}",
                             f"parallel.activation_checkpointing={c['activation_checkpointing']}"])
    mcfg = model_config_of(cfg)
    layout = Layout.build(cfg.parallel, mcfg, cfg.pretrain, world_size, rank)
    B, T = c["micro_batch"], c["seq_len"]
    tokens = torch.randint(0, mcfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    doc_len = T // c["documents"] if c["documents"] else T
    positions = (torch.arange(T) % doc_len).expand(B, T) if c["documents"] else None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = Mixtral(mcfg)
        model.init_weights(0)
        engine = build_engine(model, cfg.pretrain, cfg.parallel, layout)
        for _ in range(3):
            engine.backward(step_loss(engine, layout, mcfg, tokens, positions, c["fused_loss"]))
            engine.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def test_estimate_within_20_percent_of_measured_peak():
    for c in CONFIGS:  # a fresh process each: DeepSpeed state does not carry from one to the next
        peak = run_ranks(1, measure_peak, c)[0]
        est = plan(model_config(c["preset"]), zero_stage=c["zero_stage"], micro_batch=c["micro_batch"],
                   seq_len=c["seq_len"], dtype=c["dtype"], activation_checkpointing=c["activation_checkpointing"],
                   fused_loss=c["fused_loss"], document_mask=bool(c["documents"]), device="cpu")["peak"]
        assert abs(est / peak - 1) < 0.2, f"{c}: estimated {est / 2 ** 20:.1f} MiB, measured {peak / 2 ** 20:.1f} MiB"


def test_counts_by_hand():
    """vocab 1000, dim 64, 2 layers, 4 heads of 16 (2 kv), 4 experts of 128, tp 2, ep 2, dp 4, ZeRO 1:
    embedding = output = 64,000; attention per layer wq, wo 64x64 + wk, wv 64x32 = 12,288 -> 24,576;
    norms 2*2*64 + 64 = 320; router 2*4*64 = 512; experts 2*4*3*64*128 = 196,608.
    dense on a rank: (64,000 + 64,000 + 24,576) / tp + 320 + 512 = 77,120; experts: 196,608 / ep = 98,304.
    optimizer partition: 77,120 / dp + 98,304 / (dp / ep) = 19,280 + 49,152 = 68,432."""
    cfg = model_config(None, vocab_size=1000, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       num_experts=4, top_k=2, expert_dim=128)
    assert local_params(cfg, tp=2, ep=2) == {"dense": 77_120, "experts": 98_304}
    est = plan(cfg, tp=2, ep=2, dp=4, zero_stage=1, dtype="fp32")
    assert est["params_local"] == 175_424 and est["params_partitioned"] == 68_432
    assert est["weights"] == 4 * 175_424
    assert est["optimizer"] == (4 + 4 + 4) * 68_432  # Adam m, v and the fp32 master, partitioned
    assert est["gradients"] == 4 * 175_424 + 4 * 68_432  # the model's, then the partition's fp32
    bf16 = plan(cfg, tp=2, ep=2, dp=4, zero_stage=2, dtype="bf16")
    assert bf16["weights"] == 2 * 175_424 and bf16["optimizer"] == 12 * 68_432
    assert bf16["gradients"] == 2 * 68_432 + 4 * 68_432
    assert bf16["deepspeed_bucket"] == 2 * 500_000_000


def test_cli_warns_when_it_does_not_fit(capsys):
    base = ["recipes/quickstart.yaml", "--world-size", "1"]
    assert main(base) == 0
    assert "peak" in capsys.readouterr().out
    assert main(base + ["model.preset=mixtral-8x7b", "pretrain.dtype=bf16"]) == 1
    assert "WARNING" in capsys.readouterr().out
