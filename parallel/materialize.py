"""Allocate a parallelized model's parameters on their device and fill them from a source: the last
step of building a model (torchtitan's order: meta device -> parallelize -> materialize).

    with torch.device("meta"):
        model = Mixtral(cfg)
    parallelize(model, layout, cfg.parallel)          # slices meta tensors: no memory
    materialize(model, RandomInit(std, seed), device)  # or model.hf.HFFolder, trainer.checkpoint.CheckpointSource

Each parameter knows which box of its logical (single-device) tensor it holds from `param._shard`
(parallel/layers.py mark_sharded, parallel/expert_parallel.py): `local_slice` turns that into the
full shape and offsets, the one mapping that checkpoints (trainer/checkpoint.py) use as well. The
source is asked for that box only (`source.read(name, full_shape, offsets, shape)`), so a rank never
holds a tensor, or a piece of one, that it does not keep.
"""

import torch
from torch import nn


def shard_specs(param) -> list[tuple[int, int, int]]:
    spec = getattr(param, "_shard", None)
    if spec is None:
        return []
    return [tuple(spec)] if isinstance(spec[0], int) else [tuple(s) for s in spec]


def local_slice(param) -> tuple[list[int], list[int]]:
    """(full shape, offsets) of this rank's piece of the logical tensor."""
    full, offsets = list(param.shape), [0] * param.dim()
    for dim, rank, world in shard_specs(param):
        offsets[dim] = offsets[dim] * world + rank * param.shape[dim]
        full[dim] *= world
    return full, offsets


CHUNK_BYTES = 4 * 2 ** 20  # the most a source is asked for at once (at least one dim-0 slice)


@torch.no_grad()
def materialize(model: nn.Module, source, device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every parameter's data by its box read from `source`, on `device` in `dtype`.

    Every parameter is allocated first, then filled in pieces of at most CHUNK_BYTES along dim 0, so
    the memory on top of the shards is one piece, and the host allocator gets no chance to place the
    shards between the freed pieces (glibc would: it serves allocations from its heap once large
    blocks have been freed, and that heap does not shrink). The Parameter objects stay
    (torch.utils.swap_tensors) with their attributes (`_shard`, DeepSpeed's tags); tensor hooks do not
    carry over, so parallelize registers its gradient hooks at the first forward."""
    params = list(model.named_parameters())
    for _, p in params:
        fresh = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), requires_grad=p.requires_grad)
        fresh.__dict__.update(p.__dict__)
        torch.utils.swap_tensors(p, fresh)
    for name, p in params:
        full, offsets = local_slice(p)
        rows = max(1, CHUNK_BYTES // (p[0].numel() * p.element_size()))  # dim-0 slices per piece
        for start in range(0, p.shape[0], rows):
            piece = p[start:start + rows]
            value = source.read(name, full, [offsets[0] + start, *offsets[1:]], list(piece.shape))
            if list(value.shape) != list(piece.shape):
                raise ValueError(f"{name}: the source gave shape {tuple(value.shape)} for a box of "
                                 f"{tuple(piece.shape)}")
            piece.copy_(value)
    for name, b in model.named_buffers():  # persistent buffers (model/moe.py's expert_bias): whole on every rank
        if b.is_meta and name in model.state_dict(keep_vars=True):
            value = source.read(name, list(b.shape), [0] * b.dim(), list(b.shape))
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, value.to(device=device, dtype=torch.float32))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"materialize: buffers {left} are still on the meta device")
    return model
