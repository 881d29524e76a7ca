"""Process groups for sharded generation (torchrun), reduced to what a run needs: who am I, how
many are we, wait for the others, and share one small object from rank 0.

A run started by ``torchrun --nproc_per_node=K run.py ...`` has WORLD_SIZE=K in its environment;
``init_from_env`` joins the group (NCCL when every rank has a GPU, gloo otherwise). Without
torchrun nothing is initialised and every helper behaves as a group of one, so single-process
code paths never touch torch.distributed.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

STAMP_ENV = "RFC_RUN_STAMP"  # the run folder's time stamp, shared by every rank of a torchrun job


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """The WORLD_SIZE torchrun put in the environment (1 when started without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str = "auto") -> Group:
    """Join the torchrun group if there is one (idempotent) and return this process's place in it.

    The backend follows the devices the ranks will sample on: NCCL for CUDA, gloo for CPU (the
    CPU path is what the tests exercise)."""
    if launched_world_size() > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=_dt.timedelta(hours=2))
    return group()


def group() -> Group:
    if not dist.is_initialized():
        return Group()
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def barrier() -> None:
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (identity without a group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_run_stamp() -> None:
    """Give every rank of a torchrun job rank 0's time stamp, so that Hydra resolves one output
    folder for all of them (``${now:...}`` differs by microseconds between processes)."""
    if launched_world_size() <= 1 or STAMP_ENV in os.environ:
        return
    stamp = _dt.datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    os.environ[STAMP_ENV] = str(broadcast(stamp))


def shutdown() -> None:
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
