"""Documents -> token ids, in this process or spread over worker processes, in input order.

Every document becomes <s> ids </s> (the text's own "<s>", "</s>" strings are ordinary text, never
control tokens). The texts are cut into tasks of about `batch_chars` characters; each worker process
holds its own copy of the tokenizer (the `tokenizers` backend, one thread each: one worker per core)
and returns a task's documents as one token array plus their lengths. At most 2 tasks per worker are in
flight, so memory stays bounded however large the inputs, and the results come back in submission
order: the output is the same for any number of workers.
"""

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import chain

import numpy as np

from .readers import DataError, expand_inputs, iter_texts

_worker = {}  # this worker process's tokenizer and the ids around each document


def worker_count(num_workers) -> int:
    """`num_workers`, or every core this process may run on when it is 0 or None."""
    return int(num_workers) if num_workers else len(os.sched_getaffinity(0))


def _init_worker(tokenizer_json: str, head: list, tail: list, dtype: str) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True  # "<s>" in a text is text (transformers' split_special_tokens)
    _worker.update(tokenizer=tokenizer, head=head, tail=tail, dtype=np.dtype(dtype))


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all documents' token ids back to back, each document's length)."""
    tok, head, tail = _worker["tokenizer"], _worker["head"], _worker["tail"]
    docs = [head + tok.encode(text, add_special_tokens=False).ids + tail for text in texts]
    lengths = np.array([len(d) for d in docs], np.int64)
    return np.fromiter(chain.from_iterable(docs), _worker["dtype"], int(lengths.sum())), lengths


def _text_batches(inputs: list, text_field: str, batch_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for path in inputs:
        for text in iter_texts(path, text_field):
            batch.append(text)
            size += len(text)
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def encoded_documents(inputs: list, tokenizer, text_field: str = "text", num_workers: int = 1,
                      batch_chars: int = 1 << 18) -> Iterator[np.ndarray]:
    """Every document of `inputs` (folders expanded) as <s> ids </s>, in order; with num_workers > 1
    encoded by that many processes (0 or None: every core)."""
    from .indexed import token_dtype

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to end documents with")
    setup = (tokenizer.backend_tokenizer.to_str(), [bos] if bos is not None else [], [eos],
             token_dtype(len(tokenizer)).str)
    batches = _text_batches(expand_inputs(inputs), text_field, batch_chars)
    workers = worker_count(num_workers)
    if workers == 1:
        _init_worker(*setup)
        yield from _split(_encode(texts) for texts in batches)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=setup) as pool:
        pending = deque()
        for texts in batches:
            pending.append(pool.submit(_encode, texts))
            if len(pending) >= 2 * workers:
                yield from _split([pending.popleft().result()])
        while pending:
            yield from _split([pending.popleft().result()])


def _split(results: Iterable) -> Iterator[np.ndarray]:
    for tokens, lengths in results:
        yield from np.split(tokens, np.cumsum(lengths[:-1]))
