"""Weighted mixtures of pretraining sources (Megatron's `--data-path 0.7 web 0.3 code`):

    pretrain.data: ${tokenize.output}                          one source (weight 1)
    pretrain.data: [{path: web, weight: 0.7}, {path: code, weight: 0.3}]

Every source is a dataset prefix (data.sharded.open_dataset: a manifest's shards or a plain pair) read
as its own packed stream (data.stream.PackedStream with the run's seed: its own epochs and shuffles).
The mixture interleaves their rows by a fixed pattern over blocks of K = 65536 global rows:

  - the weights, normalised, are rounded to row counts n_i per block (largest remainder, sum K, each
    n_i >= 1): every block holds exactly n_i rows of source i. Every row has seq_len + 1 tokens, so
    source i contributes n_i / K of the tokens (the weight's share within 1 / (2K));
  - within a block source i's j-th row sits at the rank of its ideal position (j + 1/2) / n_i among
    all sources' ideal positions (ties by source order), so any window of consecutive rows holds each
    source's share to within a row or two per source;
  - global row g = b K + p (block b, position p) is row b n_s + j of source s, (s, j) = pattern[p].

The mixture is a pure function of the global row number: it depends neither on the number of
data-parallel ranks nor on the micro-batch split (data.stream.StepSchedule hands out global rows as for
one dataset), and the count of rows consumed resumes it exactly. A one-source mixture is that source's
PackedStream row for row. Source i's epochs so far: its rows consumed / its rows per epoch.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .readers import DataError
from .sharded import manifest_path, open_dataset, read_manifest
from .stream import PackedStream, StepSchedule, batch_of_rows

BLOCK = 1 << 16


@dataclass
class Source:
    path: str
    weight: float


def parse_mixture(data, key: str = "data") -> list[Source]:
    """`data` (a prefix, or a list of {path, weight} mappings) as sources; DataError names the key."""
    if isinstance(data, str):
        if not data:
            raise DataError(f"{key}: an empty prefix")
        return [Source(data, 1.0)]
    if not isinstance(data, (list, tuple)) or not data:
        raise DataError(f"{key}: expected a dataset prefix or a non-empty list of {{path, weight}}, got {data!r}")
    sources = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or set(item) != {"path", "weight"}:
            raise DataError(f"{key}[{i}]: expected {{path: PREFIX, weight: NUMBER}}, got {item!r}")
        path, weight = item["path"], item["weight"]
        if not isinstance(path, str) or not path:
            raise DataError(f"{key}[{i}].path: expected a dataset prefix, got {path!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise DataError(f"{key}[{i}].weight: must be a number > 0, got {weight!r}")
        sources.append(Source(path, float(weight)))
    return sources


def source_names(sources: list[Source]) -> list[str]:
    """Short names for the logs: the prefixes' last parts, as many as tell them apart (#i: the same
    prefix twice)."""
    parts = [Path(s.path).parts for s in sources]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n}#{i}" for i, n in enumerate(names)]


def block_counts(weights, block: int = BLOCK) -> np.ndarray:
    """Rows per block of each source: the normalised weights x block, rounded by largest remainder."""
    share = np.asarray(weights, np.float64) / np.sum(weights) * block
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[: block - counts.sum()]] += 1
    if (counts == 0).any():
        i = int(np.flatnonzero(counts == 0)[0])
        raise DataError(f"weight {weights[i]} of source {i} is below 1/{block} of the total: it would get no rows")
    return counts


def block_pattern(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, row of that source within the block) of every position of a block."""
    source = np.repeat(np.arange(len(counts)), counts)
    index = np.concatenate([np.arange(n) for n in counts])
    order = np.lexsort((source, (index + 0.5) / counts[source]))
    return source[order], index[order]


def check_sources(sources: list[Source], key: str, vocab_size: int, produced=()) -> None:
    """Cheap checks before any heavy work: every prefix exists (but those in `produced`, written by an
    earlier stage of this run), the manifests name one tokenizer, its vocabulary fits the model."""
    tokenizers = {}
    for i, source in enumerate(sources):
        where = f"{key}[{i}] ({source.path})" if len(sources) > 1 else f"{key} ({source.path})"
        if source.path in produced:
            continue
        if manifest_path(source.path).exists():
            tokenizer = read_manifest(source.path)["tokenizer"]
            tokenizers[where] = (tokenizer["vocab_size"], tokenizer["vocab_sha256"])
            if tokenizer["vocab_size"] > vocab_size:
                raise DataError(f"{where}: tokenized with {tokenizer['name']!r} ({tokenizer['vocab_size']} "
                                f"tokens), more than model.vocab_size ({vocab_size})")
        elif not all(Path(f"{source.path}{s}").is_file() for s in (".idx", ".bin")):
            raise DataError(f"{where}: no such dataset (neither {manifest_path(source.path).name} nor "
                            f"{Path(source.path).name}.idx/.bin)")
    if len(set(tokenizers.values())) > 1:
        listed = "; ".join(f"{w}: {n} tokens, vocabulary {h}" for w, (n, h) in tokenizers.items())
        raise DataError(f"{key}: the sources were tokenized with different tokenizers ({listed})")


def open_sources(sources: list[Source], key: str, vocab_size: int) -> list:
    """The datasets of `sources`, checked as check_sources and for one token dtype."""
    check_sources(sources, key, vocab_size)
    datasets = [open_dataset(s.path) for s in sources]
    if len({d.dtype for d in datasets}) > 1:
        raise DataError(f"{key}: the sources hold tokens of different dtypes "
                        f"({', '.join(f'{s.path}: {d.dtype}' for s, d in zip(sources, datasets))}): "
                        "tokenizers of different sizes")
    return datasets


class MixtureStream:
    """Global row g -> a row of one of `sources` (PackedStreams), by the block pattern of `weights`,
    with the step schedule of data.stream (same micro-batch grouping, state and resume)."""

    def __init__(self, sources: list[PackedStream], weights, names: list[str], micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, accumulation: int = 1):
        if len({s.seq_len for s in sources}) != 1:
            raise ValueError("the sources of a mixture must have one seq_len")
        self.sources, self.names = sources, names
        self.counts = block_counts(weights)
        self.pattern, self.index = block_pattern(self.counts)
        self.schedule = StepSchedule(micro_batch_size, dp_rank, dp_size, accumulation)

    def locate(self, g: int) -> tuple[int, int]:
        """(source, row of that source) of global row g."""
        block, p = divmod(g, BLOCK)
        s = int(self.pattern[p])
        return s, block * int(self.counts[s]) + int(self.index[p])

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        s, j = self.locate(g)
        return self.sources[s].row(j)

    def next_batch(self) -> dict:
        return self.batch_of(self.schedule.next_rows())

    def batch_of(self, rows: list) -> dict:
        return batch_of_rows(self.row, rows)

    def rows_taken(self, n: int) -> np.ndarray:
        """Rows of each source among global rows 0 .. n-1."""
        block, p = divmod(n, BLOCK)
        return block * self.counts + np.bincount(self.pattern[:p], minlength=len(self.counts))

    def epochs(self) -> dict:
        """{"epochs/<name>": epochs of the source consumed so far (fractional)}."""
        taken = self.rows_taken(self.schedule.between_steps())
        return {f"epochs/{name}": int(t) / s.rows_per_epoch for name, t, s in zip(self.names, taken, self.sources)}

    def describe(self, total_rows: int) -> list[str]:
        """One line per source: share, size, and the epochs `total_rows` global rows take of it."""
        taken = self.rows_taken(total_rows)
        return [f"{name}: share {c / BLOCK:.4f}, {len(s.documents)} documents, {s.num_tokens} tokens, "
                f"{s.rows_per_epoch} rows per epoch; {t / s.rows_per_epoch:.2f} epochs over the run"
                for name, c, t, s in zip(self.names, self.counts, taken, self.sources)]

    def identity(self) -> dict:
        """What must match on resume for the stream to continue exactly."""
        first = self.sources[0]
        return dict(seed=first.seed, seq_len=first.seq_len,
                    sources=[dict(documents=len(s.documents), tokens=s.num_tokens, block_rows=int(c))
                             for s, c in zip(self.sources, self.counts)])

    def state_dict(self) -> dict:
        return self.schedule.state_dict(**self.identity(), **self.epochs())

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state, "data stream", **self.identity())
