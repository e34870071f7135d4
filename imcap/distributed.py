"""Running under torchrun: which process this is, and the few collective operations imcap needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when run alone).

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The backend follows the device:
    NCCL for a CUDA device (one GPU per process, cuda:$LOCAL_RANK), gloo on the CPU.
    Training: every process sees the same batches; each takes its share of the rows (rank::world) and DDP
    averages the gradients, so N processes train the model one process would, with the same global batch
    (exactly the model of one process with TrainConfig.micro_batches = N, for N = 2: train.py).
    Feature extraction: each process encodes its share of the images into the one store.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL needs CUDA tensors)

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> "Distributed":
        """This process's place; device: the one it computes on (None: CUDA when torch sees it, else the CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if device is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
                else torch.device("cpu")
        if world == 1:
            return cls(device=device)
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and all_gather_object use the current device
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

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

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
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
