"""The process group of a multi-process run, and every collective the library uses.

The group is the one torchrun / Accelerate / DeepSpeed initialised, read through
``torch.distributed`` (under DeepSpeed on CPU Accelerate reports a single process). All collectives
of the library go through ``Distributed``, so how tensors reach the backend is decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    """Rank and world size of a pass (single process by default).

    ``torch.distributed`` must already be initialised when ``world_size > 1`` (Accelerate and
    torchrun do it).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_reduce_sum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Element-wise sums over the ranks of a dict of tensors (reduced in key order on every rank)."""
        if not self.active:
            return tensors
        out = {}
        for key in sorted(tensors):  # same order on every rank
            t = tensors[key].clone()
            torch.distributed.all_reduce(t)
            out[key] = t
        return out

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        if not self.active:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return parts


def current_distributed() -> Distributed:
    """Rank and world size of the running job (1 process when torch.distributed is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Distributed()
