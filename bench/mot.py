"""Mixture of Tokens side by side with a sparse top-2 MoE and a dense model of the same FLOPs per token.

    python bench/mot.py [--steps 300 --batch 16 --seq 128 --lr 3e-3 --out runs/bench_mot
                         --variants dense,sparse,mot-g4,mot-g8]

Every variant is the `tiny` preset (dim 128, 4 layers) trained by the trainer's CLI on the shipped corpus
(tokenized once), same seed, data order, batch, steps and schedule; they differ only in the feed-forward
layer, all at 2 x 256 = 512 expert hidden units per token (model.flops.flops_per_token is printed):
    dense    one expert of hidden 512 (num_experts 1, top_k 1)
    sparse   8 experts of hidden 256, top-2 (Mixtral's router, load-balancing loss 0.02)
    mot-gG   Mixture of Tokens, E = 2G experts of hidden 256, group size G: E/G = 2 expert passes per token
The table gives each run's final training loss (mean of the last --window steps), its held-out loss, and
the first step at which its trailing --window-step mean reaches the dense run's final loss; loss.png
plots the trailing means. Results: bench/RESULTS.md.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 256  # per sparse / MoT expert; dense: 2 x HIDDEN


def variant_overrides(name: str) -> dict:
    if name == "dense":
        return {"model.num_experts": 1, "model.top_k": 1, "model.expert_dim": 2 * HIDDEN}
    if name == "sparse":
        return {"model.num_experts": 8, "model.top_k": 2, "model.expert_dim": HIDDEN}
    if name.startswith("mot-g"):
        G = int(name[len("mot-g"):])
        return {"model.moe_type": "tokens", "model.mot_group_size": G, "model.num_experts": 2 * G,
                "model.expert_dim": HIDDEN}
    raise SystemExit(f"unknown variant {name!r}: dense, sparse or mot-gG")


def train(name: str, corpus: str, out: Path, a) -> Path:
    run_dir = out / name
    if (run_dir / "pretrain/DONE").is_file():
        return run_dir / "pretrain"
    args = {"stages": "[pretrain]", "run_dir": run_dir, "model.preset": "tiny", "pretrain.data": corpus,
            "pretrain.steps": a.steps, "pretrain.seq_len": a.seq, "pretrain.micro_batch_size": a.batch,
            "pretrain.global_batch_size": a.batch, "pretrain.lr": a.lr, "pretrain.warmup_steps": 20,
            "pretrain.weight_decay": 0.01, "pretrain.valid_fraction": 0.07, "pretrain.eval_every": 0,
            "pretrain.eval_batches": 8, "pretrain.log_every": 1, "pretrain.save_every": a.steps,
            "pretrain.seed": a.seed, "logging.progress": "false", "logging.wandb": "disabled",
            **variant_overrides(name)}
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, "-m", "trainer", "recipes/quickstart.yaml"] + [f"{k}={v}" for k, v in args.items()]
    print(f"[bench/mot] {name}: {' '.join(cmd[4:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return run_dir / "pretrain"


def curves(folder: Path):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [(m["step"], m["loss"]) for m in rows if "grad_norm" in m]
    held_out = [m["eval/loss"] for m in rows if "eval/loss" in m]
    return train, held_out[-1] if held_out else float("nan")


def trailing_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def steps_to(target: float, steps: list[int], smooth: list[float]):
    return next((s for s, v in zip(steps, smooth) if v <= target), None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="dense,sparse,mot-g4,mot-g8")
    p.add_argument("--out", default="runs/bench_mot")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from data.indexed import tokenize_files
    from data.tokenizer import load_tokenizer
    from model import flops_per_token, model_config

    out = (ROOT / a.out).resolve()
    corpus = out / "data/corpus"
    if not corpus.with_suffix(".idx").is_file():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        tokenize_files([str(ROOT / "data/corpus/shakespeare.jsonl")], str(corpus), load_tokenizer("mistral-v1"))
    names = a.variants.split(",")
    if "dense" not in names:
        raise SystemExit("--variants must include dense: it sets the target loss")
    results = {}
    for name in names:
        folder = train(name, str(corpus), out, a)
        train_curve, held_out = curves(folder)
        steps, losses = zip(*train_curve)
        cfg = model_config("tiny", **{k.split(".", 1)[1]: v for k, v in variant_overrides(name).items()})
        results[name] = dict(steps=list(steps), smooth=trailing_mean(list(losses), a.window), held_out=held_out,
                             expert_flops=flops_per_token(cfg, a.seq)["experts"])
    target = results["dense"]["smooth"][-1]
    lines = [f"{a.steps} steps x {a.batch} x {a.seq} tokens, lr {a.lr}, seed {a.seed}; loss = trailing mean of "
             f"{a.window} steps; target = dense's final {target:.3f}", "",
             "| model | expert FLOPs/token (train) | final loss | held-out loss | steps to dense's final loss | x dense |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        reached = steps_to(target, r["steps"], r["smooth"])
        ratio = f"{reached / a.steps:.2f}" if reached else "not reached"
        lines.append(f"| {name} | {r['expert_flops'] / 1e6:.2f} M | {r['smooth'][-1]:.3f} | {r['held_out']:.3f} | "
                     f"{reached or '-'} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    plot(results, target, out / "loss.png")


def plot(results: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot(r["steps"], r["smooth"], label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="dense final")
    ax.set(xlabel="step", ylabel="training loss (trailing mean)", ylim=(None, results["dense"]["smooth"][0]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"[bench/mot] {path}")


if __name__ == "__main__":
    main()
