"""Starting weights as *sources*: `read(name, full_shape, offsets, shape)` -> the box
[offsets, offsets + shape) of the logical (single-device) tensor `name`, whose shape is full_shape.

A rank that holds a slice of a tensor asks only for that box (parallel/materialize.py), so no source
ever builds a tensor the rank does not hold. Sources: RandomInit (here), StateDictSource (here, for
tensors already in memory), model.hf.HFFolder (an HF folder) and trainer.checkpoint.CheckpointSource.

Random init is defined per row block so that any box can be generated alone. A tensor of shape
(..., C) is R = prod(shape[:-1]) rows of C values cut into blocks of ROWS_PER_BLOCK rows; block b of
tensor `name` is drawn from its own generator seeded by block_seed(seed, name, b). A box is generated
block by block, keeping of each block only the box's rows and columns, so the largest temporary is
one block (ROWS_PER_BLOCK x C). Mixtral.init_weights is this same source read whole, so every layout
starts from the single-device weights. Matrices ~ Normal(0, init_std), norms = 1 (transformers' init).
"""

import hashlib
import math

import torch

ROWS_PER_BLOCK = 64


def block_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit seed of (run seed, tensor name, block index), the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def box_rows(full_shape, offsets, shape) -> torch.Tensor:
    """Flat row indices (rows = all dims but the last) of a box, ascending, in the box's order."""
    rows = torch.zeros((), dtype=torch.long)
    for size, off, n in zip(full_shape[:-1], offsets[:-1], shape[:-1]):
        rows = rows[..., None] * size + torch.arange(off, off + n)
    return rows.flatten()


def normal_box(name: str, full_shape, offsets, shape, std: float, seed: int) -> torch.Tensor:
    """The box of tensor `name`'s Normal(0, std) init; equal to the same box of the whole tensor."""
    full_shape, offsets, shape = list(full_shape), list(offsets), list(shape)
    rows = box_rows(full_shape, offsets, shape)
    total_rows, cols = math.prod(full_shape[:-1]), full_shape[-1]
    c0, c1 = offsets[-1], offsets[-1] + shape[-1]
    out = torch.empty(rows.numel(), shape[-1])
    blocks, counts = torch.unique_consecutive(rows // ROWS_PER_BLOCK, return_counts=True)
    gen, start = torch.Generator(device="cpu"), 0
    for block, count in zip(blocks.tolist(), counts.tolist()):
        first = block * ROWS_PER_BLOCK
        values = torch.randn(min(ROWS_PER_BLOCK, total_rows - first), cols,
                             generator=gen.manual_seed(block_seed(seed, name, block)))
        out[start:start + count] = values[rows[start:start + count] - first, c0:c1]
        start += count
    return out.mul_(std).view(shape)


class RandomInit:
    """Mixtral's random init as a source: ones for norms, Normal(0, std) blocks for the rest."""

    def __init__(self, std: float, seed: int):
        self.std, self.seed = std, seed

    def read(self, name: str, full_shape, offsets, shape) -> torch.Tensor:
        if name.endswith(("norm.weight", "logit_scale")):  # logit_scale: model/mot.py's learned temperature
            return torch.ones(list(shape))
        if name.endswith("expert_bias"):  # model/moe.py's balancing bias starts at 0
            return torch.zeros(list(shape))
        return normal_box(name, full_shape, offsets, shape, self.std, self.seed)


class StateDictSource:
    """Whole tensors already in memory (a state dict under our names) as a source."""

    def __init__(self, state_dict: dict):
        self.state = state_dict

    def read(self, name: str, full_shape, offsets, shape) -> torch.Tensor:
        t = self.state[name]
        if list(t.shape) != list(full_shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(full_shape)}")
        return t[tuple(slice(o, o + n) for o, n in zip(offsets, shape))]


class PrefixedSource:
    """A model that wraps the decoder as `<prefix>*` (model/multimodal.py, model/reranker.py): names under
    the prefix are read from `decoder` under the decoder's own names, the others from `rest`."""

    def __init__(self, prefix: str, decoder, rest):
        self.prefix, self.decoder, self.rest = prefix, decoder, rest

    def read(self, name: str, full_shape, offsets, shape) -> torch.Tensor:
        if name.startswith(self.prefix):
            return self.decoder.read(name[len(self.prefix):], full_shape, offsets, shape)
        return self.rest.read(name, full_shape, offsets, shape)


class SubmoduleSource:
    """A source's tensors under `prefix` (a submodule such as `decoder.`), read under the submodule's own
    names: exports the decoder of a wrapping model."""

    def __init__(self, source, prefix: str):
        self.source, self.prefix = source, prefix

    def read(self, name: str, full_shape, offsets, shape) -> torch.Tensor:
        return self.source.read(self.prefix + name, full_shape, offsets, shape)
