"""One MoE layer (router + experts), forward + backward: ours against transformers and DeepSpeed.

    python bench/moe_layer.py [--tokens 4096 --dim 256 --expert-dim 512 --experts 8 --top-k 2
        --granularity 1,2,4,8 --steps 3 --warmup 1 --threads 1 --dtype fp32|bf16 --device cpu|cuda
        --variants ours,hf-eager,... --json PATH --keep-freed-memory]

Granularity G (fine-grained MoE): G x experts experts of hidden expert-dim / G, top G x top-k: the same
FLOPs per token at every G. Variants, all on one device with the same router weights and tokens:
    ours                  model.moe.MoE: dropless, sort by expert + grouped GEMMs
    hf-eager              transformers' MixtralSparseMoeBlock, experts_implementation="eager" (a loop
                          over the experts that got tokens; what a block built from a bare config runs)
    hf-grouped_mm         the same block with experts_implementation="grouped_mm" (what MixtralForCausalLM runs)
    deepspeed-moe         deepspeed.moe.layer.MoE: its TopKGate (capacity factor 1, no 2nd-expert sampling),
                          (E, capacity, D) buffers and a loop over per-expert SwiGLU modules
    ours+deepspeed-moe    parallel/deepspeed_moe.py (moe_impl=deepspeed): our router, DeepSpeed's capacity
                          dispatch (factor 1), batched GEMMs over the capacity buffers
The capacity variants drop assignments beyond capacity (they compute about as many rows as dropless).
Loss: sum(out * g) for a fixed random g. Time: the fastest of --steps after --warmup (on a shared
machine the least disturbed; the variants take turns), one process, --threads CPU threads (1 by default:
OpenMP threads on an oversubscribed machine made single steps up to 100x slower).
Peak memory above the weights and inputs of one forward + backward: CUDA max_memory_allocated, CPU peak
RSS (VmHWM, reset before the step; bench/train_throughput.py's helpers). Weights are built on the device.
--json writes the table's rows as a JSON list. --keep-freed-memory (CPU): glibc keeps freed blocks for
reuse (mallopt M_MMAP_MAX 0), as CUDA's caching allocator does; by default it returns every block over
32 MiB to the OS and page-faults it back on the next allocation, a cost that grows with the (N k, D) rows
of fine granularity and that GPUs do not have.
"""

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from bench.train_throughput import _status_kib, peak_bytes, release_and_reset_peak  # noqa: E402
from model.moe import MoE  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
VARIANTS = ("ours", "hf-eager", "hf-grouped_mm", "deepspeed-moe", "ours+deepspeed-moe")


class SwiGLU(nn.Module):
    """One expert for deepspeed.moe.layer.MoE, which copies it once per expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


def build(variant: str, moe: MoE, layout, top_k: int):
    """(module, forward x (N, D) -> (N, D)) holding `moe`'s weights in the variant's layout."""
    E, D, F = moe.experts.w1.shape
    if variant == "ours":
        return moe, lambda x: moe(x[None])[0][0]
    if variant.startswith("hf-"):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        impl = variant[len("hf-"):]
        block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                                    num_experts_per_tok=top_k, experts_implementation=impl))
        ex = moe.experts
        block.load_state_dict({"gate.weight": moe.router.gate.weight,
                               "experts.gate_up_proj": torch.cat([ex.w1.mT, ex.w3.mT], 1),
                               "experts.down_proj": ex.w2.mT})
        return block, lambda x: block(x[None])[0]
    if variant == "deepspeed-moe":
        from deepspeed.moe.layer import MoE as DeepSpeedMoE
        layer = DeepSpeedMoE(D, SwiGLU(D, F), num_experts=E, k=top_k, capacity_factor=1.0, use_rts=False,
                             top2_2nd_expert_sampling=False)
        layer.set_deepspeed_parallelism()
        with torch.no_grad():
            layer.deepspeed_moe.gate.wg.weight.copy_(moe.router.gate.weight)
            for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
                for w in ("w1", "w3", "w2"):
                    getattr(expert, w).weight.copy_(getattr(moe.experts, w)[e].mT)
        return layer, lambda x: layer(x)[0]
    from parallel.parallelize import expert_parallel_experts
    twin = MoE(D, E, top_k, F)
    twin.load_state_dict(moe.state_dict())
    twin.experts = expert_parallel_experts(twin.experts, layout,
                                           SimpleNamespace(moe_impl="deepspeed", capacity_factor=1.0))
    return twin, lambda x: twin(x[None])[0][0]


def step(module, forward, x, g, device) -> float:
    """Seconds of one forward + backward."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    t0 = time.perf_counter()
    (forward(x) * g).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(built: dict, x, g, steps: int, warmup: int, device) -> dict:
    """variant -> (fastest seconds of a forward + backward, peak bytes above the state before it).
    The variants take turns, in alternating order, so that a disturbance hits them alike."""
    for _ in range(warmup):
        for module, forward in built.values():
            step(module, forward, x, g, device)
    times = {variant: [] for variant in built}
    for r in range(steps):
        for variant in (list(built) if r % 2 == 0 else list(built)[::-1]):
            times[variant].append(step(*built[variant], x, g, device))
    results = {}
    for variant, (module, forward) in built.items():
        module.zero_grad(set_to_none=True)
        release_and_reset_peak(device)
        baseline = _status_kib("VmRSS") if device.type == "cpu" else 0
        step(module, forward, x, g, device)
        results[variant] = min(times[variant]), peak_bytes(device, baseline)
    return results


def single_rank_layout():
    """parallel/deepspeed_moe.py needs the ep group of a 1-rank world."""
    from parallel.layout import Layout
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    dist.init_process_group("gloo", rank=0, world_size=1)
    shape = SimpleNamespace(num_experts=1, num_heads=1, num_kv_heads=1, vocab_size=1, dim=1)
    return Layout.build(SimpleNamespace(tp=1, ep=1, sp=False, expert_tp=False), shape, None, 1, 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--expert-dim", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--granularity", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", help="write the rows here as JSON")
    ap.add_argument("--keep-freed-memory", action="store_true", help="CPU: no mmap'd blocks (see above)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.keep_freed_memory and device.type == "cpu":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    torch.set_num_threads(args.threads)
    layout = single_rank_layout()
    variants = args.variants.split(",")

    print(f"{args.tokens} tokens, dim {args.dim}, {args.dtype} on {device} ({torch.get_num_threads()} threads)\n")
    print("| G | experts x hidden, top-k | variant | tokens/s | vs hf-eager | ms | peak MiB | cost vs G=1 |")
    print("|---|---|---|---|---|---|---|---|")
    base, records = {}, []
    for G in map(int, args.granularity.split(",")):
        E, k, F = args.experts * G, args.top_k * G, args.expert_dim // G
        torch.manual_seed(0)
        with torch.device(device):
            moe = MoE(args.dim, E, k, F)
            for p in moe.experts.parameters():
                nn.init.normal_(p, std=args.dim ** -0.5)
            moe.to(dtype)
            x = torch.randn(args.tokens, args.dim, dtype=dtype, requires_grad=True)
            g = torch.randn_like(x)
            built = {variant: build(variant, moe, layout, k) for variant in variants}
        for module, _ in built.values():
            module.to(device, dtype)
        rows = measure(built, x, g, args.steps, args.warmup, device)
        for variant, (seconds, peak) in rows.items():
            base.setdefault(variant, seconds)
            ref = rows.get("hf-eager", (seconds,))[0]
            print(f"| {G} | {E} x {F}, top-{k} | {variant} | {args.tokens / seconds:,.0f} | "
                  f"{ref / seconds:.2f}x | {seconds * 1e3:.1f} | {peak / 2**20:.0f} | "
                  f"{seconds / base[variant]:.2f}x |", flush=True)
            records.append(dict(G=G, experts=E, expert_dim=F, top_k=k, variant=variant, seconds=seconds,
                                tokens_per_s=args.tokens / seconds, peak_bytes=peak))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(tokens=args.tokens, dim=args.dim, dtype=args.dtype,
                                                       device=str(device), rows=records), indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
