"""The process group of a multi-process run, and every collective the library uses.

The group is the one torchrun / Accelerate / DeepSpeed initialised, read through
``torch.distributed`` (under DeepSpeed on CPU Accelerate reports a single process). All collectives
of the library go through ``Distributed``, so how tensors reach the backend is decided in one place:
each tensor is copied to the device the group's backend takes (``backend_device``: the current CUDA
device for NCCL, the CPU for gloo) and the result comes back with the device and dtype it was given
in. NCCL accepts only CUDA tensors, while the library's sums, counts and top-k lists live on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# what a rank's message can hold in `agree_on_error` (longer messages are cut)
MESSAGE_BYTES = 1024


def backend_device(group: object = None) -> torch.device:
    """The device on which the backend of ``group`` (default: the default group) takes tensors.

    ``torch.distributed.get_backend_config`` lists the device types the group serves
    (``"cpu:gloo,cuda:gloo"`` for gloo, ``"cuda:nccl"`` for NCCL, ``"cpu:gloo,cuda:nccl"`` when
    both were asked for). The CPU is preferred when the group serves it (the library's tensors are
    there); otherwise the first device type, at the process's current device of that type.
    """
    config = str(torch.distributed.get_backend_config(group))  # type: ignore[arg-type]
    types = [pair.split(":", 1)[0].strip() for pair in config.split(",") if ":" in pair]
    if not types or "cpu" in types:
        return torch.device("cpu")
    kind = types[0]
    module = getattr(torch, kind, None)
    current = getattr(module, "current_device", None)
    return torch.device(kind, current()) if callable(current) else torch.device(kind)


@dataclass
class Distributed:
    """Rank and world size of a pass (single process by default).

    ``torch.distributed`` must already be initialised when ``world_size > 1`` (Accelerate and
    torchrun do it). The collectives take and return tensors on any device; they move them to the
    backend's device (``backend_device``) and back.
    """

    rank: int = 0
    world_size: int = 1
    _device: torch.device | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """Where tensors go for the collectives (looked up once, on first use)."""
        if self._device is None:
            self._device = backend_device()
        return self._device

    def _send(self, tensor: torch.Tensor) -> torch.Tensor:
        # a copy on the backend's device (collectives write into it; the caller's tensor stays)
        return tensor.detach().to(self.device, copy=True)

    def barrier(self) -> None:
        """Wait for every rank: an all-reduce of one number on the backend's device (NCCL's own
        barrier has to guess which GPU this process uses)."""
        if self.active:
            torch.distributed.all_reduce(self._send(torch.zeros(1)))

    def all_reduce_sum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Element-wise sums over the ranks of a dict of tensors (reduced in key order on every rank)."""
        if not self.active:
            return tensors
        out = {}
        for key in sorted(tensors):  # same order on every rank
            given = tensors[key]
            sent = self._send(given)
            torch.distributed.all_reduce(sent)
            out[key] = sent.to(device=given.device, dtype=given.dtype)
        return out

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        if not self.active:
            return value
        sent = self._send(torch.tensor([value], dtype=torch.int64))
        torch.distributed.all_reduce(sent, op=torch.distributed.ReduceOp.MAX)
        return int(sent.cpu()[0])

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        if not self.active:
            return [tensor]
        sent = self._send(tensor)
        parts = [torch.empty_like(sent) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, sent)
        return [p.to(device=tensor.device, dtype=tensor.dtype) for p in parts]

    def agree_on_error(self, message: str | None) -> str | None:
        """Whether any rank failed here: ``None`` on every rank if none did, else one message (the
        same on every rank) naming each failed rank and what it reported.

        Every rank must call it at the same point. Costs one all-reduce of one number when nothing
        failed, and one all-gather of ``MESSAGE_BYTES`` bytes per rank when something did.
        """
        if not self.active:
            return message
        flag = torch.tensor([0 if message is None else 1], dtype=torch.int64)
        if int(self.all_reduce_sum({"failed": flag})["failed"][0]) == 0:
            return None
        blob = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
        raw = (message or "").encode("utf-8")[:MESSAGE_BYTES]
        blob[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else blob[:0]
        reports = []
        for rank, part in enumerate(self.all_gather(blob)):
            text = bytes(part.tolist()).rstrip(b"\x00").decode("utf-8", errors="replace")
            if text:
                reports.append(f"rank {rank} of {self.world_size}: {text}")
        return "; ".join(reports)


def current_distributed() -> Distributed:
    """Rank and world size of the running job (1 process when torch.distributed is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Distributed()
