"""Process start-up: device, torch.distributed through DeepSpeed, rank helpers.

Ranks come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A plain
`python -m trainer` is a world of one: the variables are filled in so DeepSpeed skips its MPI discovery.
The backend is nccl on CUDA and gloo on the CPU.
"""

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600) -> None:
    """Join the ranks (gloo or nccl). Every process group, the ones created later by parallel/ and
    DeepSpeed included, fails a collective that waits longer than `timeout_s`: torch gives subgroups
    its module default (30 min for gloo), not the world group's timeout, so the default is set too."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    timeout = timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False, timeout=timeout)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    """The largest value over all ranks (used to agree on flags such as 'a signal arrived')."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
