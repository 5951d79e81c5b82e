"""Training throughput: our Mixtral against transformers' MixtralForCausalLM in one run.

    python bench/train_throughput.py --preset tiny [--steps 6 --warmup 2 --batch 8 --seq 256
        --dtype fp32|bf16 --device cpu|cuda --rounds 2 --ours deepspeed+fused,torch+logits --json PATH]
    python bench/train_throughput.py --case 86m|mixtral-gpu [any flag above: it overrides the case]

Cases (CASES): `86m` is tiny at dim 512 (86 M parameters), batch 4 x 512; `mixtral-gpu` is two
Mixtral-8x7B layers (dim 4096, 32 heads, 8 kv heads, 8 experts of 14336, top-2; 3.16 B parameters) in
bf16 at 8 x 4096, for one H100/H200: trainer.plan puts the trainer's peak at 71 GiB, set by the optimizer
step (weights, fp32 master and Adam states, bf16 and fp32 gradients), which up to batch 8 needs more than
the activations; on an H200 `--set num_layers=3` fits too (103 GiB). A case's --set items come first,
so `--set attention=sdpa` adds to them.

Both sides train the same config (model.hf.hf_config), the same weights (ours -> model.hf.to_hf ->
transformers' fused expert layout), the same random batch, in the same dtype, with torch's fused AdamW
(transformers' Trainer default, `adamw_torch_fused`, and the trainer's: trainer/engine.py; lr 1e-4,
weight decay 0.1, no clipping) for warmup + steps optimizer steps; warm-up steps are not timed.
- transformers: `model(input_ids, position_ids, labels=input_ids)` with output_router_logits=True, so its loss is the
  shifted cross entropy + router_aux_loss_coef * load-balancing loss, like ours.
- ours, as trainer/tasks.PretrainTask computes it (position_ids given: one document per row, so
  attention takes the document-mask path the trainer takes): mean token cross entropy over the same B*(T-1)
  positions + router_aux_loss_coef * load_balancing_loss (+ z-loss if its coefficient is set), by
    "+fused"  Mixtral.hidden + model.loss.fused_linear_cross_entropy (no (B*T, V) logits), or
    "+logits" Mixtral.forward + parallel.cross_entropy.vocab_parallel_cross_entropy on fp32 logits,
  optionally "+flash" / "+sdpa" forcing model.attention (default: the config's, auto);
  stepped by "torch" (the model and torch AdamW, as transformers is) or "deepspeed" (the real
  trainer.engine.build_engine: DeepSpeed, ZeRO stage --zero-stage, world of one, its AdamW with the
  recipe defaults' betas and no decay on norms; bf16 keeps fp32 master weights there).
In dtype bf16 the "torch" runs and transformers hold bf16 weights and AdamW states. Weights are drawn on
the device (Normal(0, init_std) matrices from one seeded generator, norms as model.init_weights sets them):
model.init_weights draws per 64-row block on the CPU, minutes for billions of parameters.

Every (variant, round) trains in a fresh subprocess, rounds alternate the order; the table gives each
variant's best round (median step time within the round): on a shared machine the least disturbed.
Peak memory: CUDA torch.cuda.max_memory_allocated; CPU the peak resident set size (VmHWM, reset
through /proc/self/clear_refs once the weights are in place) minus the RSS before the model was built,
so it counts weights, gradients, optimizer states, activations and allocator slack.
MFU = tokens/s * model.flops.flops_per_token / peak, against the peak of a large matmul measured in
this run (and, on H100/H200 in bf16, the 989 TFLOP/s datasheet peak). The deepspeed variants also report
trainer.plan's peak for their exact settings (ZeRO stage, bucket, loss, attention backend).
A variant whose worker fails is reported and left out (exit status 1 at the end); --json writes the
results after each variant.
"""

import argparse
import ast
import ctypes
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import Mixtral, flops_per_token, hf_config, load_balancing_loss, model_config, router_z_loss, to_hf  # noqa: E402
from model.attention import pick_backend  # noqa: E402
from model.init import RandomInit  # noqa: E402
from model.loss import fused_linear_cross_entropy  # noqa: E402

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 TFLOP/s of the SXM parts
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = {
    "86m": dict(preset="tiny", set=["dim=512", "num_layers=4", "num_heads=8", "num_kv_heads=4",
                                    "expert_dim=1024"], batch=4, seq=512),
    "mixtral-gpu": dict(preset="mixtral-8x7b", set=["num_layers=2"], batch=8, seq=4096, dtype="bf16"),
}


# ---- memory -----------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_and_reset_peak(device: torch.device) -> None:
    """Free what is garbage, return it to the OS, and restart the peak counter from here."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak_bytes(device: torch.device, baseline_kib: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return (_status_kib("VmHWM") - baseline_kib) * 1024


# ---- the two trainers ---------------------------------------------------------------------------

def hf_state_dict(our_state: dict, cfg) -> dict:
    """Our weights in the in-memory names of transformers 5 (experts fused per layer)."""
    hub = to_hf(our_state, cfg)
    out = {k: v for k, v in hub.items() if ".block_sparse_moe." not in k}
    for i in range(cfg.num_layers):
        q = f"model.layers.{i}.block_sparse_moe."
        w1, w2, w3 = ([hub[f"{q}experts.{e}.{w}.weight"] for e in range(cfg.num_experts)]
                      for w in ("w1", "w2", "w3"))  # per expert (F, D), (D, F), (F, D)
        out[f"model.layers.{i}.mlp.gate.weight"] = hub[q + "gate.weight"]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([a, b]) for a, b in zip(w1, w3)])  # (E, 2F, D)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(w2)  # (E, D, F)
    return out


def bench_config(args, **extra):
    """The preset with the --set overrides (values parsed as Python literals, else strings), then extra."""
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return model_config(args.preset, **overrides, **extra)


@torch.no_grad()
def draw_weights(model, seed: int) -> None:
    """Matrices ~ Normal(0, init_std) from one generator on the model's device; vectors (norms) as
    model.init_weights sets them."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    vectors = RandomInit(model.cfg.init_std, seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.normal_(0, model.cfg.init_std, generator=gen)
        else:
            p.copy_(vectors.read(name, p.shape, [0], p.shape))


def our_loss(model, forward, tokens, positions, labels, loss_path: str):
    """forward: the DeepSpeed engine or the model itself (the trainer calls engine(...) for logits)."""
    cfg = model.cfg
    n = (labels != -100).sum()
    if loss_path == "fused":
        h, stats = model.hidden(tokens, positions)
        ce_sum = fused_linear_cross_entropy(h, model.output.weight, labels)
    else:
        from parallel.cross_entropy import vocab_parallel_cross_entropy
        logits, stats = forward(tokens, positions)
        ce_sum = vocab_parallel_cross_entropy(logits.float(), labels).sum()
    loss = ce_sum / n + cfg.router_aux_loss_coef * load_balancing_loss(stats)
    if cfg.router_z_loss_coef:
        loss = loss + cfg.router_z_loss_coef * router_z_loss(stats)
    return loss


def build_deepspeed(model, args, loss_path: str):
    """(the trainer's DeepSpeed engine around model, trainer.plan's peak bytes for it)."""
    from parallel.layout import Layout
    from trainer import distributed as D
    from trainer.config import load_config
    from parallel.parallelize import parallelize
    from trainer.engine import build_engine, deepspeed_config
    from trainer.plan import plan

    cfg = load_config(None, [f"model.preset={args.preset}", f"pretrain.micro_batch_size={args.batch}",
                             f"pretrain.global_batch_size={args.batch}", f"pretrain.seq_len={args.seq}",
                             f"pretrain.dtype={args.dtype}", "pretrain.lr=1e-4", "pretrain.grad_clip=0",
                             "pretrain.warmup_steps=0", "pretrain.weight_decay=0.1",
                             f"parallel.zero_stage={args.zero_stage}"])
    layout = Layout.build(cfg.parallel, model.cfg, cfg.pretrain, D.world_size(), D.rank())
    zero = deepspeed_config(cfg.pretrain, layout, cfg.parallel.zero_stage)["zero_optimization"]
    device = D.device()
    planned = plan(model.cfg, zero_stage=zero["stage"], micro_batch=args.batch, seq_len=args.seq,
                   dtype=args.dtype, fused_loss=loss_path == "fused", device=device.type,
                   document_mask=pick_backend(model.cfg.attention, device) != "flash",
                   reduce_bucket_size=zero["reduce_bucket_size"])["peak"]
    model = parallelize(model, layout, cfg.parallel).to(device)
    engine = build_engine(model, cfg.pretrain, cfg.parallel, layout)
    return engine, planned


def run_worker(args) -> dict:
    """Train one variant; returns its measurements."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    parts = ["hf", None] if args.worker == "transformers" else args.worker.split("+")
    engine_kind, loss_path, *attention = parts  # attention: [] or [flash|sdpa]
    cfg = bench_config(args, **({"attention": attention[0]} if attention else {}))
    if engine_kind == "deepspeed":
        from trainer import distributed as D
        D.init_distributed()  # before the baseline: deepspeed's own start-up memory is not the model's
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.warmup + args.steps, args.batch, args.seq + 1), generator=gen)
    gc.collect()
    baseline_kib = _status_kib("VmRSS") if device.type == "cpu" else 0

    with torch.device(device):
        model = Mixtral(cfg)
        draw_weights(model, args.seed)
        if engine_kind == "hf":
            from transformers import MixtralForCausalLM
            hc = hf_config(cfg)
            hc.output_router_logits = True
            hf = MixtralForCausalLM(hc)
            hf.load_state_dict(hf_state_dict(model.state_dict(), cfg), strict=True)
            model = hf
    attention = None if engine_kind == "hf" else pick_backend(cfg.attention, device)
    release_and_reset_peak(device)
    planned = None
    if engine_kind == "deepspeed":
        engine, planned = build_deepspeed(model, args, loss_path)  # casts the model for bf16
        model = engine.module
    else:
        model.to(device=device, dtype=dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    model.train()

    positions = torch.arange(args.seq, device=device).expand(args.batch, args.seq)  # as the trainer passes

    def step(batch):
        batch = batch.to(device)
        tokens = batch[:, :-1]
        if engine_kind == "hf":
            loss = model(input_ids=tokens, position_ids=positions, labels=tokens).loss
        else:  # the same targets as transformers' internal shift: the last position has none
            labels = batch[:, 1:].clone()
            labels[:, -1] = -100
            loss = our_loss(model, engine if engine_kind == "deepspeed" else model, tokens, positions,
                            labels, loss_path)
        if engine_kind == "deepspeed":
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises the device

    times, first_loss = [], None
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step(data[i])
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        first_loss = loss if first_loss is None else first_loss
    median = sorted(times)[len(times) // 2]
    return {"variant": args.worker, "step_s": median, "tokens_per_s": args.batch * args.seq / median,
            "peak_bytes": peak_bytes(device, baseline_kib), "planned_peak_bytes": planned,
            "attention": attention, "first_loss": first_loss, "last_loss": loss}


# ---- the parent: peak FLOP/s, subprocesses, table -----------------------------------------------------

def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10 if device.type == "cuda" else 5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / (10 if device.type == "cuda" else 1))
    return 2 * n ** 3 / best


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16.items() if k in name), 0.0)


def spawn(variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", variant]
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(results: dict, args, peak: float, sheet: float) -> str:
    cfg = bench_config(args)
    fpt = flops_per_token(cfg, args.seq)["total"]
    mem_name = "peak GPU mem GiB" if args.device == "cuda" else "peak RSS GiB"
    head = ["variant", "tokens/s", "step ms", "model TFLOP/s", f"MFU vs {peak / 1e12:.3g} TF measured"]
    head += ["MFU vs datasheet"] if sheet else []
    head += [mem_name, "planner GiB", "loss step 1 -> last"]
    rows = []
    for name, r in results.items():
        row = [name, f"{r['tokens_per_s']:.0f}", f"{1e3 * r['step_s']:.0f}",
               f"{r['tokens_per_s'] * fpt / 1e12:.4g}", f"{100 * r['tokens_per_s'] * fpt / peak:.1f}%"]
        row += [f"{100 * r['tokens_per_s'] * fpt / sheet:.1f}%"] if sheet else []
        planned = f"{r['planned_peak_bytes'] / 2 ** 30:.3f}" if r["planned_peak_bytes"] else ""
        row += [f"{r['peak_bytes'] / 2 ** 30:.3f}", planned, f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"]
        rows.append(row)
    hf = results.get("transformers")
    for name, r in results.items():
        if hf and name != "transformers":
            ratio = r["tokens_per_s"] / hf["tokens_per_s"]
            row = [f"{name} / transformers", f"{ratio:.2f}x", "", f"{ratio:.2f}x", ""]
            row += [""] if sheet else []
            rows.append(row + [f"{r['peak_bytes'] / hf['peak_bytes']:.2f}x", "", ""])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=sorted(CASES), help="a named shape (CASES); explicit flags override it")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model config overrides, e.g. dim=2048 expert_dim=7168 num_layers=8")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, order alternating")
    p.add_argument("--ours", default="deepspeed+fused,deepspeed+logits,torch+fused,torch+logits",
                   help="comma list of ENGINE+LOSS[+ATTENTION], ENGINE in {torch, deepspeed}, LOSS in "
                   "{fused, logits}, ATTENTION in {flash, sdpa} (default: model.attention)")
    p.add_argument("--zero-stage", type=int, default=1, help="DeepSpeed ZeRO stage of the deepspeed variants "
                   "(1: the trainer's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the measurements here as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    case = CASES.get(p.parse_known_args(argv)[0].case, {})
    p.set_defaults(**{k: v for k, v in case.items() if k != "set"})
    args = p.parse_args(argv)
    args.set = case.get("set", []) + args.set
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return
    variants = args.ours.split(",") + ["transformers"]
    if importlib.util.find_spec("deepspeed") is None:
        print("deepspeed is not installed: its variants are skipped")
        variants = [v for v in variants if not v.startswith("deepspeed")]
    for v in variants[:-1]:
        engine, loss, *attention = v.split("+")
        if engine not in ("torch", "deepspeed") or loss not in ("fused", "logits") or \
                attention not in ([], ["flash"], ["sdpa"]):
            p.error(f"--ours: {v!r} is not ENGINE+LOSS[+ATTENTION] "
                    "(torch|deepspeed + fused|logits [+ flash|sdpa])")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    forwarded = list(argv if argv is not None else sys.argv[1:])
    peak, sheet = measured_peak_flops(device, dtype), datasheet_peak(device, dtype)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch threads"
    shape = f"{args.preset} {' '.join(args.set)}".strip()
    results, failed = {}, {}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            try:
                res = spawn(v, forwarded)
                print(f"round {r + 1}: {v:18s} {res['tokens_per_s']:8.0f} tokens/s  "
                      f"{res['peak_bytes'] / 2 ** 30:.3f} GiB  loss {res['first_loss']:.5f}", flush=True)
                if v not in results or res["tokens_per_s"] > results[v]["tokens_per_s"]:
                    results[v] = res
            except RuntimeError as e:
                print(f"round {r + 1}: {e}", flush=True)
                failed[v] = str(e)[-2000:]
            if args.json:
                Path(args.json).write_text(json.dumps(dict(
                    shape=shape, batch=args.batch, seq=args.seq, dtype=args.dtype, device=where,
                    flops_per_token=flops_per_token(bench_config(args), args.seq)["total"],
                    peak_flops_measured=peak, peak_flops_datasheet=sheet, results=results, failed=failed),
                    indent=1))
    print(f"\n{shape}, batch {args.batch} x seq {args.seq}, {args.dtype}, {where}, torch "
          f"{torch.__version__}; {args.steps} timed steps after {args.warmup}, best of {args.rounds} rounds")
    print(table(results, args, peak, sheet) if results else "no variant finished")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
