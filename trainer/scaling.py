"""Compute-optimal fine-grained MoE shapes from the scaling law of Krajewski et al. 2024,
"Scaling Laws for Fine-Grained Mixture of Experts" (arXiv 2402.07871).

    python -m trainer.scaling --flops 1e21 [--expansion 64] [--top-k 1] [--gpus 64] [--json]
                              [--write recipe.yaml]
    optimal(flops, expansion=64) -> Shape

The paper's model, as used here:
- loss (its Eq. 9, constants of its Table 1): L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta
- shape: d_model = 64 * n_blocks; a block holds attention (4 d^2) and E experts of a 2-matrix FFN of
  hidden 4 d (8 d^2 each) at granularity 1, so N = (8 E + 4) d^2 n_blocks total non-embedding
  parameters, 12 d^2 n_blocks of them active per token;
- training FLOPs (its Eq. 10): F = (12 d^2 c_f + d E G c_r) D n_blocks, c_f = 6 (forward and backward
  per active parameter), c_r = 14 (routing: the router matmul and the gather/scatter around the experts).
For a budget F it minimises L over d_model (continuous, by Brent's method as the paper does) for every
G in 1, 2, 4, ... and keeps the best; D follows from F. tests/test_scaling.py checks it against the
paper's table of compute-optimal configurations.

The dense optimum for the same budget uses Chinchilla's fit (Hoffmann et al. 2022, approach 3,
F = 6 N D): the paper fits its law on MoE runs only, and Chinchilla's loss is on other data, so the
two losses are not comparable; the sizes are.

A shape trains here as Mixtral blocks with SwiGLU experts: three matrices of hidden 8 d / 3 hold the
8 d^2 of the paper's expert, so `model.expert_dim` is 8 d / 3 (rounded to a multiple of 8 G) and
`model.granularity` splits it (trainer.config resolves E x G experts of expert_dim / G, top_k x G).
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from scipy.optimize import minimize_scalar

C_F, C_R = 6, 14  # FLOPs per active parameter and token (fwd + bwd); routing cost per (d_model, expert)
D_MODEL_PER_BLOCK = 64
GRANULARITIES = tuple(2 ** i for i in range(9))  # 1 .. 256


@dataclass(frozen=True)
class Law:
    """L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta (the paper's Table 1)."""
    a: float = 18.1
    alpha: float = 0.115
    b: float = 30.8
    beta: float = 0.147
    g: float = 2.1
    gamma: float = 0.58
    c: float = 0.47

    def loss(self, n_params: float, tokens: float, granularity: float) -> float:
        return (self.c + (self.g / granularity ** self.gamma + self.a) / n_params ** self.alpha
                + self.b / tokens ** self.beta)


# Hoffmann et al. 2022, approach 3: L = E + A / N^alpha + B / D^beta
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


@dataclass
class Shape:
    d_model: float
    n_blocks: float
    expansion: int
    granularity: int
    tokens: float
    flops: float
    loss: float
    total_params: float  # non-embedding: attention and all experts
    active_params: float  # non-embedding, per token

    @property
    def tokens_per_active_param(self) -> float:
        return self.tokens / self.active_params


def total_params(d_model: float, expansion: int) -> float:
    return (8 * expansion + 4) * d_model ** 2 * d_model / D_MODEL_PER_BLOCK


def flops_per_token(d_model: float, expansion: int, granularity: int) -> float:
    """The paper's Eq. 10 without D: (12 d^2 c_f + d E G c_r) n_blocks."""
    n_blocks = d_model / D_MODEL_PER_BLOCK
    return (12 * d_model ** 2 * C_F + d_model * expansion * granularity * C_R) * n_blocks


def shape_at(d_model: float, expansion: int, granularity: int, flops: float, law: Law = Law()) -> Shape:
    tokens = flops / flops_per_token(d_model, expansion, granularity)
    n = total_params(d_model, expansion)
    return Shape(d_model, d_model / D_MODEL_PER_BLOCK, expansion, granularity, tokens, flops,
                 law.loss(n, tokens, granularity), n, 12 * d_model ** 3 / D_MODEL_PER_BLOCK)


def optimal(flops: float, expansion: int = 64, granularities=GRANULARITIES, law: Law = Law()) -> Shape:
    """The compute-optimal shape for a FLOP budget: the lowest predicted loss over d_model and G."""
    if flops <= 0 or expansion < 1:
        raise ValueError(f"flops ({flops:g}) and expansion ({expansion}) must be positive")
    best = None
    for G in granularities:
        res = minimize_scalar(lambda ld: shape_at(math.exp(ld), expansion, G, flops, law).loss,
                              bounds=(math.log(D_MODEL_PER_BLOCK / 4), math.log(1e6)), method="bounded",
                              options={"xatol": 1e-9})
        shape = shape_at(math.exp(res.x), expansion, G, flops, law)
        if best is None or shape.loss < best.loss:
            best = shape
    if best.n_blocks < 1 or best.tokens < 1:
        raise ValueError(f"--flops {flops:g} is below the smallest model (one block of d_model "
                         f"{D_MODEL_PER_BLOCK}): {best.n_blocks:.2f} blocks")
    return best


def dense_optimal(flops: float) -> dict:
    """Chinchilla's compute-optimal (N, D) for F = 6 N D, in closed form."""
    c = CHINCHILLA
    k = (c["alpha"] * c["A"] / (c["beta"] * c["B"])) ** (1 / (c["alpha"] + c["beta"]))
    a, b = c["beta"] / (c["alpha"] + c["beta"]), c["alpha"] / (c["alpha"] + c["beta"])
    n, d = k * (flops / 6) ** a, (flops / 6) ** b / k
    return {"params": n, "tokens": d, "loss": c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]}


@dataclass
class Trainable:
    """A shape rounded to what trains here (d_model a multiple of 64), with its model.* overrides."""
    shape: Shape
    overrides: dict

    def dotlist(self) -> list[str]:
        return [f"model.{k}={v}" for k, v in self.overrides.items()]


def trainable(shape: Shape, top_k: int = 1, law: Law = Law()) -> Trainable:
    """Rounds d_model to a multiple of 64 (whole blocks of 64-wide heads), keeps the budget (D follows)."""
    blocks = max(1, round(shape.n_blocks))
    d = blocks * D_MODEL_PER_BLOCK
    rounded = shape_at(d, shape.expansion, shape.granularity, shape.flops, law)
    G = shape.granularity
    expert_dim = max(8 * G, round(8 * d / 3 / (8 * G)) * 8 * G)  # SwiGLU holding the paper's 8 d^2
    return Trainable(rounded, dict(dim=d, num_layers=blocks, num_heads=blocks, num_kv_heads=blocks,
                                   expansion=shape.expansion, granularity=G, expert_dim=expert_dim,
                                   top_k=top_k))


def cluster_estimate(t: Trainable, gpus: int, gpu_memory_gb: float, mfu: float, peak_tflops: float,
                     seq_len: int = 4096, micro_batch: int = 1) -> dict:
    """Per-GPU memory (trainer.plan) and training time of the rounded shape on `gpus` GPUs: bf16,
    ZeRO 1, experts spread over the largest power-of-two ep that divides both, full checkpointing."""
    from model.config import model_config
    from model.flops import flops_per_token as model_flops
    from .plan import GIB, plan

    cfg = model_config(max_seq_len=seq_len, **t.overrides)
    ep = math.gcd(gpus & -gpus, cfg.num_experts & -cfg.num_experts)
    est = plan(cfg, ep=ep, dp=gpus, zero_stage=1, micro_batch=micro_batch, seq_len=seq_len, dtype="bf16",
               activation_checkpointing="full")
    seconds = model_flops(cfg, seq_len)["total"] * t.shape.tokens / (gpus * peak_tflops * 1e12 * mfu)
    return {"gpus": gpus, "ep": ep, "peak_gib_per_gpu": est["peak"] / GIB,
            "fits": est["peak"] / GIB <= 0.9 * gpu_memory_gb, "train_days": seconds / 86400,
            "mfu": mfu, "peak_tflops": peak_tflops}


def write_recipe(path: str, t: Trainable, cluster: dict, seq_len: int = 4096, global_batch: int = 1024) -> None:
    """A pretraining recipe for the shape on cluster_estimate's layout: the budget's tokens in
    global_batch x seq_len steps. Its data (tokenize.inputs) is the user's to fill in."""
    steps = max(1, round(t.shape.tokens / (global_batch * seq_len)))
    model = "\n".join(f"  {k}: {v}" for k, v in t.overrides.items())
    text = (f"# Compute-optimal fine-grained MoE for {t.shape.flops:.3g} FLOPs (python -m trainer.scaling):\n"
            f"# predicted loss {t.shape.loss:.3f}, {t.shape.tokens:.3g} tokens, "
            f"{t.shape.total_params:.3g} non-embedding parameters ({t.shape.active_params:.3g} active)\n"
            f"stages: [tokenize, pretrain]\ntokenize:\n  inputs: []  # your corpus\n"
            f"model:\n{model}\n  max_seq_len: {seq_len}\n"
            f"parallel:\n  ep: {cluster['ep']}\n  zero_stage: 1\n  activation_checkpointing: full\n"
            f"slurm:\n  nodes: {max(1, cluster['gpus'] // 8)}\n  gpus_per_node: {min(8, cluster['gpus'])}\n"
            f"  partition: gpu  # your cluster's\n"
            f"pretrain:\n  steps: {steps}\n  seq_len: {seq_len}\n  global_batch_size: {global_batch}\n"
            f"  micro_batch_size: 1\n  dtype: bf16\n")
    with open(path, "w") as f:
        f.write(text)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--flops", type=float, required=True, help="training budget in FLOPs, e.g. 1e21")
    ap.add_argument("--expansion", type=int, default=64, help="E: experts at granularity 1 (paper: 64)")
    ap.add_argument("--top-k", type=int, default=1, help="experts per token at granularity 1 (paper: 1)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs for the memory and time estimate")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0)
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU peak (H100 bf16: 989)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--write", metavar="RECIPE", help="also write a pretraining recipe for the shape")
    args = ap.parse_args(argv)
    try:
        if args.top_k < 1 or args.top_k > args.expansion:
            raise ValueError(f"--top-k {args.top_k} must be in [1, --expansion {args.expansion}]")
        shape = optimal(args.flops, args.expansion)
        t = trainable(shape, args.top_k)
        cluster = cluster_estimate(t, args.gpus, args.gpu_memory_gb, args.mfu, args.peak_tflops)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dense = dense_optimal(args.flops)
    if args.write:
        write_recipe(args.write, t, cluster)
    if args.json:
        print(json.dumps({"optimal": asdict(shape), "trainable": asdict(t.shape), "overrides": t.overrides,
                          "dense_chinchilla": dense, "cluster": cluster}, indent=1))
        return 0
    s, r = shape, t.shape
    print(f"budget {args.flops:.3g} FLOPs, expansion E={s.expansion}")
    print(f"compute-optimal: G={s.granularity}, d_model {s.d_model:.0f}, {s.n_blocks:.1f} blocks, "
          f"N {s.total_params:.3g} ({s.active_params:.3g} active), D {s.tokens:.3g} tokens, "
          f"predicted loss {s.loss:.3f}")
    print(f"trainable (d_model {r.d_model:.0f}, {r.n_blocks:.0f} blocks): D {r.tokens:.3g} tokens, "
          f"predicted loss {r.loss:.3f}")
    print("  " + " ".join(t.dotlist()))
    print(f"dense optimum (Chinchilla fit, other data: compare sizes, not losses): N {dense['params']:.3g}, "
          f"D {dense['tokens']:.3g}")
    print(f"on {cluster['gpus']} GPUs (ep {cluster['ep']}, bf16, ZeRO 1, full checkpointing, seq 4096): "
          f"{cluster['peak_gib_per_gpu']:.1f} GiB per GPU{'' if cluster['fits'] else ' (DOES NOT FIT)'}, "
          f"{cluster['train_days']:.1f} days at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s")
    if args.write:
        print(f"recipe written: {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
