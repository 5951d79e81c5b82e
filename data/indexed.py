"""Tokenized corpora on disk: Megatron-LM's indexed dataset format (prefix.bin + prefix.idx), memory-mapped.

prefix.bin  every document's token ids back to back; uint16 when the vocabulary has < 65536 ids, else
            int32 (Megatron's choice; its format has no uint32)
prefix.idx  little-endian, byte-compatible with Megatron-Core's `IndexedDataset` (`MMIDIDX`, version 1):
              9 bytes   magic b"MMIDIDX\\x00\\x00"
              <Q        version (1)
              <B        dtype code (Megatron's: 8 = uint16, 4 = int32)
              <Q        sequence count n
              <Q        document-index count d (= documents + 1)
              int32[n]  sequence lengths (tokens)
              int64[n]  sequence pointers (byte offsets into .bin)
              int64[d]  document indices: document i = sequences [doc[i], doc[i+1])
This writer stores one sequence per document (doc = 0..n). A Megatron dataset written with sentence
splitting also loads: its documents are read as the concatenation of their sentences.

Files are written under temporary names and renamed when complete. A truncated or corrupt .idx, or a .bin
whose size disagrees with its index, raises `DataError` naming the file.
"""

import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .encode import encoded_documents
from .readers import DataError, check_inputs

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.uint8): 1, np.dtype(np.int64): 5}
HEADER = len(MAGIC) + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.int32)


def write_indexed(prefix: str, docs_token_ids: Iterable, vocab_size: int) -> dict:
    """Write prefix.bin/.idx from an iterable of per-document token-id sequences; returns
    {"documents", "tokens"}. Ids outside [0, vocab_size) and empty documents are errors."""
    dtype = token_dtype(vocab_size)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    tmp_bin, tmp_idx = (p.with_name(f"{p.name}.tmp.{os.getpid()}") for p in (bin_path, idx_path))
    lengths = []
    try:
        with open(tmp_bin, "wb") as f:
            for i, ids in enumerate(docs_token_ids):
                ids = np.asarray(ids)
                if ids.ndim != 1 or ids.size == 0:
                    raise DataError(f"{prefix}: document {i} has shape {ids.shape}; expected a non-empty 1-D "
                                    f"sequence of token ids")
                bad = ids[(ids < 0) | (ids >= vocab_size)]
                if bad.size:
                    raise DataError(f"{prefix}: document {i} has token id {int(bad[0])} outside [0, {vocab_size})")
                f.write(ids.astype(dtype).tobytes())
                lengths.append(ids.size)
        if not lengths:
            raise DataError(f"{prefix}: no documents to write")
        lengths = np.array(lengths, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * dtype.itemsize
        with open(tmp_idx, "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", VERSION, DTYPE_CODES[dtype], len(lengths), len(lengths) + 1))
            f.write(lengths.tobytes() + pointers.astype(np.int64).tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    return {"documents": len(lengths), "tokens": int(lengths.sum(dtype=np.int64))}


class IndexedDataset:
    """Read-only, memory-mapped documents: `len(ds)`, `ds[i]` -> np array of document i's token ids,
    `ds.num_tokens`, `ds.offsets` (int64, len(ds) + 1: document i is tokens[offsets[i]:offsets[i+1]]),
    `ds.tokens` (all token ids, a 1-D memmap)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
        for path in (idx_path, bin_path):
            if not os.path.exists(path):
                raise DataError(f"{path}: no such file (an indexed dataset is a prefix.idx + prefix.bin pair)")
        with open(idx_path, "rb") as f:
            index = f.read()
        if len(index) < HEADER or index[: len(MAGIC)] != MAGIC:
            raise DataError(f"{idx_path}: not an indexed-dataset index (bad magic or shorter than its header)")
        version, code, n, d = struct.unpack_from("<QBQQ", index, len(MAGIC))
        dtypes = {c: t for t, c in DTYPE_CODES.items()}
        if version != VERSION or code not in dtypes:
            raise DataError(f"{idx_path}: unsupported version {version} or dtype code {code}")
        if len(index) != HEADER + 12 * n + 8 * d:
            raise DataError(f"{idx_path}: truncated or corrupt: {len(index)} bytes, expected "
                            f"{HEADER + 12 * n + 8 * d} for {n} sequences")
        self.dtype = dtypes[code]
        lengths = np.frombuffer(index, np.int32, n, HEADER).astype(np.int64)
        starts = np.frombuffer(index, np.int64, n, HEADER + 4 * n) // self.dtype.itemsize
        doc_index = np.frombuffer(index, np.int64, d, HEADER + 12 * n)
        ends = starts + lengths
        if (n and (starts[0] != 0 or (starts[1:] != ends[:-1]).any() or (lengths < 0).any())) or d < 1 \
                or doc_index[0] != 0 or doc_index[-1] != n or (np.diff(doc_index) < 0).any():
            raise DataError(f"{idx_path}: corrupt index (sequence pointers or document indices out of order)")
        self.offsets = np.concatenate([[0], ends])[doc_index]
        self.num_tokens = int(self.offsets[-1])
        expected = self.num_tokens * self.dtype.itemsize
        if os.path.getsize(bin_path) != expected:
            raise DataError(f"{bin_path}: {os.path.getsize(bin_path)} bytes, but {idx_path} describes "
                            f"{self.num_tokens} tokens of {self.dtype} ({expected} bytes)")
        if not self.num_tokens:
            raise DataError(f"{idx_path}: the dataset holds no tokens")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {self.prefix} ({len(self)} documents)")
        i %= len(self)
        return np.asarray(self.tokens[self.offsets[i]: self.offsets[i + 1]])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def shards(self) -> list:
        return [self]  # as data.sharded.ShardedDataset: an indexed dataset is its own only shard


def tokenize_files(inputs: list, output_prefix: str, tokenizer, text_field: str = "text",
                   batch_chars: int = 1 << 18, num_workers: int = 1) -> dict:
    """Check `inputs` (see data.readers), tokenize every document as <s> ids </s> (data.encode; over
    `num_workers` processes, 0 = every core), write the indexed dataset at `output_prefix`; returns
    {"documents", "tokens", "seconds"}. data.sharded.tokenize_sharded writes the same documents as shards."""
    t0 = time.perf_counter()
    check_inputs(inputs, text_field)
    docs = encoded_documents(inputs, tokenizer, text_field, num_workers, batch_chars)
    stats = write_indexed(output_prefix, docs, len(tokenizer))
    return dict(stats, seconds=time.perf_counter() - t0)


def unigram_entropy(dataset, chunk: int = 1 << 26) -> float:
    """Entropy in nats per token of the dataset's unigram token distribution (an IndexedDataset or a
    data.sharded.ShardedDataset): the loss of the best model that ignores context, which any trained
    language model should beat."""
    counts = np.zeros(0, np.int64)
    for shard in dataset.shards:
        for start in range(0, shard.num_tokens, chunk):
            c = np.bincount(shard.tokens[start: start + chunk])
            counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
            counts[: len(c)] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
