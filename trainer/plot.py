"""Plots of a run's metrics.jsonl: loss.png, throughput.png, expert_load.png next to it.

    python -m trainer.plot RUN_FOLDER      (a stage folder with metrics.jsonl, or a run folder whose
                                            stage subfolders have one: each is plotted)

What it reads from each line (a JSON object; every key is optional except "step"):
    step                int
    loss, eval_loss, ...  every key ending in "loss": train and held-out losses (loss.png, top);
                        aux_loss / z_loss (names starting with "aux" or "z_") go to a second panel
    tokens_per_s        tokens per second over all ranks                         (throughput.png)
    mfu                 model FLOPs utilisation, a fraction; else tflops (TFLOP/s)
    step_time           seconds;   memory_gb   peak memory per rank, GiB
    expert_load         [[f_l0_e0, ..., f_l0_eE-1], ...] per layer, the share of the step's top-k
                        assignments that went to each expert (each row sums to 1; from RouterStats:
                        counts / counts.sum(-1))                                   (expert_load.png)
    router_entropy      [h_l0, ...] per layer, mean entropy of the router probabilities (nats)
expert_load.png: a layer x expert heat map of the last logged step, and per layer the imbalance
max_e f / mean_e f over the steps (1 = perfectly balanced); the router entropy when logged.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from e
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{n}: a metrics record needs a 'step' key")
        records.append(record)
    return records


def series(records: list[dict], key: str):
    """(steps, values) of the records that have a number under `key`."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_loss(records, out: Path) -> None:
    keys = sorted({k for r in records for k in r if k.endswith("loss")})
    aux = [k for k in keys if k.startswith(("aux", "z_"))]
    main = [k for k in keys if k not in aux]
    fig, axes = plt.subplots(2 if aux else 1, 1, figsize=(8, 6 if aux else 4), sharex=True, squeeze=False)
    for ax, group in zip(axes[:, 0], [main, aux] if aux else [main]):
        for key in group:
            steps, values = series(records, key)
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if group:
            ax.legend()
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def plot_throughput(records, out: Path) -> None:
    panels = [("tokens_per_s", "tokens/s", 1), ("mfu", "MFU %", 100), ("tflops", "TFLOP/s", 1),
              ("step_time", "step time (s)", 1), ("memory_gb", "peak memory (GiB)", 1)]
    if any("mfu" in r for r in records):
        panels = [p for p in panels if p[0] != "tflops"]
    panels = [p for p in panels if series(records, p[0])[0]] or panels[:1]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, label, scale) in zip(axes[:, 0], panels):
        steps, values = series(records, key)
        ax.plot(steps, [v * scale for v in values])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)


def plot_expert_load(records, out: Path) -> bool:
    loads = [r for r in records if r.get("expert_load")]
    if not loads:
        return False
    last = loads[-1]["expert_load"]
    entropy = [r for r in records if r.get("router_entropy")]
    fig, axes = plt.subplots(1, 3 if entropy else 2, figsize=(15 if entropy else 11, 4.5))
    image = axes[0].imshow(last, aspect="auto", cmap="viridis", vmin=0)
    axes[0].set_title(f"fraction of tokens per expert, step {loads[-1]['step']}")
    axes[0].set_xlabel("expert")
    axes[0].set_ylabel("layer")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes[0])
    steps = [r["step"] for r in loads]
    for layer in range(len(last)):
        imbalance = [max(r["expert_load"][layer]) * len(r["expert_load"][layer]) / sum(r["expert_load"][layer])
                     for r in loads]
        axes[1].plot(steps, imbalance, label=f"layer {layer}")
    axes[1].set_title("max / mean expert load")
    axes[1].set_xlabel("step")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize="small")
    if entropy:
        for layer in range(len(entropy[-1]["router_entropy"])):
            axes[2].plot([r["step"] for r in entropy], [r["router_entropy"][layer] for r in entropy],
                         label=f"layer {layer}")
        axes[2].set_title("router entropy (nats)")
        axes[2].set_xlabel("step")
        axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=100)
    plt.close(fig)
    return True


def plot_run(folder) -> list[Path]:
    """Plot every metrics.jsonl in `folder` (or in its direct subfolders); returns the files written."""
    folder = Path(folder)
    files = [folder / "metrics.jsonl"] if (folder / "metrics.jsonl").is_file() else \
        sorted(folder.glob("*/metrics.jsonl"))
    if not files:
        raise FileNotFoundError(f"{folder}: no metrics.jsonl here or in its stage folders")
    written = []
    for path in files:
        records = read_metrics(path)
        if not records:
            raise ValueError(f"{path}: no records")
        plot_loss(records, path.parent)
        plot_throughput(records, path.parent)
        written += [path.parent / "loss.png", path.parent / "throughput.png"]
        if plot_expert_load(records, path.parent):
            written.append(path.parent / "expert_load.png")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_folder")
    args = parser.parse_args(argv)
    try:
        for path in plot_run(args.run_folder):
            print(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
