"""The attribution pass: examples -> per-example compressed gradients -> a gradient cache on disk.

Shard ``s`` covers examples ``[s * shard_size, (s + 1) * shard_size)``; in a multi-process run
rank ``r`` computes the shards with ``s % world_size == r``, so every rank writes whole shards of
its own and no sampler padding can duplicate an example. Batches never cross a shard boundary,
which makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_grass.cache.files import CacheError, mmap_tensors, save_tensors, sha256_file
from hf_grass.cache.stats import ModuleSpec, StatsAccumulator, fit_eigenbasis, is_whitened, rotate
from hf_grass.cache.writer import CacheWriter, num_shards
from hf_grass.capture.engine import GradientComputer, NonFiniteError, context_length, is_zero3
from hf_grass.capture.hooks import CaptureRequest
from hf_grass.capture.loss import supervised_tokens
from hf_grass.capture.targets import TargetModule
from hf_grass.data import ExampleSource, collate, is_lm_example

logger = logging.getLogger("transformers.hf_grass")


@dataclass
class Distributed:
    """The process group of a multi-process pass (single process by default).

    ``torch.distributed`` must already be initialised when ``world_size > 1`` (Accelerate and
    torchrun do it); the sums reduced here are small float64 tensors.
    """

    rank: int = 0
    world_size: int = 1

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world_size == 1:
            return tensors
        out = {}
        for key in sorted(tensors):  # same order on every rank
            t = tensors[key].clone()
            torch.distributed.all_reduce(t)
            out[key] = t
        return out


def module_specs(computer: GradientComputer) -> list[ModuleSpec]:
    specs = []
    for t in computer.targets:
        c = computer.compressors[t.name]
        specs.append(ModuleSpec(t.name, c.output_dim, getattr(c, "m_in", 0), getattr(c, "m_out", 0)))
    return specs


def module_entries(computer: GradientComputer) -> list[dict[str, Any]]:
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
        entries.append(entry)
    return entries


def model_fingerprint(
    model: nn.Module,
    targets: list[TargetModule],
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Class, name/path, revision, target shapes and a hash of the target weights.

    The weight hash reads the first 4096 values of each target weight, enough to tell a trained
    model from its base without hashing gigabytes. ``gather`` returns a full weight under ZeRO-3.
    """
    cfg = getattr(model, "config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_cfg = getattr(base, "config", cfg)
    digest = hashlib.sha256()
    shapes = hashlib.sha256()
    for t in targets:
        digest.update(_weight_head(t.module.weight, gather))
        shapes.update(f"{t.name}:{t.d_out}x{t.d_in}:{t.bias};".encode())
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
        "revision": getattr(base_cfg, "_commit_hash", None),
        "modules_sha256": shapes.hexdigest()[:16],
        "weights_sha256": digest.hexdigest()[:16],
    }


def _weight_head(weight: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None) -> bytes:
    """The first 4096 values of a weight as float64 bytes (gathered when ZeRO-3 partitions it)."""
    if gather is not None:
        weight = gather(weight)
    elif hasattr(weight, "ds_id"):  # a DeepSpeed ZeRO-3 partition: gather the full weight briefly
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().reshape(-1)[:4096].to("cpu", torch.float64).numpy().tobytes()
    return weight.detach().reshape(-1)[:4096].to("cpu", torch.float64).numpy().tobytes()


def _shard_indices(shard: int, shard_size: int, n: int) -> list[int]:
    start = shard * shard_size
    return list(range(start, min(start + shard_size, n)))


def _lockstep(items: list, dist: Distributed, lockstep: bool) -> Iterator:
    """The items, then ``None`` until every rank has had as many steps as the busiest one.

    The step count is agreed on before the first item, so this collective never interleaves with
    the collectives of the steps themselves.
    """
    steps = len(items)
    if lockstep:
        count = torch.tensor([steps], dtype=torch.int64)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        steps = int(count)
    yield from items
    for _ in range(steps - len(items)):
        yield None


def _batches(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def build_cache(
    computer: GradientComputer,
    source: ExampleSource,
    cache_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    pad_token_id: int | None = 0,
    padding_side: str = "right",
    dist: Distributed | None = None,
    model_info: dict[str, Any] | None = None,
    disable_progress: bool = False,
    verify_existing: bool = False,
) -> Path:
    """Run the attribution pass over ``source`` and write (or resume) the cache in ``cache_dir``.

    On resume, shards already listed but missing or truncated on disk (with ``verify_existing``,
    also any whose sha256 does not match) are recomputed.
    """
    dist = dist or Distributed()
    config = computer.config
    if source.max_length is None:  # never feed the model more positions than it has
        source.max_length = config.max_length or context_length(computer.model)
    n = len(source)
    header = {
        "model": model_info or model_fingerprint(computer.model, computer.targets),
        "modules": module_entries(computer),
        "dim": computer.total_dim,
        "num_examples": n,
        "dataset": source.fingerprint(),
        "library_version": _version(),
    }
    writer = CacheWriter(cache_dir, config, header, dist.rank, dist.world_size)
    specs = module_specs(computer)
    lockstep = dist.world_size > 1 and is_zero3(computer.model)

    def dummy() -> dict[str, torch.Tensor]:
        """A batch with one supervised token, run (and discarded) to keep ZeRO-3 ranks in step."""
        example = source.example(0)
        if is_lm_example(example):
            ids = (list(example["input_ids"]) + [pad_token_id or 0] * 2)[:2]
            example = {"input_ids": ids, "labels": ids}
        return collate([example], pad_token_id, padding_side)

    def run_batch(idx: list[int], request: CaptureRequest):
        """(kept indices, their examples, skipped indices, gradients or None)."""
        examples = [source.example(i) for i in idx]
        batch = collate(examples, pad_token_id, padding_side)
        counts = supervised_tokens(batch["labels"], batch.get("attention_mask"))
        keep = [k for k in range(len(idx)) if counts[k] > 0]
        skipped = [idx[k] for k in range(len(idx)) if counts[k] == 0]
        if skipped:
            logger.warning(
                "Skipping examples %s: they have no supervised tokens (all labels are -100).", skipped
            )
        if not keep:
            return [], [], skipped, None
        if len(keep) < len(idx):
            examples = [examples[k] for k in keep]
            batch = collate(examples, pad_token_id, padding_side)
        try:
            grads = computer.compute(batch, request)
        except NonFiniteError as err:
            bad = [idx[keep[r]] for r in err.rows]
            raise ValueError(
                f"non-finite {err.what} for training example index {bad[0]} (all: {bad}); check that "
                "example and the model's numerics (e.g. fp16 overflow)."
            ) from None
        return [idx[k] for k in keep], examples, skipped, grads

    try:
        writer.cleanup_orphans()
        eigenbasis = None
        if config.preconditioner in ("kfac", "ekfac"):
            eigenbasis = _warmup(
                computer, writer, specs, dist, run_batch, batch_size, n, disable_progress, lockstep, dummy
            )
        stats = None
        if config.preconditioner != "identity":
            stats = StatsAccumulator(specs, config.preconditioner, eigenbasis, device=computer.device)
            if writer.stats_file is not None:
                if not writer.stats_file.exists():
                    raise CacheError(
                        f"{writer.stats_file} is missing; delete {cache_dir} and rebuild the cache"
                    )
                stats.load_state_dict(mmap_tensors(writer.stats_file))
        mine = [s for s in range(num_shards(n, config.shard_size)) if s % dist.world_size == dist.rank]
        todo = [s for s in mine if s not in writer.completed]
        damaged = writer.damaged_shards(verify=verify_existing)
        if damaged:
            logger.warning("Gradient cache %s: recomputing damaged shards %s.", cache_dir, damaged)
        if len(todo) < len(mine):
            logger.info(
                "Gradient cache %s: %d of %d shards done, resuming.",
                cache_dir,
                len(mine) - len(todo),
                len(mine),
            )
        whitened = is_whitened(eigenbasis)
        if whitened:  # rows are built below from the factor gradients: S (whiten * R G')
            request = CaptureRequest(rows=False, factor_grads=True, covariances=True)
        else:
            request = CaptureRequest(rows=True, **(stats.request_kwargs if stats else {}))
        total = sum(min(config.shard_size, n - s * config.shard_size) for s in damaged + todo)
        with (
            computer.session(),
            tqdm(
                total=total,
                desc="hf-grass: caching gradients",
                unit="ex",
                disable=disable_progress or total == 0,
            ) as bar,
        ):
            # a flat plan of batches; under ZeRO-3 every rank must run the same number of
            # forward/backward passes (parameters are gathered collectively), so ranks with less
            # work run discarded dummy batches until all are done
            # damaged shards (missing or corrupt files) are recomputed first, with the same request so
            # the rows come out bit-identical, but without counting them in the statistics again
            plan = [
                (shard, idx, pos == last, shard in damaged)
                for shard in damaged + todo
                for batches in [list(_batches(_shard_indices(shard, config.shard_size, n), batch_size))]
                for last in [len(batches) - 1]
                for pos, idx in enumerate(batches)
            ]
            kept, rows, docs, skipped = [], [], [], []
            truncated_before = source.truncated
            for item in _lockstep(plan, dist, lockstep):
                if item is None:
                    computer.compute(dummy(), CaptureRequest(rows=True))
                    continue
                shard, idx, last, repair = item
                ids, examples, skip, grads = run_batch(idx, request)
                skipped += skip
                bar.update(len(idx))
                if grads is not None:
                    rotated = None
                    if whitened:
                        rotated = {
                            name: rotate(eigenbasis, name, g) for name, g in grads.factor_grads.items()
                        }
                        grads.rows = whitened_rows(computer, eigenbasis, rotated)
                        bad = (~torch.isfinite(grads.rows).all(dim=1)).nonzero().flatten().tolist()
                        if bad:
                            raise ValueError(f"non-finite gradient for training example index {ids[bad[0]]}")
                    if stats is not None and not repair:
                        stats.update(
                            grads.rows, grads.factor_grads, grads.cov_in, grads.cov_out, grads.tokens, rotated
                        )
                    stored = grads.rows.to(config.torch_dtype).cpu()
                    overflow = (~torch.isfinite(stored).all(dim=1)).nonzero().flatten().tolist()
                    if overflow:  # finite in fp32 but not in the storage dtype (fp16 tops out at 65504)
                        raise ValueError(
                            f"the compressed gradient of training example index {ids[overflow[0]]} overflows "
                            f"{config.dtype}; use GraSSConfig(dtype='bfloat16') or 'float32' for this model."
                        )
                    kept += ids
                    rows.append(stored)
                    docs += [
                        {"index": i, "text": ex.get("text"), "id": ex.get("id")}
                        for i, ex in zip(ids, examples)
                    ]
                elif lockstep:
                    computer.compute(dummy(), CaptureRequest(rows=True))
                if not last:
                    continue
                block = (
                    torch.cat(rows) if rows else torch.empty(0, computer.total_dim, dtype=config.torch_dtype)
                )
                writer.commit_shard(
                    shard,
                    kept,
                    block,
                    docs,
                    skipped,
                    stats.state_dict() if stats is not None and not repair else None,
                    truncated=source.truncated - truncated_before,
                )
                kept, rows, docs, skipped = [], [], [], []
                truncated_before = source.truncated
        writer.finish(complete=True)
        dist.barrier()
        if dist.world_size > 1 and dist.rank == 0:
            writer.merge()
        dist.barrier()
    finally:
        writer.close()
    return Path(cache_dir)


def _warmup(
    computer, writer, specs, dist, run_batch, batch_size, n, disable_progress, lockstep=False, dummy=None
) -> dict[str, torch.Tensor]:
    """K-FAC eigenbasis (and row whitening) from the covariances of the first ``ekfac_sample_size``
    examples."""
    entry = writer.eigenbasis_entry()
    path = writer.eigenbasis_path
    if entry is not None and path.exists():
        if sha256_file(path) != entry["sha256"]:
            raise CacheError(f"{path} does not match its checksum; delete the cache directory and rebuild")
        return {k: v.clone() for k, v in mmap_tensors(path).items()}
    # rank 0 alone runs the warm-up sample, in the same batches as a single process would: the
    # basis (which rotates the stored rows) is then bit-identical for any number of processes,
    # where summing per-rank parts in another order could turn eigenvectors of (near-)degenerate
    # eigenvalues arbitrarily. The sample is small; other ranks wait (or, under ZeRO-3, step along).
    sample = list(range(min(n, computer.config.ekfac_sample_size))) if dist.rank == 0 else []
    sums: dict[str, torch.Tensor] = {}
    request = CaptureRequest(rows=False, covariances=True)
    with (
        computer.session(),
        tqdm(
            total=len(sample), desc="hf-grass: fitting K-FAC eigenbasis", unit="ex", disable=disable_progress
        ) as bar,
    ):
        for idx in _lockstep(list(_batches(sample, batch_size)), dist, lockstep):
            grads = run_batch(idx, request)[3] if idx is not None else None
            if idx is not None:
                bar.update(len(idx))
            if grads is None:
                if lockstep:
                    computer.compute(dummy(), request)
                continue
            sums["examples"] = sums.get("examples", 0) + torch.tensor(
                float(grads.losses.shape[0]), dtype=torch.float64
            )
            for name, value in grads.cov_in.items():
                sums[f"{name}::cov_in"] = sums.get(f"{name}::cov_in", 0) + value.cpu()
                sums[f"{name}::cov_out"] = sums.get(f"{name}::cov_out", 0) + grads.cov_out[name].cpu()
                sums[f"{name}::tokens"] = sums.get(f"{name}::tokens", 0) + torch.tensor(
                    float(grads.tokens[name]), dtype=torch.float64
                )
    # modules without any gradient in the sample still need a (trivial) basis; every rank must
    # reduce the same keys
    sums.setdefault("examples", torch.zeros((), dtype=torch.float64))
    for spec in specs:
        sums.setdefault(f"{spec.name}::cov_in", torch.zeros(spec.m_in, spec.m_in, dtype=torch.float64))
        sums.setdefault(f"{spec.name}::cov_out", torch.zeros(spec.m_out, spec.m_out, dtype=torch.float64))
        sums.setdefault(f"{spec.name}::tokens", torch.zeros((), dtype=torch.float64))
    sums = dist.all_reduce_sum(sums)
    basis = fit_eigenbasis(
        specs,
        {s.name: sums[f"{s.name}::cov_in"] for s in specs},
        {s.name: sums[f"{s.name}::cov_out"] for s in specs},
        tokens={s.name: float(sums[f"{s.name}::tokens"]) for s in specs},
        examples=float(sums["examples"]),
        damping=computer.config.damping,
    )
    if dist.rank == 0:
        save_tensors(path, basis)
    dist.barrier()
    writer.record_eigenbasis(sha256_file(path))
    # every rank uses rank 0's file, so the basis is bit-identical across processes
    return {k: v.clone() for k, v in mmap_tensors(path).items()}


def whitened_rows(
    computer: GradientComputer, basis: dict[str, torch.Tensor], rotated: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Train rows of a K-FAC cache: per module ``S (whiten * Q_out^T G' Q_in)`` -> ``[B, dim]`` fp32."""
    batch = next(iter(rotated.values())).shape[0]
    rows = torch.zeros(batch, computer.total_dim, dtype=torch.float32, device=computer.device)
    for name, (start, stop) in computer.offsets.items():
        if name not in rotated:  # never reached by the forward: zero gradient
            continue
        scaled = (rotated[name] * basis[f"{name}::whiten"].to(rotated[name].device)).to(torch.float32)
        rows[:, start:stop] = computer.compressors[name].project_factor(scaled)  # type: ignore[attr-defined]
    return rows


def _version() -> str:
    from hf_grass import __version__

    return __version__
