"""A corpus as several indexed datasets (shards) plus a manifest that reads them as one.

    prefix_00000.bin/.idx, prefix_00001.bin/.idx, ...   each a Megatron-format indexed dataset
                                                       (data.indexed): Megatron-Core reads any shard
    prefix.manifest.json    {"format": 1, "tokenizer": {"name", "vocab_size", "vocab_sha256"},
                             "documents", "tokens", "shards": [{"prefix": "corpus_00000", "documents",
                             "tokens"}, ...]}   (shard prefixes relative to the manifest's folder)

`tokenize_sharded` writes them: documents in input order, a new shard once the current one holds
`shard_tokens` tokens or more, so the shards do not depend on the number of workers, and
`merge_shards` concatenates them into exactly the bytes `tokenize_files` writes for the same inputs.
A corpus that fits in one shard is written as the plain pair prefix.bin/.idx (the manifest lists it as
its only shard), so every reader of a plain pair reads it too. The old manifest is removed first and the
new one written last (atomically): a crash mid-way leaves no manifest pointing at a missing or
rewritten shard. Shards of an earlier, larger run at the same prefix are removed.

`open_dataset(prefix)` is how training reads a prefix: the manifest's shards when prefix.manifest.json
exists, else the plain prefix.bin/.idx pair (written by tokenize_files, or by Megatron).
"""

import hashlib
import json
import os
import re
import time
from itertools import chain
from pathlib import Path

import numpy as np

from .encode import encoded_documents
from .indexed import IndexedDataset, write_indexed
from .readers import DataError, check_inputs

FORMAT = 1


def manifest_path(prefix: str) -> Path:
    return Path(f"{prefix}.manifest.json")


def tokenizer_identity(tokenizer) -> dict:
    """What tells two tokenizers apart in a manifest: name, size and a hash of the vocabulary (two
    tokenizers are the same when size and hash agree, wherever they were loaded from)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return {"name": tokenizer.name_or_path, "vocab_size": len(tokenizer),
            "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()[:16]}


def _up_to(docs, limit: int):
    """Documents of `docs` until they hold `limit` tokens or more (at least one document)."""
    total = 0
    for ids in docs:
        yield ids
        total += len(ids)
        if total >= limit:
            return


def _remove_pair(prefix: Path) -> None:
    for suffix in (".bin", ".idx"):
        prefix.with_name(prefix.name + suffix).unlink(missing_ok=True)


def tokenize_sharded(inputs: list, output_prefix: str, tokenizer, text_field: str = "text",
                     num_workers: int = 0, shard_tokens: int = 1 << 30, batch_chars: int = 1 << 18) -> dict:
    """Check `inputs`, tokenize them over `num_workers` processes (0: every core) into shards of about
    `shard_tokens` tokens and the manifest; returns the manifest plus "seconds"."""
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    t0 = time.perf_counter()
    check_inputs(inputs, text_field)
    out = Path(output_prefix)
    manifest_path(output_prefix).unlink(missing_ok=True)
    docs = iter(encoded_documents(inputs, tokenizer, text_field, num_workers, batch_chars))
    shards = []
    while (first := next(docs, None)) is not None:
        shard = f"{out.name}_{len(shards):05d}"
        rest = _up_to(docs, shard_tokens - len(first)) if len(first) < shard_tokens else ()
        stats = write_indexed(str(out.with_name(shard)), chain([first], rest), len(tokenizer))
        shards.append(dict(prefix=shard, **stats))
    if not shards:
        raise DataError(f"{output_prefix}: the inputs hold no documents")
    if len(shards) == 1:  # one shard: the plain pair
        for suffix in (".bin", ".idx"):
            os.replace(out.with_name(shards[0]["prefix"] + suffix), out.with_name(out.name + suffix))
        shards[0]["prefix"] = out.name
    else:
        _remove_pair(out)
    keep = {s["prefix"] for s in shards}
    for stale in out.parent.glob(f"{out.name}_*.idx"):  # shards of an earlier run
        if re.fullmatch(rf"{re.escape(out.name)}_\d{{5}}", stale.stem) and stale.stem not in keep:
            _remove_pair(stale.with_suffix(""))
    manifest = {"format": FORMAT, "tokenizer": tokenizer_identity(tokenizer),
                "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                "shards": shards}
    path = manifest_path(output_prefix)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return dict(manifest, seconds=time.perf_counter() - t0)


def read_manifest(prefix: str) -> dict:
    path = manifest_path(prefix)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("shards"):
        raise DataError(f"{path}: not a shard manifest of format {FORMAT} with at least one shard")
    return manifest


class ShardedDataset:
    """The shards of a manifest as one dataset, documents numbered across shards in order: the same
    interface as IndexedDataset for the stream (`len`, `ds[i]`, `lengths`, `num_tokens`, `prefix`,
    `shards`, `dtype`), plus `tokenizer` (the manifest's tokenizer identity)."""

    def __init__(self, prefix: str):
        self.prefix, manifest = prefix, read_manifest(prefix)
        folder = manifest_path(prefix).parent
        self.shards = [IndexedDataset(str(folder / s["prefix"])) for s in manifest["shards"]]
        for shard, listed in zip(self.shards, manifest["shards"]):
            if (len(shard), shard.num_tokens) != (listed["documents"], listed["tokens"]):
                raise DataError(f"{shard.prefix}: {len(shard)} documents, {shard.num_tokens} tokens, but "
                                f"{manifest_path(prefix)} lists {listed['documents']}, {listed['tokens']}")
        if len({s.dtype for s in self.shards}) > 1:
            raise DataError(f"{manifest_path(prefix)}: shards of different token dtypes")
        self.tokenizer = manifest["tokenizer"]
        self.dtype = self.shards[0].dtype
        self.first_document = np.cumsum([0] + [len(s) for s in self.shards])
        self.lengths = np.concatenate([s.lengths for s in self.shards])
        self.num_tokens = int(self.lengths.sum())

    def __len__(self) -> int:
        return int(self.first_document[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range for {self.prefix} ({len(self)} documents)")
        s = int(np.searchsorted(self.first_document, i, side="right")) - 1
        return self.shards[s][i - int(self.first_document[s])]


def open_dataset(prefix: str):
    """The dataset at `prefix`: its manifest's shards, or the plain prefix.bin/.idx pair."""
    return ShardedDataset(prefix) if manifest_path(prefix).exists() else IndexedDataset(prefix)


def merge_shards(prefix: str, output_prefix: str) -> dict:
    """One indexed dataset at `output_prefix` with every document of the sharded dataset at `prefix`, in
    order (for tools that read one file); returns {"documents", "tokens"}."""
    dataset = ShardedDataset(prefix)
    return write_indexed(output_prefix, (dataset[i] for i in range(len(dataset))),
                         dataset.tokenizer["vocab_size"])
