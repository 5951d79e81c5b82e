"""AdamW's step on the parameters of a model shape: torch's default implementation (a loop over tensors on
the CPU, foreach on CUDA), foreach, and fused (the trainer's choice, trainer/engine.py), in one process,
taking turns.

    python bench/optimizer_step.py [--case 86m | --preset tiny --set dim=512 ...] [--rounds 5] [--device cpu|cuda]

Parameters: the model's shapes (built on the meta device), fp32, with random gradients, split into the
trainer's two groups (decay on matrices). Time: the fastest of --rounds steps of each variant (the machine
least disturbed); the ratio is against the default.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import CASES  # noqa: E402
from model import Mixtral, model_config  # noqa: E402

VARIANTS = {"default": {}, "foreach": dict(foreach=True), "fused": dict(fused=True)}


def optimizer(shapes, device, **kind):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    groups = [dict(params=[p for p in params if p.dim() > 1], weight_decay=0.1),
              dict(params=[p for p in params if p.dim() <= 1], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), **kind)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=sorted(CASES), default="86m")
    p.add_argument("--preset")
    p.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    case = CASES[args.case]
    overrides = dict(kv.split("=", 1) for kv in (args.set if args.set is not None else case["set"]))
    cfg = model_config(args.preset or case["preset"], **{k: int(v) for k, v in overrides.items()})
    with torch.device("meta"):
        shapes = [tuple(q.shape) for q in Mixtral(cfg).parameters()]
    opts = {name: optimizer(shapes, args.device, **kind) for name, kind in VARIANTS.items()}
    best = dict.fromkeys(opts, float("inf"))
    for _ in range(args.rounds):
        for name, opt in opts.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    count = sum(torch.Size(s).numel() for s in shapes)
    print(f"AdamW step, {count / 1e6:.1f} M fp32 parameters in {len(shapes)} tensors, {args.device}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds}:")
    for name, t in best.items():
        print(f"  {name:8s} {t * 1e3:8.1f} ms   {best['default'] / t:5.2f}x the default   "
              f"{count * 4 * 4 / t / 1e9:6.1f} GB/s (param, grad, 2 moments)")


if __name__ == "__main__":
    main()
