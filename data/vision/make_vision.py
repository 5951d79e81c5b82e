"""Regenerate the small image question-answer set of this folder from Debian's openclipart-png.

    apt-get download openclipart-png && dpkg-deb -x openclipart-png_*.deb /tmp/clipart
    python data/vision/make_vision.py /tmp/clipart/usr/share/openclipart/png

Real clip art filed by category: PER_CATEGORY images of each category in CATEGORIES, drawn with a fixed
seed from the sorted file list of the category's folder (subfolders included), flattened on white,
scaled to fit SIZE x SIZE pixels (aspect ratio kept), written as images/<answer>_<k>.png. Each image is
one conversation: the user asks QUESTION with the image, the assistant answers the category's word.
The last HELD_OUT images of each category go to heldout.jsonl, the rest to train.jsonl. The same
package version gives the same files (nothing depends on time or on the file system's order).
Chance level of the held-out answers: 1 / len(CATEGORIES) = 25 %.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = {"animals": "animal", "food": "food", "plants": "plant", "transportation": "vehicle"}
QUESTION = "What is in this picture? Answer with one word: animal, food, plant or vehicle."
PER_CATEGORY = 80
HELD_OUT = 16
SIZE = 48
SEED = 0


def picked_files(root: Path, folder: str) -> list[Path]:
    files = sorted((root / folder).rglob("*.png"))
    if len(files) < PER_CATEGORY:
        raise SystemExit(f"error: {root / folder}: {len(files)} PNG files, need {PER_CATEGORY}")
    rng = np.random.default_rng([SEED, len(files)])
    return [files[i] for i in sorted(rng.choice(len(files), PER_CATEGORY, replace=False))]


def small_rgb(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGBA")
    flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
    flat.alpha_composite(image)
    flat = flat.convert("RGB")
    flat.thumbnail((SIZE, SIZE), Image.LANCZOS)
    return flat


def conversation(image: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "image", "path": image}]},
                         {"role": "assistant", "content": answer}]}


def main(root: str, out: str = str(Path(__file__).parent)) -> None:
    root, out = Path(root), Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "heldout": []}
    for folder, answer in CATEGORIES.items():
        for k, path in enumerate(picked_files(root, folder)):
            name = f"images/{answer}_{k:03d}.png"
            small_rgb(path).save(out / name, optimize=True)
            splits["heldout" if k >= PER_CATEGORY - HELD_OUT else "train"].append(conversation(name, answer))
    for split, records in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    total = sum(p.stat().st_size for p in (out / "images").glob("*.png"))
    print(f"{len(splits['train'])} train, {len(splits['heldout'])} held-out conversations; "
          f"images {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:])
