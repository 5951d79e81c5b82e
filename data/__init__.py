"""Pretraining data: raw text -> Mixtral tokens -> Megatron indexed dataset -> packed, shuffled,
data-parallel, resumable batches.

    check_inputs(paths, text_field)                  validate .txt/.jsonl/.parquet/datasets inputs (DataError)
    tokenize_files(inputs, prefix, tokenizer)         -> prefix.bin/.idx, {"documents", "tokens", "seconds"}
    PackedStream(IndexedDataset(prefix), seq_len, micro_batch_size, seed, dp_rank, dp_size).next_batch()
"""

from .indexed import IndexedDataset, tokenize_files, unigram_entropy, write_indexed
from .readers import DataError, check_inputs, iter_texts
from .stream import PackedStream
from .tokenizer import load_tokenizer

__all__ = ["DataError", "IndexedDataset", "PackedStream", "check_inputs", "iter_texts", "load_tokenizer",
           "tokenize_files", "unigram_entropy", "write_indexed"]
