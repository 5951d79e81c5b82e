"""Host memory of expert parallelism, measured on this machine (gloo ranks on the CPU):

    python bench/memory.py [--preset mid] [--work /tmp/memory-bench]

(a) build + first step: the peak RSS of each of 2 ranks at EP2 against one process (both bf16, ZeRO-1,
    AdamW, one micro-batch of 1 x 128 tokens); the model is built on the meta device and each rank
    materializes only its shards.
(b) SFT start from an HF folder (written by trainer.export from (a)'s checkpoint, bf16, 100 MB
    shards): each of 2 EP2 ranks materializes its shards from the folder (trainer.engine.build_model,
    safetensors get_slice); its peak RSS above the process baseline against the folder's size.
(c) export of that checkpoint (trainer.export, streaming): peak RSS above the baseline against the
    model's fp32 size.
The baseline is the process's RSS after its imports (torch, DeepSpeed, transformers), torch's first use
of the meta device (it imports its meta kernels then: ~75 MB, whatever the model) and, for ranks,
torch.distributed's start. Peaks are ru_maxrss. Every measurement runs in fresh processes.
"""

import argparse
import json
import os
import resource
import shutil
import socket
import sys
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OVERRIDES = ["pretrain.dtype=bf16", "parallel.zero_stage=1", "pretrain.micro_batch_size=1",
             "pretrain.seq_len=128", "pretrain.output=unused", "logging.wandb=disabled"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_up() -> int:
    """The baseline: imports done and the meta device used once (by a debug-size model)."""
    import torch

    from model import Mixtral, model_config

    with torch.device("meta"):
        Mixtral(model_config("debug"))
    return rss_bytes()


def _worker(rank, world, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), WANDB_MODE="disabled")
    torch.set_num_threads(1)
    try:
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        queue.put((rank, fn(rank, world, *args)))
    except BaseException as e:
        queue.put((rank, f"error: {type(e).__name__}: {e}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world: int, fn, *args) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in range(world))
    for p in procs:
        p.join()
    bad = [r for r in results.values() if isinstance(r, str)]
    if bad:
        raise RuntimeError(bad[0])
    return [results[r] for r in range(world)]


def build_and_step(rank, world, preset, ckpt_root):
    """(baseline, peak) of building the model at EP=world and one training step; world 1 then saves
    a checkpoint (after the peak is read) for (b) and (c)."""
    import torch

    from parallel.layout import Layout
    from trainer.checkpoint import save_checkpoint
    from trainer.config import load_config, model_config_of
    from trainer.engine import build_engine, build_model

    cfg = load_config(None, [f"model.preset={preset}", f"parallel.ep={world}",
                             f"pretrain.global_batch_size={world}", *OVERRIDES])
    mcfg = model_config_of(cfg)
    layout = Layout.build(cfg.parallel, mcfg, cfg.pretrain, world, rank)
    tokens = torch.randint(0, mcfg.vocab_size, (1, 129), generator=torch.Generator().manual_seed(rank))
    base = start_up()
    model = build_model(mcfg, None, 0, layout, cfg.parallel, torch.bfloat16)
    engine = build_engine(model, cfg.pretrain, cfg.parallel, layout)
    logits, _ = engine(tokens[:, :-1])
    engine.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[0, 1:]))
    engine.step()
    peak = peak_bytes()
    if ckpt_root:
        from omegaconf import OmegaConf
        save_checkpoint(ckpt_root, 1, engine, {"stage": "pretrain"}, OmegaConf.to_yaml(cfg, resolve=True))
    return base, peak, sum(p.numel() for p in model.parameters())


def load_from_hf(rank, world, hf_dir):
    import torch

    from model.hf import model_config_from_hf
    from parallel.layout import Layout
    from trainer.config import load_config
    from trainer.engine import build_model

    mcfg = model_config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
    cfg = load_config(None, [f"parallel.ep={world}", f"pretrain.global_batch_size={world}", *OVERRIDES])
    layout = Layout.build(cfg.parallel, mcfg, cfg.pretrain, world, rank)
    base = start_up()
    build_model(mcfg, hf_dir, 0, layout, cfg.parallel, torch.bfloat16)
    return base, peak_bytes()


def export(rank, world, ckpt, hf_dir):
    from trainer.export import export_checkpoint

    base = start_up()
    export_checkpoint(ckpt, hf_dir, dtype="bf16", max_shard_size="100MB")
    return base, peak_bytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--work", default="/tmp/memory-bench")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"  # noqa: E731

    (base1, peak1, n), = spawn(1, build_and_step, args.preset, str(work / "ckpt"))
    ranks = spawn(2, build_and_step, args.preset, "")
    print(f"model: {args.preset}, {n / 1e6:.0f} M parameters, fp32 {gib(4 * n)}")
    print(f"(a) build + first step, one process: peak {gib(peak1)} (baseline {gib(base1)})")
    for r, (base, peak, local) in enumerate(ranks):
        print(f"    EP2 rank {r}: {local / 1e6:.0f} M parameters, peak {gib(peak)} (baseline {gib(base)}): "
              f"{peak / peak1:.3f} x the one process ({(peak - base) / (peak1 - base1):.3f} above baselines)")

    ckpt = work / "ckpt" / "step_00000001"
    (base, peak), = spawn(1, export, str(ckpt), str(work / "hf"))
    print(f"(c) export: peak {gib(peak)}, {gib(peak - base)} above the baseline: "
          f"{(peak - base) / (4 * n):.3f} x the fp32 model")
    folder = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
    for r, (base, peak) in enumerate(spawn(2, load_from_hf, str(work / "hf"))):
        print(f"(b) EP2 rank {r} from the HF folder ({gib(folder)}): {gib(peak - base)} above the baseline: "
              f"{(peak - base) / folder:.3f} x the folder")


if __name__ == "__main__":
    main()
