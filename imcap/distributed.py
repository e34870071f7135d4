"""Running under torchrun: which process this is, and the few collective operations imcap needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when run alone).

    torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; the gloo backend runs on CPUs, NCCL on GPUs.
    Training: every process sees the same batches; each takes its share of the rows (rank::world) and DDP
    averages the gradients, so N processes train the model one process would, with the same global batch.
    Feature extraction: each process encodes its share of the images into the one store.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items):
        return items[self.rank :: self.world]

    def sum(self, value: float) -> float:
        """`value` added up over the processes (each computes a shard of one batch's loss)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def sum_gradients(self, parameters) -> None:
        """Add up the parameters' gradients over the processes (for steps that bypass the DDP wrapper)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order (just [obj] alone)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
