"""Figures of an eval.json (trainer/evaluate.py), written next to it:

    perplexity.png     loss per corpus, and loss by position bucket per corpus
    expert_shares.png  per layer (at most 3: first, middle, last, as the paper's Figure 7), the share of
                       top-k assignments per expert for each corpus; dashed line: 1/E
    repeat_first.png   per layer and corpus, the rate at which consecutive tokens keep their first-choice
                       expert; dashed line: chance
    repeat_any.png     the same for "share at least one of their top-k experts"
    passkey.png        retrieval accuracy, depth x length heat map (the paper's Figure 4)
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_eval(results: dict, out) -> list[Path]:
    out = Path(out)
    written = []
    corpora = results.get("corpora", {})
    if corpora:
        written.append(plot_perplexity(corpora, out / "perplexity.png"))
        routing = {name: c["routing"] for name, c in corpora.items() if c["routing"]}
        if routing:
            chance = results["routing_chance"]
            written.append(plot_shares(routing, chance["share"], out / "expert_shares.png"))
            for key, title in (("repeat_first", "same first-choice expert"),
                               ("repeat_any", "top-k sets share an expert")):
                written.append(plot_repeats(routing, key, chance[key], title, out / f"{key}.png"))
    if "passkey" in results:
        written.append(plot_passkey(results["passkey"], out / "passkey.png"))
    return written


def plot_perplexity(corpora: dict, path: Path) -> Path:
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(corpora)
    bars.bar(names, [corpora[n]["loss"] for n in names])
    bars.set_ylabel("loss (nats/token)")
    bars.set_title("held-out loss per corpus")
    for name in names:
        buckets = corpora[name]["by_position"]
        lines.plot([b["start"] for b in buckets], [b["loss"] for b in buckets], marker="o", label=name)
    lines.set_xscale("symlog", linthresh=1)
    lines.set_xlabel("position in the window (bucket start)")
    lines.set_ylabel("loss (nats/token)")
    lines.set_title("loss by position")
    lines.grid(alpha=0.3)
    lines.legend()
    return save(fig, path)


def shown_layers(layers: list[str]) -> list[str]:
    return layers if len(layers) <= 3 else [layers[0], layers[len(layers) // 2], layers[-1]]


def plot_shares(routing: dict, uniform: float, path: Path) -> Path:
    layers = shown_layers(list(next(iter(routing.values()))))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 4), squeeze=False)
    names = list(routing)
    for ax, layer in zip(axes[0], layers):
        experts = len(routing[names[0]][layer]["share"])
        width = 0.8 / len(names)
        for c, name in enumerate(names):
            ax.barh([e + c * width for e in range(experts)], routing[name][layer]["share"], height=width,
                    label=name)
        ax.axvline(uniform, color="gray", linestyle="--")
        ax.set_yticks([e + 0.4 - width / 2 for e in range(experts)], [str(e) for e in range(experts)])
        ax.set_ylabel("expert")
        ax.set_xlabel("share of top-k assignments")
        ax.set_title(f"layer {layer}")
    axes[0, -1].legend(fontsize="small")
    return save(fig, path)


def plot_repeats(routing: dict, key: str, chance: float, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, layers in routing.items():
        ax.plot([int(layer) for layer in layers], [layers[layer][key] for layer in layers], marker="o",
                label=name)
    ax.axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.3f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of consecutive token pairs")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, path)


def plot_passkey(passkey: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.2 * len(passkey["lengths"]) + 3, 0.5 * len(passkey["depths"]) + 2))
    image = ax.imshow(passkey["accuracy"], cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(passkey["lengths"])), [str(n) for n in passkey["lengths"]])
    ax.set_yticks(range(len(passkey["depths"])), [f"{d:.0%}" for d in passkey["depths"]])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the key")
    ax.set_title(f"passkey retrieval accuracy ({passkey['trials']} keys per cell)")
    fig.colorbar(image, ax=ax)
    return save(fig, path)


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
