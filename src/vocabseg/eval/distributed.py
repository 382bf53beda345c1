"""Just enough ``torch.distributed`` for sharded evaluation.

World info comes from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); under
SLURM, launch with ``srun torchrun ...`` (SLURM's own variables are not read: a batch script that
runs one plain process inside a multi-task allocation must not wait for peers). Results are
combined with an int64 ``all_reduce`` of the confusion matrices, which is exact, so the sharded
result equals the single-process one.

gloo can abort in its teardown at interpreter exit on some machines (a known PyTorch issue); a torchrun
entry point should end with :func:`exit_process`, which destroys the process group, flushes and
``os._exit``s.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n, "").strip().lstrip("-").isdigit():
            return int(os.environ[n])
    return default


def world_info() -> WorldInfo:
    """Rank, world size and local rank from torchrun's environment; 0/1/0 otherwise."""
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", default=0))
    return WorldInfo(
        rank=_env_int("RANK", default=0),
        world_size=_env_int("WORLD_SIZE", default=1),
        local_rank=_env_int("LOCAL_RANK", default=0),
    )


def init_distributed(device: str | torch.device = "cpu") -> WorldInfo:
    """Join the process group when launched with several processes (nccl on CUDA, gloo otherwise)."""
    info = world_info()
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def process_device(device: str, info: WorldInfo) -> str:
    """``cuda`` becomes ``cuda:<local rank>`` so each process of a node gets its own GPU."""
    return f"cuda:{info.local_rank}" if device == "cuda" and info.distributed else device


def all_reduce_sum(tensor: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (a copy; the input is unchanged)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.clone()
    on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = tensor.to(on, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def exit_process(code: int = 0) -> None:
    """End a torchrun worker without gloo's teardown race: destroy the group, flush, ``os._exit``."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
