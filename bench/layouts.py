"""Training throughput and memory of one preset at several layouts on 2 processes, through the trainer.

    python bench/layouts.py [--preset tiny] [--steps 8] [--layouts dp2,tp2,tp2-sp,ep2]

Each layout runs `torchrun --nproc-per-node 2 -m trainer recipes/quickstart.yaml` (pretraining on the
shipped corpus, same seed, batch and steps) in turn; the table takes the median tokens/s and step time
of the logged steps after the first two (warm-up) from metrics.jsonl, the peak memory per rank
(memory_gb: CUDA max allocated, on the CPU the peak RSS) and the final loss, and the ratio of each
layout's tokens/s to the first one's, measured in the same run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "dp2": ["parallel.zero_stage=1"],
    "tp2": ["parallel.tp=2"],
    "tp2-sp": ["parallel.tp=2", "parallel.sp=true"],
    "ep2": ["parallel.ep=2", "parallel.zero_stage=1"],
}


def run(layout: str, preset: str, steps: int, batch: int, seq: int, folder: Path) -> dict:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
            "trainer", "recipes/quickstart.yaml", "stages=[tokenize,pretrain]", f"run_dir={folder}",
            f"model.preset={preset}", f"pretrain.steps={steps}", f"pretrain.micro_batch_size={batch}",
            f"pretrain.global_batch_size={2 * batch}", f"pretrain.seq_len={seq}", "pretrain.log_every=1",
            f"pretrain.save_every={10 * steps}", "logging.progress=false", *LAYOUTS[layout]]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS=str(max(1, os.cpu_count() // 2)))
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{layout} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (folder / "pretrain/metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r][2:]
    return dict(tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
                step_s=statistics.median(r["step_time"] for r in timed),
                memory_gb=max(r["memory_gb"] for r in rows), loss=rows[-1]["loss"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="micro-batch per data-parallel rank")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.layouts.split(","):
            results[name] = run(name, a.preset, a.steps, a.batch, a.seq, Path(tmp) / name)
    base = next(iter(results.values()))["tokens_per_s"]
    print(f"preset {a.preset}, 2 processes, micro-batch {a.batch} x {a.seq}, {a.steps} steps "
          f"(median of steps 3..{a.steps})")
    print("| layout | tokens/s | vs first | step s | peak memory GiB/rank | final loss |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | {r['step_s']:.3f} | "
              f"{r['memory_gb']:.2f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
