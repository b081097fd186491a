"""The pieces of a pass's plan: the modules' layout for the manifest and the statistics, and the
records of one batch, one step of the plan and one shard being written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hf_grass.capture.engine import BatchGradients, GradientComputer
from hf_grass.precondition.statistics import ModuleSpec


def module_specs(computer: GradientComputer) -> list[ModuleSpec]:
    specs = []
    for t in computer.targets:
        c = computer.compressors[t.name]
        specs.append(ModuleSpec(t.name, c.output_dim, getattr(c, "m_in", 0), getattr(c, "m_out", 0)))
    return specs


def module_entries(computer: GradientComputer) -> list[dict[str, Any]]:
    """The manifest's per-module layout: shapes, the row slice and the factor-space widths."""
    entries = []
    for t in computer.targets:
        c = computer.compressors[t.name]
        start, stop = computer.offsets[t.name]
        entry = {
            "name": t.name,
            "d_in": t.d_in,
            "d_out": t.d_out,
            "bias": t.bias,
            "offset": start,
            "dim": stop - start,
        }
        if c.factorised:
            entry.update(m_in=c.m_in, m_out=c.m_out)  # type: ignore[attr-defined]
        if t.tied_name is not None:  # its rows hold the tied input embedding's use too
            entry["tied"] = t.tied_name
        entries.append(entry)
    return entries


@dataclass
class Step:
    """One batch of the plan."""

    shard: int
    indices: list[int]
    last: bool  # the shard's last batch: the shard is committed after it
    repair: bool  # a damaged shard recomputed: its statistics were counted already


@dataclass
class Batch:
    """What one batch gave: the examples kept (those with supervised tokens) and their gradients."""

    indices: list[int]
    examples: list[dict[str, Any]]
    skipped: list[int]
    grads: BatchGradients | None


@dataclass
class ShardBuffer:
    """The rows of the shard being computed, until it is committed."""

    indices: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)  # int8 rows: one scale per row
    norms: list[torch.Tensor] = field(default_factory=list)  # [rows, 2]: gradient, preconditioned
    docs: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    leads: list[list[int] | None] = field(default_factory=list)  # each document's leading special ids
