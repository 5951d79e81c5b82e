"""Memory and throughput planner: will a layout fit, before anything is launched.

    python -m trainer.plan RECIPE [key=value ...] [--stage pretrain] [--world-size N] [--loss fused]
                           [--gpu-memory-gb 80] [--headroom 0.1] [--mfu 0.4] [--peak-tflops 989]
    (exit 0: fits; 1: does not fit, with a WARNING line; 2: bad recipe or layout)
    plan(model_cfg, tp=1, ep=1, dp=1, zero_stage=1, micro_batch=4, seq_len=256, dtype="fp32",
         activation_checkpointing="none", ...) -> dict of bytes per GPU

Estimates the tensor memory of one rank (what torch.cuda.max_memory_allocated reports; the CUDA
context and allocator fragmentation come on top: --headroom keeps a share of the GPU for them):
- weights: the rank's shard. tp splits attention heads, vocabulary (embedding, output) and, with
  expert_tp, the expert hidden size; ep splits the experts; norms and router are replicated.
- optimizer: Adam m and v in fp32, plus DeepSpeed's fp32 master copy (ZeRO >= 1 always keeps one,
  bf16 always needs one), divided over dp (dense) and dp / ep (experts) for ZeRO >= 1.
- gradients: the model's (partitioned for ZeRO 2) and DeepSpeed's fp32 ones of what the rank steps,
  plus DeepSpeed's ZeRO 1/2 gradient bucket (reduce_bucket_size elements from trainer.engine's
  DeepSpeed config, DeepSpeed's default 500 M if it sets none; at most the rank's parameters),
  alive from backward to step.
- activations: what autograd saves per token and layer (counted term by term in
  activation_bytes_per_token), times the layers not recomputed, plus the LM head + loss peak (chunked
  with model.loss.fused_linear_cross_entropy, or whole (N, V) fp32 logits and their softmax).
peak = weights + optimizer + max(activations + head, gradients + bucket + one Adam temporary):
the forward/loss peak or the backward/step peak, whichever is larger.
Checked against measured peaks (tests/test_plan.py): within 20 %.
"""

import argparse
import sys
from types import SimpleNamespace

from model.config import ModelConfig
from model.flops import flops_per_token, param_counts

DEEPSPEED_BUCKET_DEFAULT = 500_000_000  # elements: DeepSpeed's reduce_bucket_size default
GIB = 2 ** 30


def local_params(cfg: ModelConfig, tp: int = 1, ep: int = 1, expert_tp: bool = False) -> dict:
    """Parameters one rank holds: {"dense", "experts"} (dense = everything but the routed experts; the
    shared experts and dense layers' MLPs are replicated over tensor parallelism)."""
    c = param_counts(cfg)
    dense = (c["embedding"] + c["output"] + c["attention"]) / tp + c["norms"] + c["router"] + c["ffn"]
    return {"dense": dense, "experts": c["experts"] / ep / (tp if expert_tp else 1)}


def activation_bytes_per_token(cfg: ModelConfig, tp: int = 1, sp: bool = False, expert_tp: bool = False,
                               dtype: str = "fp32", document_mask: bool = True, seq_len: int = 0) -> float:
    """Bytes autograd keeps for one layer, per token of the micro-batch (B * T):
    norms      2 x (input, normed, scaled output); in bf16 the input is an fp32 copy     x 1/tp with sp
    router     fp32 logits, two softmaxes, logsumexp; int64 routing indices            x 1/tp with sp
    attention  q and k: projection, rotate-half cat, rotated; v; output and its (B, T, H*Dh) copy;
               fp32 logsumexp per head                                              heads / tp
    mask       sdpa with position_ids: the (B, 1, T, T) boolean document mask and the pieces it
               is built from, 4 T bytes per token (flash attention needs none)
    experts    top_k x (gathered input, w1|w3 out, product; w2 out when the routing weight scales
               the output rows, hidden > dim)                                   x 1/tp with sp,
               hidden size / tp with expert_tp
    """
    b = 2 if dtype == "bf16" else 4
    rep = 1 / tp if sp else 1
    q, kv = cfg.num_heads * cfg.head_size / tp, cfg.num_kv_heads * cfg.head_size / tp
    k, D = cfg.top_k, cfg.dim
    F = cfg.expert_dim / (tp if expert_tp else 1)
    norms = 2 * norm_bytes(D, dtype)
    router = 4 * 4 * cfg.num_experts + 8 * 3 * k
    attention = (5 * q + 4 * kv) * b + 4 * cfg.num_heads / tp
    mask = 4 * seq_len if document_mask else 0
    experts = k * (D + 3 * F + (D if F > D else 0)) * b
    return (norms + router + experts) * rep + attention + mask


def selective_bytes_per_token(cfg: ModelConfig, tp: int = 1, sp: bool = False, expert_tp: bool = False,
                              dtype: str = "fp32") -> float:
    """What a block keeps per token under selective checkpointing (parallel/parallelize.py): its input
    and the outputs of its matmuls and attention: q, k, v projections, attention output and fp32
    logsumexp, wo's output, the fp32 router logits, top_k x (w1, w3, w2 outputs)."""
    b = 2 if dtype == "bf16" else 4
    rep = 1 / tp if sp else 1
    q, kv = cfg.num_heads * cfg.head_size / tp, cfg.num_kv_heads * cfg.head_size / tp
    F = cfg.expert_dim / (tp if expert_tp else 1)
    attention = (2 * q + 2 * kv) * b + 4 * cfg.num_heads / tp
    return attention + (2 * cfg.dim * b + 4 * cfg.num_experts + cfg.top_k * (2 * F + cfg.dim) * b) * rep


def norm_bytes(dim: int, dtype: str) -> float:
    """One RMSNorm's saved tensors per token: input (fp32 copy in bf16), normed, scaled output."""
    return dim * (4 + 2 + 2) if dtype == "bf16" else dim * 3 * 4


def plan(cfg: ModelConfig, tp: int = 1, ep: int = 1, dp: int = 1, zero_stage: int = 1,
         micro_batch: int = 4, seq_len: int = 256, dtype: str = "fp32",
         activation_checkpointing: str = "none", sp: bool = False, expert_tp: bool = False,
         fused_loss: bool = True, document_mask: bool = True, device: str = "cuda",
         reduce_bucket_size: int = DEEPSPEED_BUCKET_DEFAULT) -> dict:
    """Per-GPU memory estimate in bytes: {"weights", "gradients", "optimizer", "deepspeed_bucket",
    "activations", "loss_head", "peak"} and the counts behind them ("params_local",
    "params_partitioned"). fused_loss: the LM head through model.loss (tp == 1 only), chunked as on
    `device`; document_mask: attention gets position_ids and runs sdpa (see activation_bytes_per_token)."""
    if dp % ep:
        raise ValueError(f"plan: dp ({dp}) is not divisible by ep ({ep})")
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"plan: zero_stage must be 0, 1 or 2, got {zero_stage}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"plan: dtype must be fp32 or bf16, got {dtype!r}")
    if activation_checkpointing not in ("none", "full", "selective"):
        raise ValueError("plan: activation_checkpointing must be one of none, full, selective, "
                         f"got {activation_checkpointing!r}")
    b = 2 if dtype == "bf16" else 4
    local = local_params(cfg, tp, ep, expert_tp)
    n_local = local["dense"] + local["experts"]
    # ZeRO >= 1 partitions optimizer states over dp (dense) and the expert-data-parallel group (experts)
    n_part = n_local if zero_stage == 0 else local["dense"] / dp + local["experts"] / (dp // ep)

    weights = b * n_local
    master = 4 * n_part if (zero_stage > 0 or dtype == "bf16") else 0
    optimizer = 8 * n_part + master
    # the model's gradients (freed into partitions by ZeRO 2), plus DeepSpeed's fp32 gradients of
    # what this rank steps (ZeRO >= 1, or bf16) and its gradient bucket (ZeRO 1/2) while it steps
    grads = b * (n_part if zero_stage == 2 else n_local) + (4 * n_part if master else 0)
    # a bucket holds at most what there is to reduce: measured peaks of models smaller than the bucket
    # (tests/test_plan.py, bf16 ZeRO 1 and 2 at tp 2 and ep 2) show no full-size buffer
    bucket = 0 if zero_stage == 0 else \
        min(reduce_bucket_size, n_local) * (2 if zero_stage == 2 and dtype == "bf16" else 4)
    step_temp = 4 * n_part  # foreach Adam: one fp32 temporary the size of what it steps

    tokens = micro_batch * seq_len
    per_layer = tokens * activation_bytes_per_token(cfg, tp, sp, expert_tp, dtype, document_mask, seq_len)
    kept = {"none": per_layer,  # what each block keeps until its backward
            "full": tokens / (tp if sp else 1) * cfg.dim * b,  # its input only
            "selective": tokens * selective_bytes_per_token(cfg, tp, sp, expert_tp, dtype)}[activation_checkpointing]
    activations = (cfg.num_layers * kept
                   + (per_layer if activation_checkpointing != "none" else 0)  # the block being recomputed
                   + tokens / (tp if sp else 1) * norm_bytes(cfg.dim, dtype))  # the final norm

    vocab = cfg.vocab_size / tp
    if fused_loss and tp == 1:  # 3 (N, D) row buffers, fp32 dW, the chunk's logits and fp32 softmax
        from model.loss import CHUNK_BYTES
        chunk = min(tokens, max(1, CHUNK_BYTES[device] // (4 * vocab)))
        loss_head = 3 * tokens * cfg.dim * b + 4 * vocab * cfg.dim + chunk * vocab * (b + 4 + 6 * (b == 2))
    else:  # (N, V) logits with an fp32 copy in bf16, then the shifted logits / softmax and its gradient
        loss_head = tokens * vocab * (8 + 2 * (b == 2))
    peak = weights + optimizer + max(activations + loss_head, bucket + grads + step_temp)
    return {"params_local": n_local, "params_partitioned": n_part, "weights": weights,
            "gradients": grads, "optimizer": optimizer, "deepspeed_bucket": bucket,
            "activations": activations, "loss_head": loss_head, "peak": peak}


# ---- command line ------------------------------------------------------------------------------

def plan_recipe(cfg, stage: str, world_size: int, fused_loss: bool = True) -> dict:
    """plan() for a loaded recipe (trainer.config.load_config) and a world size."""
    from .config import model_config_of
    from .engine import deepspeed_config

    p, s = cfg.parallel, cfg[stage]
    if world_size % p.tp:
        raise ValueError(f"world size ({world_size}) is not divisible by parallel.tp ({p.tp})")
    dp = world_size // p.tp
    ds = deepspeed_config(s, SimpleNamespace(dp=dp), p.zero_stage)
    bucket = int(ds["zero_optimization"].get("reduce_bucket_size", DEEPSPEED_BUCKET_DEFAULT))
    return plan(model_config_of(cfg), tp=p.tp, ep=p.ep, dp=dp, zero_stage=ds["zero_optimization"]["stage"],
                micro_batch=s.micro_batch_size, seq_len=s.seq_len, dtype=s.dtype,
                activation_checkpointing=p.activation_checkpointing, sp=p.sp, expert_tp=p.expert_tp,
                fused_loss=fused_loss, reduce_bucket_size=bucket)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2 model.preset=tiny")
    ap.add_argument("--stage", default="pretrain", choices=["pretrain", "sft", "dpo"])
    ap.add_argument("--world-size", type=int, help="GPUs in all (default slurm.nodes x slurm.gpus_per_node)")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0)
    ap.add_argument("--headroom", type=float, default=0.1, help="share of GPU memory kept for the CUDA "
                    "context and fragmentation")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the time estimate")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU peak (H100 bf16: 989)")
    ap.add_argument("--loss", choices=["fused", "logits"], default="fused",
                    help="LM head + loss: model.loss's fused chunks (tp 1) or whole logits")
    args = ap.parse_intermixed_args(argv)

    from .config import ConfigError, load_config, model_config_of

    try:
        cfg = load_config(args.recipe, args.overrides)
        world = args.world_size or cfg.slurm.nodes * (cfg.slurm.tasks_per_node or cfg.slurm.gpus_per_node)
        est = plan_recipe(cfg, args.stage, world, fused_loss=args.loss == "fused")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p, s, mcfg = cfg.parallel, cfg[args.stage], model_config_of(cfg)
    print(f"{args.stage}: world {world} = tp {p.tp} x dp {world // p.tp} (ep {p.ep}), ZeRO {p.zero_stage}, "
          f"{s.dtype}, micro-batch {s.micro_batch_size} x {s.seq_len}, checkpointing "
          f"{p.activation_checkpointing}")
    print(f"parameters per GPU: {est['params_local'] / 1e9:.3f} B (optimizer partition "
          f"{est['params_partitioned'] / 1e9:.3f} B)")
    for key in ("weights", "gradients", "optimizer", "deepspeed_bucket", "activations", "loss_head", "peak"):
        print(f"  {key:18s} {est[key] / GIB:9.2f} GiB")
    tokens = s.global_batch_size * s.seq_len
    flops = flops_per_token(mcfg, s.seq_len)["total"] * tokens
    seconds = flops / (world * args.peak_tflops * 1e12 * args.mfu)
    print(f"step: {tokens} tokens, {flops / 1e15:.2f} PFLOP; at {args.mfu:.0%} MFU of {args.peak_tflops:g} "
          f"TFLOP/s per GPU: {seconds:.2f} s/step, {tokens / seconds:,.0f} tokens/s")
    usable = args.gpu_memory_gb * (1 - args.headroom)
    if est["peak"] / GIB > usable:
        print(f"WARNING: the estimated peak ({est['peak'] / GIB:.1f} GiB per GPU) exceeds "
              f"{usable:.1f} GiB ({args.gpu_memory_gb:g} GB less {args.headroom:.0%} headroom): it will "
              "not fit; raise tp/ep/dp or zero_stage, or turn on activation checkpointing")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
