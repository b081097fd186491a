"""Collectives reach the backend on the device it takes (NCCL: CUDA only) and come back as given.

The gloo runs of test_distributed.py cannot see a device mismatch: gloo takes CPU tensors. Here a
backend that takes tensors only on another device is simulated in one process: its "device" is
``meta``, and a dispatch mode keeps the data of every copy to ``meta`` (a ``meta`` tensor holds no
data), so that the fake collectives can both check the device they are handed and compute a result.
A second, simulated rank holds other values, so a result that never came back would show.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from hf_grass import distributed
from hf_grass.distributed import Distributed, backend_device

META = torch.device("meta")


class OnMeta(torch.Tensor):
    """A tensor that reports the ``meta`` device but keeps its (CPU) data."""

    data_: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> OnMeta:
        t = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, dtype=data.dtype, device=META, strides=data.stride()
        )
        t.data_ = data
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        unwrap = lambda x: x.data_ if isinstance(x, OnMeta) else x  # noqa: E731
        args, kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        leaving = func is torch.ops.aten._to_copy.default and kwargs.get("device") not in (None, META)
        if not leaving:
            kwargs.pop("device", None)
        out = func(*args, **kwargs)
        return out if leaving else tree_map(lambda x: OnMeta(x) if isinstance(x, torch.Tensor) else x, out)


class KeepMetaData(TorchDispatchMode):
    """Copies to ``meta`` keep their data (as ``OnMeta``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") == META:
            kwargs.pop("device")
            data = func(*args, **kwargs)
            return OnMeta(data.data_ if isinstance(data, OnMeta) else data)
        return func(*args, **kwargs)


class MetaOnlyBackend:
    """Fake collectives of a two-rank group whose backend takes ``meta`` tensors only."""

    def __init__(self, peer: Callable[[torch.Tensor], torch.Tensor]):
        self.peer = peer  # rank 1's tensor, given rank 0's
        self.calls: list[str] = []

    def check(self, t: torch.Tensor) -> None:
        if t.device != META:
            raise RuntimeError(f"No backend type associated with device type {t.device.type}")

    def all_reduce(self, t: torch.Tensor, op: Any = torch.distributed.ReduceOp.SUM) -> None:
        self.check(t)
        self.calls.append("all_reduce")
        other = self.peer(t)
        t.copy_(torch.maximum(t, other) if op == torch.distributed.ReduceOp.MAX else t + other)

    def all_gather(self, parts: list[torch.Tensor], t: torch.Tensor) -> None:
        self.check(t)
        for p in parts:
            self.check(p)
        self.calls.append("all_gather")
        parts[0].copy_(t)
        parts[1].copy_(self.peer(t))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.distributed, "all_reduce", self.all_reduce)
        monkeypatch.setattr(torch.distributed, "all_gather", self.all_gather)
        monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: self.check(torch.zeros(1)))
        monkeypatch.setattr(torch.distributed, "get_backend_config", lambda group=None: "meta:fake")


def test_backend_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for config, want in [
        ("cuda:nccl", torch.device("cuda", 3)),  # NCCL: this process's current GPU
        ("cpu:gloo,cuda:gloo", torch.device("cpu")),  # gloo
        ("cpu:gloo,cuda:nccl", torch.device("cpu")),  # both: the CPU tensors go to gloo
        ("meta:fake", META),
    ]:
        monkeypatch.setattr(torch.distributed, "get_backend_config", lambda group=None, c=config: c)
        assert backend_device() == want, config


def test_backend_device_of_a_real_gloo_group() -> None:
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        assert backend_device() == torch.device("cpu")
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_run_on_the_backend_device_and_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = MetaOnlyBackend(peer=lambda t: 2 * t)  # rank 1 holds twice rank 0's values
    backend.install(monkeypatch)
    dist = Distributed(rank=0, world_size=2)
    sums = {"b": torch.arange(3, dtype=torch.float64), "a": torch.tensor([[1, 2]], dtype=torch.int64)}
    with KeepMetaData():
        out = dist.all_reduce_sum(sums)
        biggest = dist.max_int(5)
        gathered = dist.all_gather(torch.tensor([1.5, -2.0]))
        dist.barrier()
    assert dist.device == META
    for key, given in sums.items():
        assert type(out[key]) is torch.Tensor and out[key].device == given.device
        assert out[key].dtype == given.dtype
        assert out[key].tolist() == (3 * given).tolist()
    assert sums["b"].tolist() == [0.0, 1.0, 2.0]  # the caller's tensors are untouched
    assert biggest == 10
    assert [g.tolist() for g in gathered] == [[1.5, -2.0], [3.0, -4.0]]
    assert all(type(g) is torch.Tensor and g.device.type == "cpu" for g in gathered)
    assert backend.calls == ["all_reduce"] * 3 + ["all_gather", "all_reduce"]


def test_agreeing_on_an_error_goes_through_the_backend_device(monkeypatch: pytest.MonkeyPatch) -> None:
    report = b"non-finite loss for training example index 7"

    def peer(t: torch.Tensor) -> torch.Tensor:  # rank 1 failed and says why
        if t.dtype == torch.uint8:
            blob = torch.zeros(distributed.MESSAGE_BYTES, dtype=torch.uint8)
            blob[: len(report)] = torch.tensor(list(report), dtype=torch.uint8)
            return blob
        return torch.ones_like(t)

    MetaOnlyBackend(peer).install(monkeypatch)
    with KeepMetaData():
        message = Distributed(rank=0, world_size=2).agree_on_error(None)
    assert message == "rank 1 of 2: non-finite loss for training example index 7"
    MetaOnlyBackend(lambda t: torch.zeros_like(t)).install(monkeypatch)
    with KeepMetaData():
        assert Distributed(rank=0, world_size=2).agree_on_error(None) is None
        both = Distributed(rank=0, world_size=2).agree_on_error("boom")
    assert both == "rank 0 of 2: boom"


def test_every_collective_goes_through_distributed() -> None:
    """No module but hf_grass/distributed.py touches torch.distributed (so none bypasses the device move)."""
    package = Path(__file__).resolve().parents[1] / "hf_grass"
    offenders = []
    for path in package.rglob("*.py"):
        if path == package / "distributed.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            uses = (
                isinstance(node, ast.Attribute)
                and node.attr == "distributed"
                and isinstance(node.value, ast.Name)
                and node.value.id == "torch"
            )
            imports = (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed")) or (
                isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names)
            ) or (isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names))  # fmt: skip
            if uses or imports:
                offenders.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not offenders, offenders
