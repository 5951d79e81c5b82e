"""The pretraining sample stream: documents packed back to back into fixed-length rows, shuffled, seeded,
sharded over data-parallel ranks, infinite, exactly resumable.

Epoch e (e = 0, 1, ...) with rng = numpy default_rng([seed, e]):
  1. the documents in the order rng.permutation(len(dataset)), concatenated into one token stream S_e
     (each document is <s> ... </s> already, see data.indexed.tokenize_files);
  2. R = (num_tokens - 1) // seq_len rows; row k is S_e[k*T : k*T + T + 1] (T = seq_len): consecutive rows
     share one token, as in Megatron, so every token is an input once; the < T tokens at the end of S_e
     are skipped this epoch (another order next epoch). A document may span several rows;
  3. the rows in the order rng.permutation(R) (shuffled so that a micro-batch mixes documents).
The epochs' row sequences, one after another, form the global row sequence g = 0, 1, 2, ...; it does
not depend on the number of ranks. An optimizer step takes the next W = micro_batch_size * dp_size *
accumulation global rows, split into G = dp_size * accumulation micro-batches: micro-batch m of rank r
is group k = m * dp_size + r, the rows S + k + i * G (i < micro_batch_size, S the step's first row).
The ranks' rows are disjoint, and the groups depend only on G: a layout with dp_size=2 and one
micro-batch per step sees exactly the micro-batches of one rank accumulating two. That matters
beyond the gradient sum: per-micro-batch quantities such as the MoE load-balancing loss are then
equal across layouts.

A batch (torch int64, (B, T) each, B = micro_batch_size):
  tokens        row[:T]
  labels        row[1:] (next token). Where the next token starts another document (the "<s>" after a
                "</s>") it is kept, as in Megatron's packing: every position is a loss position (-100
                never appears), and predicting <s> after </s> is trivial.
  position_ids  0, 1, 2, ... restarting at 0 at every document start and at the start of every row;
                the model derives its document-causal attention mask from them.

Pretraining reads this through data.mixture.MixtureStream, which maps the global rows onto one such
stream per source (one source: row for row the same).

`state_dict()` is small and JSON-serialisable (the count of global rows consumed, plus what must match
on resume); `load_state_dict()` continues the identical stream, also with another dp_size or
micro_batch_size (the global row sequence is the same).
"""

import numpy as np
import torch

from .readers import DataError


class StepSchedule:
    """Which global rows each micro-batch takes (the grouping of the module docstring), and how many rows
    whole steps have consumed: the part of the stream that SFT and DPO batches share with pretraining."""

    def __init__(self, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, accumulation: int = 1):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})")
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.accumulation = accumulation
        self.rows_consumed = 0  # global rows handed out to all ranks together, in whole steps
        self.micro = 0  # micro-batch index within the current step

    def next_rows(self) -> list[int]:
        """The global row numbers of this rank's next micro-batch."""
        groups = self.dp_size * self.accumulation
        first = self.rows_consumed + self.micro * self.dp_size + self.dp_rank
        self.micro += 1
        if self.micro == self.accumulation:
            self.micro, self.rows_consumed = 0, self.rows_consumed + self.micro_batch_size * groups
        return [first + i * groups for i in range(self.micro_batch_size)]

    def between_steps(self) -> int:
        if self.micro:
            raise RuntimeError("the stream's state is taken between optimizer steps, not mid-step")
        return self.rows_consumed

    def state_dict(self, **identity) -> dict:
        """The position, with what must not change for an exact resume (item count, seed...)."""
        return dict(rows_consumed=self.between_steps(), **identity)

    def load_state_dict(self, state: dict, what: str, **identity) -> None:
        for key, value in identity.items():
            if state.get(key) != value:
                raise DataError(f"{what}: {key} is {state.get(key)!r} in the checkpoint but {value!r} now; "
                                "the data cannot resume exactly")
        self.rows_consumed = int(state["rows_consumed"])


class EpochShuffle:
    """Global row g -> item index, for a fixed list of n items (packed SFT rows, DPO pairs): epoch
    e = g // n visits the items in the order default_rng([seed, e]).permutation(n)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._order = n, seed, (None, None)

    def __call__(self, g: int) -> int:
        epoch, k = divmod(g, self.n)
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._order[1][k])


class ShuffledItems:
    """A fixed list of n items (packed SFT rows, DPO pairs, premise pairs) read in StepSchedule's
    grouping, each epoch in EpochShuffle's order: the same items in the same micro-batches at every
    layout, resumable exactly while n and the seed stay. `unit` names n in the saved state."""

    def __init__(self, n: int, seed: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 accumulation: int, what: str, unit: str = "rows"):
        self.order = EpochShuffle(n, seed)
        self.schedule = StepSchedule(micro_batch_size, dp_rank, dp_size, accumulation)
        self.what, self.identity = what, {unit: n, "seed": seed}

    def next_rows(self) -> list[tuple[int, int]]:
        """(global row g, item index) of this rank's next micro-batch."""
        return [(g, self.order(g)) for g in self.schedule.next_rows()]

    def next_items(self) -> list[int]:
        return [item for _, item in self.next_rows()]

    def state_dict(self) -> dict:
        return self.schedule.state_dict(**self.identity)

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state, self.what, **self.identity)


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) document indices: round(valid_fraction * n) documents (at least one when the
    fraction is > 0) drawn with default_rng([seed, n]), whole documents so no held-out text is trained on."""
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction ({valid_fraction}) must be in [0, 1)")
    held = max(1, round(valid_fraction * num_documents)) if valid_fraction else 0
    if held and held >= num_documents:
        raise DataError(f"valid_fraction {valid_fraction} of {num_documents} documents leaves none to train on")
    valid = np.sort(np.random.default_rng([seed, num_documents]).permutation(num_documents)[:held])
    return np.setdiff1d(np.arange(num_documents), valid), valid


def batch_of_rows(row, rows: list) -> dict:
    """The batch of global rows `rows` (row(g) -> (tokens, positions)); a None row is a filler with no
    loss token."""
    fillers = [i for i, g in enumerate(rows) if g is None]
    rows = [row(0 if g is None else g) for g in rows]
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
    positions = torch.from_numpy(np.stack([r[1][:-1] for r in rows]))
    labels = tokens[:, 1:].clone()
    labels[fillers] = -100
    return dict(tokens=tokens[:, :-1].contiguous(), labels=labels, position_ids=positions)


class PackedStream:
    """The stream over `documents` of `dataset` (all of them by default; S_e concatenates only those):
    an IndexedDataset or a data.sharded.ShardedDataset (anything with `len`, `ds[i]`, `lengths`)."""

    def __init__(self, dataset, seq_len: int, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, accumulation: int = 1, documents=None):
        if seq_len < 1:
            raise ValueError(f"seq_len ({seq_len}) must be >= 1")
        self.schedule = StepSchedule(micro_batch_size, dp_rank, dp_size, accumulation)
        self.documents = np.arange(len(dataset)) if documents is None else np.asarray(documents)
        self.lengths = dataset.lengths
        self.num_tokens = int(self.lengths[self.documents].sum())
        if self.num_tokens < seq_len + 1:
            raise DataError(f"{dataset.prefix}: {self.num_tokens} tokens, fewer than one row of seq_len + 1 = "
                            f"{seq_len + 1}" + (f" (in the {len(self.documents)} documents streamed)"
                                                if documents is not None else ""))
        self.dataset, self.seq_len, self.seed = dataset, seq_len, seed
        self.rows_per_epoch = (self.num_tokens - 1) // seq_len
        self._plan = None

    def epoch_plan(self, epoch: int):
        """(epoch, document order, end of each ordered document in S_e, row order) of one epoch."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = self.documents[rng.permutation(len(self.documents))]
            self._plan = (epoch, order, np.cumsum(self.lengths[order]), rng.permutation(self.rows_per_epoch))
        return self._plan

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Global row g: its seq_len + 1 tokens and their positions within their documents (restarted at
        the row start)."""
        epoch, k = divmod(g, self.rows_per_epoch)
        _, order, ends, row_order = self.epoch_plan(epoch)
        start, need = int(row_order[k]) * self.seq_len, self.seq_len + 1
        j = int(np.searchsorted(ends, start, side="right"))  # the document holding token `start` of S_e
        offset = start - (ends[j] - self.lengths[order[j]])
        pieces = []
        while need:
            piece = self.dataset[int(order[j])][offset: offset + need]
            pieces.append(piece)
            need -= len(piece)
            j, offset = j + 1, 0
        positions = np.concatenate([np.arange(len(p)) for p in pieces])
        return np.concatenate(pieces).astype(np.int64), positions

    def next_batch(self) -> dict:
        return self.batch_of(self.schedule.next_rows())

    def batch_of(self, rows: list) -> dict:
        return batch_of_rows(self.row, rows)

    def identity(self) -> dict:
        """What must match on resume for the stream to continue exactly."""
        return dict(seed=self.seed, seq_len=self.seq_len, documents=len(self.documents), tokens=self.num_tokens)

    def state_dict(self) -> dict:
        epoch, row = divmod(self.schedule.between_steps(), self.rows_per_epoch)
        return self.schedule.state_dict(epoch=epoch, row_in_epoch=row, **self.identity())

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state, f"data stream {self.dataset.prefix}", **self.identity())
