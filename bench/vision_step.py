"""Image-text training step against a text-only step of the same decoder, in one process.

    python bench/vision_step.py [--preset debug --vision-preset debug --vocab 131072 --batch 4 --seq 256
        --images-per-row 5 --image-size 48 --steps 8 --warmup 2 --dtype fp32|bf16 --device cpu|cuda
        --threads 0 --json PATH]

The defaults are the vision quickstart's step (recipes/vision_quickstart.yaml): the debug decoder with
Tekken's 131072-token vocabulary and the debug encoder, 4 rows of 256 positions, about 5 conversations
of one 48-pixel clip-art image (3 x 3 patches) per row.

Both steps run the same number of decoder positions (batch x seq) through the same decoder (the same
weights) with the same loss positions; they differ only in the images:
    image-text  model/multimodal.py: per row `--images-per-row` images of image-size^2 pixels, each laid
                out as mistral-common does (rows of [IMG] x cols + [IMG_BREAK], the last ending in
                [IMG_END]) after a few text tokens; the encoder and projector run on all of them, their
                features replace the [IMG] embeddings
    text-only   model.Mixtral: the same tokens with text ids in place of the image tokens
Loss as trainer/vision_sft.py computes it at tp 1 (multimodal_logits_or_loss): the hidden states at the
loss positions (every text position whose next token is text) through model/loss.py's fused head +
cross entropy, mean over them, + router_aux_loss_coef x load-balancing loss. Stepped by the trainer's
engine (trainer.engine.build_engine: DeepSpeed, a world of one, AdamW at lr 1e-3, clipping at 1.0).
Weights: matrices ~ Normal(0, init_std) from one generator on the device (bench/train_throughput.py's
draw_weights; model.init_weights draws the 131072-row vocabulary per 64-row block, ~12 s on the CPU),
the encoder and projector as Multimodal.init_image_side.

Timing: both models live in this process and their timed steps alternate (text, image, image, text,
...), so a disturbance on a shared machine hits both alike. tokens/s counts decoder positions, from the
median step time; the ratio is the median over adjacent pairs of steps. Memory, per variant: the bytes
it holds after warm-up (weights, gradients, optimizer state; held memory measured before and after it
was built) plus the largest rise during one of its steps above what was held before the step. CUDA:
memory_allocated / max_memory_allocated; CPU: RSS / peak RSS (VmHWM, reset before each step after
returning freed memory to the OS: bench/train_throughput.py's helpers; glibc's mmap threshold is fixed so
that a freed tensor leaves the RSS instead of serving the other variant's next allocations).
"""

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the repository root instead of bench/, whose tokenize.py would shadow the standard library's
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402

from bench.train_throughput import _status_kib, draw_weights, release_and_reset_peak  # noqa: E402
from model import Mixtral, load_balancing_loss, model_config  # noqa: E402
from model.loss import fused_linear_cross_entropy  # noqa: E402
from model.multimodal import Multimodal, MultimodalConfig  # noqa: E402
from model.vision import vision_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMG, IMG_BREAK, IMG_END = 10, 12, 13  # Tekken's image tokens
FIRST_TEXT_ID = 1000  # Tekken's ids below 1000 are special tokens
TEXT_BEFORE_IMAGE = 8  # text tokens before each image (a question's worth)
VARIANTS = ("text-only", "image-text")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def image_run(rows: int, cols: int) -> list[int]:
    run = ([IMG] * cols + [IMG_BREAK]) * rows
    return run[:-1] + [IMG_END]


def make_batch(args, cfg: MultimodalConfig, gen: torch.Generator) -> dict:
    """tokens (B, T) with the image runs, text_tokens (B, T) without, labels (B, T), images."""
    side = args.image_size // cfg.vision.patch_size
    run = image_run(side, side)
    per_image = TEXT_BEFORE_IMAGE + len(run)
    if args.images_per_row * per_image >= args.seq:
        sys.exit(f"--images-per-row {args.images_per_row} images of {len(run)} tokens "
                 f"(+{TEXT_BEFORE_IMAGE} text each) do not fit --seq {args.seq}")

    def text(*shape):
        return torch.randint(FIRST_TEXT_ID, cfg.text.vocab_size, shape, generator=gen)

    tokens = text(args.batch, args.seq + 1)
    for r in range(args.batch):
        for i in range(args.images_per_row):
            at = i * per_image + TEXT_BEFORE_IMAGE
            tokens[r, at:at + len(run)] = torch.tensor(run)
    is_image = (tokens == IMG) | (tokens == IMG_BREAK) | (tokens == IMG_END)
    labels = torch.where(is_image[:, 1:] | is_image[:, :-1], -100, tokens[:, 1:])  # text after text
    images = [torch.randn(3, args.image_size, args.image_size, generator=gen)
              for _ in range(args.batch * args.images_per_row)]
    return dict(tokens=tokens[:, :-1], text_tokens=torch.where(is_image, text(*tokens.shape), tokens)[:, :-1],
                labels=labels, images=images)


def held_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else _status_kib("VmRSS") * 1024


def peak_since_reset(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024


def build_engine(model, args):
    from parallel.layout import Layout
    from trainer import distributed as D
    from trainer.config import load_config
    from trainer.engine import build_engine as trainer_engine

    cfg = load_config(None, [f"pretrain.micro_batch_size={args.batch}", f"pretrain.seq_len={args.seq}",
                             f"pretrain.global_batch_size={args.batch}", f"pretrain.dtype={args.dtype}",
                             "pretrain.lr=1e-3", "pretrain.warmup_steps=0"])
    text_cfg = model.cfg.text if isinstance(model, Multimodal) else model.cfg
    layout = Layout.build(cfg.parallel, text_cfg, cfg.pretrain, D.world_size(), D.rank())
    return trainer_engine(model, cfg.pretrain, cfg.parallel, layout)


def build_step(variant: str, args, cfg: MultimodalConfig, batch: dict):
    """(one training step of `variant`: () -> loss, the bytes its model holds after warm-up)."""
    device = torch.device(args.device)
    release_and_reset_peak(device)
    before = held_bytes(device)
    with torch.device(device):
        model = Multimodal(cfg) if variant == "image-text" else Mixtral(cfg.text)
        draw_weights(model.decoder if variant == "image-text" else model, args.seed)
    if variant == "image-text":
        model.init_image_side(args.seed)
    engine = build_engine(model, args)
    model = engine.module.train()
    tokens = batch["tokens" if variant == "image-text" else "text_tokens"].to(device)
    labels = batch["labels"].to(device)
    positions = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
    images = [i.to(device) for i in batch["images"]]
    keep = labels != -100

    def step() -> float:
        hidden, stats = (model.hidden(tokens, images, positions) if variant == "image-text"
                         else model.hidden(tokens, positions))
        ce_sum = fused_linear_cross_entropy(hidden[keep], model.output.weight, labels[keep])
        loss = ce_sum / keep.sum() + cfg.text.router_aux_loss_coef * load_balancing_loss(stats)
        engine.backward(loss)
        engine.step()
        return loss.item()  # synchronises the device

    for _ in range(args.warmup):
        step()
    release_and_reset_peak(device)
    return step, held_bytes(device) - before


def measure(args, cfg: MultimodalConfig) -> dict:
    from trainer import distributed as D
    D.init_distributed()  # a world of one
    device = torch.device(args.device)
    if device.type == "cpu":  # a fixed threshold (glibc raises it after each free otherwise): freed tensors
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # leave the RSS at once
    # a small model first: the one-time imports and allocations of building and stepping an engine
    # (DeepSpeed's, torch.optim's) are counted in neither variant's memory
    small = MultimodalConfig(vision=cfg.vision, text=model_config("debug", vocab_size=2 * FIRST_TEXT_ID))
    build_step("image-text", args, small, make_batch(args, small, torch.Generator()))
    batch = make_batch(args, cfg, torch.Generator().manual_seed(args.seed))
    steps, results = {}, {}
    for v in VARIANTS:
        steps[v], held = build_step(v, args, cfg, batch)
        results[v] = {"held_bytes": held, "step_rise_bytes": 0, "step_s": [], "losses": []}
    for i in range(args.steps):
        for v in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            release_and_reset_peak(device)
            before = held_bytes(device)
            t0 = time.perf_counter()
            results[v]["losses"].append(steps[v]())
            results[v]["step_s"].append(time.perf_counter() - t0)
            rise = peak_since_reset(device) - before
            results[v]["step_rise_bytes"] = max(results[v]["step_rise_bytes"], rise)
    for v, r in results.items():
        median = sorted(r["step_s"])[len(r["step_s"]) // 2]
        r.update(median_step_s=median, tokens_per_s=args.batch * args.seq / median,
                 images_per_s=len(batch["images"]) / median if v == "image-text" else 0.0,
                 peak_bytes=r["held_bytes"] + r["step_rise_bytes"])
    pairs = sorted(a / b for a, b in zip(results["text-only"]["step_s"], results["image-text"]["step_s"]))
    return {"results": results, "tokens_per_s_ratio": pairs[len(pairs) // 2],
            "image_positions": int((batch["tokens"] == IMG).sum())}


def table(measured: dict, device: str) -> str:
    results = measured["results"]
    memory = "peak GPU mem GiB" if device == "cuda" else "peak RSS GiB"
    lines = [f"| step | tokens/s | step ms | images/s | {memory} (held + step) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        images = f"{r['images_per_s']:.1f}" if r["images_per_s"] else ""
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {1e3 * r['median_step_s']:.0f} | {images} | "
                     f"{r['peak_bytes'] / 2 ** 30:.3f} ({r['held_bytes'] / 2 ** 30:.3f} + "
                     f"{r['step_rise_bytes'] / 2 ** 30:.3f}) |")
    text, mm = results["text-only"], results["image-text"]
    lines.append(f"| image-text / text-only | {measured['tokens_per_s_ratio']:.2f}x (median of pairs) | "
                 f"{mm['median_step_s'] / text['median_step_s']:.2f}x | | "
                 f"{mm['peak_bytes'] / text['peak_bytes']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug", help="the decoder's model preset")
    p.add_argument("--vision-preset", default="debug")
    p.add_argument("--vocab", type=int, default=131072, help="the decoder's vocabulary (Tekken's: 131072)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--images-per-row", type=int, default=5)
    p.add_argument("--image-size", type=int, default=48, help="side in pixels, a multiple of the patch size")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps of each variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the measurements here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = MultimodalConfig(vision=vision_config(args.vision_preset),
                           text=model_config(args.preset, vocab_size=args.vocab))
    if args.image_size % cfg.vision.patch_size:
        p.error(f"--image-size {args.image_size} is not a multiple of the patch size {cfg.vision.patch_size}")
    measured = measure(args, cfg)
    where = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
        f"{torch.get_num_threads()} torch threads"
    print(f"\ndecoder {args.preset} (vocab {args.vocab}), encoder {args.vision_preset}; batch {args.batch} "
          f"x seq {args.seq}, {args.images_per_row} images of {args.image_size} px per row "
          f"({measured['image_positions']} of {args.batch * args.seq} positions are image patches), "
          f"{args.dtype}, {where}, torch {torch.__version__}; {args.steps} timed steps of each after "
          f"{args.warmup}, alternating")
    print(table(measured, args.device))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), device_name=where, **measured), indent=1))


if __name__ == "__main__":
    main()
