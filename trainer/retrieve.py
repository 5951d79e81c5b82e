"""Print the premises a SELECT encoder ranks highest for a statement.

    python -m trainer.retrieve runs/premise_selection/select "|- ( ph -> ph )" [-k 10] [--premises DIR]

CKPT: a select run folder, one of its checkpoints, or its HF export (then --premises is required; the
run's config names its premises folder otherwise). The corpus embeddings are computed once per
checkpoint and kept next to the corpus (<premises>/embeddings-<key>.npy).

Search: faiss.IndexFlatIP, exact inner product over the unit embeddings (cosine). For one query a numpy
matmul would do as well; faiss is used because it keeps exact top-k search fast and memory-bounded for
batches of queries over large corpora (blocked BLAS plus a heap per query: no (Q, N) score matrix).
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch


def corpus_embeddings(model, rows, key: str, folder: Path, batch_size: int) -> np.ndarray:
    from omegaconf import OmegaConf

    from parallel.layout import Layout
    from trainer.config import ParallelConfig

    from .premise_select import embed_all

    cache = folder / f"embeddings-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    layout = Layout.plan(OmegaConf.structured(ParallelConfig), model.cfg, None, world_size=1)
    emb = embed_all(model, rows, batch_size, layout).cpu().numpy()
    np.save(cache, emb)
    return emb


def checkpoint_key(path: Path) -> str:
    """Names a checkpoint's weights: its manifest (sha256 per slice) or an HF folder's config + index."""
    from .engine import starting_point

    kind, where = starting_point(str(path))
    files = [where / "config.json", *sorted(where.glob("*.safetensors*"))] if kind == "hf" else [where / "manifest.json"]
    h = hashlib.sha256(str(where.resolve()).encode())
    for f in files:
        h.update(f.read_bytes()[:1 << 20])
    return h.hexdigest()[:16]


def retrieve(ckpt, statement: str, k: int, premises=None, batch_size: int = 256) -> list[tuple[str, float, str]]:
    import faiss

    from data.metamath import read_split
    from data.readers import DataError

    from .evaluate import load_for_eval
    from .export import read_model
    from .premise_select import embed_rows, encode_texts, pad_rows

    model, mcfg, tokenizer = load_for_eval(ckpt, torch.float32)
    seq_len = mcfg.max_seq_len
    if premises is None:
        if (Path(ckpt) / "config.json").is_file():
            raise DataError(f"{ckpt}: an HF folder: give --premises (the premises stage's output folder)")
        run_cfg = read_model(ckpt)[2]
        premises, seq_len = run_cfg.select.data, run_cfg.select.seq_len
    labels, texts, _, _, _ = read_split(premises)
    rows = encode_texts(tokenizer, texts, seq_len)
    index = faiss.IndexFlatIP(mcfg.dim)
    index.add(corpus_embeddings(model, rows, checkpoint_key(Path(ckpt)), Path(premises), batch_size))
    with torch.no_grad():
        query, _ = embed_rows(model, pad_rows(encode_texts(tokenizer, [statement], seq_len)))
    scores, found = index.search(query.numpy(), min(k, len(labels)))
    return [(labels[i], float(s), texts[i]) for s, i in zip(scores[0], found[0])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.retrieve", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="select run folder, checkpoint or HF export")
    parser.add_argument("statement", help='a Metamath statement, e.g. "|- ( ph -> ph )"')
    parser.add_argument("-k", type=int, default=10, help="premises to print")
    parser.add_argument("--premises", help="the premises stage's output folder (default: the run's)")
    parser.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    args = parser.parse_args(argv)
    from data.readers import DataError

    from .checkpoint import CheckpointError
    try:
        hits = retrieve(args.checkpoint, args.statement, args.k, args.premises)
    except (DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"label": label, "score": score} for label, score, _ in hits]))
    for label, score, text in [] if args.json else hits:
        print(f"{score:7.4f}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
