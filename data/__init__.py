"""Pretraining data: raw text -> Mixtral tokens -> Megatron indexed datasets (sharded, with a manifest) ->
packed, shuffled, weighted-mixture, data-parallel, resumable batches.

    check_inputs(inputs, text_field)                 validate the inputs (data.readers; DataError)
    tokenize_sharded(inputs, prefix, tokenizer)       -> shards + prefix.manifest.json (data.sharded)
    tokenize_files(inputs, prefix, tokenizer)         -> one prefix.bin/.idx pair (data.indexed)
    open_dataset(prefix)                              a manifest's shards or a plain pair, as one dataset
    MixtureStream(sources, weights, ...).next_batch()  weighted sources (data.mixture) over PackedStreams

Names are imported on first use: the tokenizing worker processes import this package and must not pay
for torch (data.stream).
"""

import importlib

_WHERE = {"DataError": "readers", "check_inputs": "readers", "iter_texts": "readers",
          "IndexedDataset": "indexed", "tokenize_files": "indexed", "unigram_entropy": "indexed",
          "write_indexed": "indexed", "tokenize_sharded": "sharded", "open_dataset": "sharded",
          "merge_shards": "sharded", "PackedStream": "stream", "MixtureStream": "mixture",
          "load_tokenizer": "tokenizer"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
