"""`AttributionPass`: examples -> per-example compressed gradients -> a gradient cache on disk.

The pass, in order:

1. **warm-up** (kfac/ekfac only): rank 0 accumulates the factor covariances of the first
   ``ekfac_sample_size`` examples and fits the K-FAC eigenbasis that whitens the stored rows;
2. **statistics**: the running float64 sums the preconditioner is fitted from, checkpointed with
   every shard (resumed from the last checkpoint);
3. **sharding**: shard ``s`` covers examples ``[s * shard_size, (s + 1) * shard_size)``; in a
   multi-process run rank ``r`` computes the shards with ``s % world_size == r``, so every rank
   writes whole shards of its own and no sampler padding can duplicate an example. Batches never
   cross a shard boundary, which makes a resumed run bit-identical to an uninterrupted one;
4. **writing**: each finished shard is committed through ``CacheWriter`` (crash-safe); rank 0
   merges the per-rank manifests at the end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_grass._version import __version__
from hf_grass.attribution.plan import Batch, ShardBuffer, Step, module_entries, module_specs
from hf_grass.cache.files import CacheError, mmap_tensors, save_tensors, sha256_file
from hf_grass.cache.writer import CacheWriter, encode_rows, num_shards
from hf_grass.capture.engine import BatchGradients, GradientComputer, NonFiniteError, context_length, is_zero3
from hf_grass.capture.fingerprint import model_fingerprint
from hf_grass.capture.hooks import FULL_COVARIANCE_MAX_WIDTH, CaptureRequest
from hf_grass.capture.loss import loss_name, supervised_tokens
from hf_grass.data import ExampleSource, collate, common_prefix, document_encoding, is_lm_example
from hf_grass.distributed import Distributed
from hf_grass.precondition.eigenbasis import (
    attach_basis,
    fit_eigenbasis,
    fit_rotated_masks,
    is_whitened,
    rotate,
    whiten_train,
)
from hf_grass.precondition.statistics import FullCovariances, StatsAccumulator

logger = logging.getLogger("transformers.hf_grass")


def _nonfinite_message(what: str, bad: list[int]) -> str:
    return (
        f"non-finite {what} for training example index {bad[0]} (all: {bad}); check that example and "
        "the model's numerics (e.g. fp16 overflow)"
    )


class AttributionPass:
    """One attribution pass of ``computer`` over ``source`` into the cache at ``cache_dir``.

    Args:
        computer: the model's capture (targets, compressors, hooks).
        source: the examples, with stable indices.
        cache_dir: the cache directory (created, or resumed when it holds this run's cache).
        batch_size: examples per forward/backward.
        pad_token_id, padding_side: how batches are padded (the tokenizer's).
        dist: this process's rank in the job (default: one process).
        model_info: the model's fingerprint for the manifest (default: computed from ``computer``).
        disable_progress: no progress bars.
    """

    def __init__(
        self,
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
    ):
        self.computer = computer
        self.config = computer.config
        self.source = source
        if source.max_length is None:  # never feed the model more positions than it has
            source.max_length = self.config.max_length or context_length(computer.model)
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.dist = dist or Distributed()
        self.model_info = model_info or model_fingerprint(computer.model, computer.targets)
        self.disable_progress = disable_progress
        self.specs = module_specs(computer)
        # under ZeRO-3 forwards gather parameters collectively: every rank must run as many
        self.lockstep = self.dist.world_size > 1 and is_zero3(computer.model)

    # ---- the pass -------------------------------------------------------------------------------

    def run(self, verify_existing: bool = False) -> Path:
        """Write (or resume) the cache. On resume, shards already listed but missing or truncated on
        disk (with ``verify_existing``, also any whose sha256 does not match) are recomputed."""
        n = len(self.source)
        header = {
            "model": self.model_info,
            "modules": module_entries(self.computer),
            "dim": self.computer.total_dim,
            "layout": self.computer.layout,
            "num_examples": n,
            "dataset": self.source.fingerprint(),
            "library_version": __version__,
            # how the tokenizer encodes; each shard adds the special ids its documents begin with
            "documents": document_encoding(self.source.tokenizer),
        }
        if self.computer.loss_fn is not None:  # absent for the built-in loss (and in older caches)
            header["loss"] = loss_name(self.computer.loss_fn)
        writer = CacheWriter(self.cache_dir, self.config, header, self.dist.rank, self.dist.world_size)
        try:
            writer.cleanup_orphans()
            basis = self.warmup(writer) if self.config.preconditioner in ("kfac", "ekfac") else None
            attach_basis(self.computer.compressors, basis)  # masks in the eigenbasis: their maps
            stats = self._statistics(writer, basis)
            mine = [
                s
                for s in range(num_shards(n, self.config.shard_size))
                if s % self.dist.world_size == self.dist.rank
            ]
            todo = [s for s in mine if s not in writer.completed]
            damaged = writer.damaged_shards(verify=verify_existing)
            if damaged:
                logger.warning("Gradient cache %s: recomputing damaged shards %s.", self.cache_dir, damaged)
            if len(todo) < len(mine):
                logger.info(
                    "Gradient cache %s: %d of %d shards done, resuming.",
                    self.cache_dir,
                    len(mine) - len(todo),
                    len(mine),
                )
            self._write_shards(writer, self._plan(damaged, todo), basis, stats)
            writer.finish(complete=True)
            self.dist.barrier()
            if self.dist.world_size > 1 and self.dist.rank == 0:
                writer.merge()
            self.dist.barrier()
        finally:
            writer.close()
        return self.cache_dir

    def _plan(self, damaged: list[int], todo: list[int]) -> list[Step]:
        """The batches of the shards to compute. Damaged shards (missing or corrupt files) come first;
        they are recomputed with the same request, so their rows come out bit-identical, but their
        examples are not counted in the statistics again."""
        size, n = self.config.shard_size, len(self.source)
        plan = []
        for shard in damaged + todo:
            indices = list(range(shard * size, min((shard + 1) * size, n)))
            batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
            for pos, idx in enumerate(batches):
                plan.append(Step(shard, idx, last=pos == len(batches) - 1, repair=shard in damaged))
        return plan

    def _write_shards(
        self,
        writer: CacheWriter,
        plan: list[Step],
        basis: dict[str, torch.Tensor] | None,
        stats: StatsAccumulator | None,
    ) -> None:
        config = self.config
        whitened = is_whitened(basis)
        if whitened:  # rows are built below from the factor gradients: S (whiten * R G')
            covariances = stats.covariances_needed if stats is not None else False
            request = CaptureRequest(rows=False, factor_grads=True, covariances=covariances)
        else:
            kwargs = dict(stats.request_kwargs) if stats else {}
            # the factor-space gradients give each row's exact gradient norm (stored for cosine)
            norms_only = self._factorised and not kwargs.get("factor_grads", False)
            kwargs["factor_grads"] = kwargs.get("factor_grads", False) or self._factorised
            request = CaptureRequest(rows=True, rows_from_factors=not norms_only, **kwargs)
        total = sum(len(step.indices) for step in plan)
        buffer, truncated_before = ShardBuffer(), self.source.truncated
        with self.computer.session(), self._progress(total, "hf-grass: caching gradients") as bar:
            for step in self._lockstep(plan):
                if step is None:
                    self._dummy_step()
                    self._agree(None)  # where the busy ranks check their rows
                    continue
                batch = self._compute(step.indices, request)
                buffer.skipped += batch.skipped
                bar.update(len(step.indices))
                if batch.grads is not None:
                    grads, rotated = batch.grads, None
                    if whitened:
                        assert basis is not None
                        rotated = {name: rotate(basis, name, g) for name, g in grads.factor_grads.items()}
                        grads.rows = self._whitened_rows(basis, rotated)  # checked in _stored_rows
                    if stats is not None and not step.repair:
                        stats.update(grads, rotated)
                    stored, scales = self._stored_rows(grads.rows, batch.indices)
                    buffer.norms.append(self._row_norms(grads, rotated, basis))
                    buffer.rows.append(stored)
                    if scales is not None:
                        buffer.scales.append(scales)
                    buffer.indices += batch.indices
                    buffer.docs += [
                        {"index": i, "text": ex.get("text"), "id": ex.get("id")}
                        for i, ex in zip(batch.indices, batch.examples)
                    ]
                    buffer.leads += [self.source.leading_special(ex) for ex in batch.examples]
                elif self.lockstep:  # nothing to compute here, but the other ranks run a forward
                    self._dummy_step()
                    self._agree(None)
                if not step.last:
                    continue
                empty = torch.empty(0, self.computer.total_dim, dtype=config.torch_dtype)
                writer.commit_shard(
                    step.shard,
                    buffer.indices,
                    torch.cat(buffer.rows) if buffer.rows else empty,
                    buffer.docs,
                    buffer.skipped,
                    stats.state_dict() if stats is not None and not step.repair else None,
                    truncated=self.source.truncated - truncated_before,
                    scales=self._shard_scales(buffer),
                    norms=torch.cat(buffer.norms) if buffer.norms else torch.empty(0, 2),
                    prefix=common_prefix(buffer.leads),
                )
                buffer, truncated_before = ShardBuffer(), self.source.truncated

    @property
    def _factorised(self) -> bool:
        return all(c.factorised for c in self.computer.compressors.values())

    def _row_norms(
        self,
        grads: BatchGradients,
        rotated: dict[str, torch.Tensor] | None,
        basis: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``[B, 2]`` float32: each row's gradient norm and preconditioned norm, exact in the factor
        space (before any random projection), for unit-normalised scores.

        The gradient norm is ``||G'||`` over all modules; the preconditioned norm is ``||K^-1/2 G'||``
        with ``K`` the build-time K-FAC whitening (so exact for kfac at the build damping), and
        equals the gradient norm for caches without whitening. Compressors without a factor space
        give the norm of their compressed row (an estimate)."""
        assert grads.rows is not None
        if not grads.factor_grads:
            norm = grads.rows.double().norm(dim=1)
            return torch.stack([norm, norm], dim=1).float().cpu()
        batch = grads.rows.shape[0]
        raw = torch.zeros(batch, dtype=torch.float64, device=grads.rows.device)
        pre = torch.zeros_like(raw)
        for name, gp in grads.factor_grads.items():
            raw += gp.double().square().flatten(1).sum(1)
            if rotated is not None and basis is not None:
                pre += (rotated[name] * basis[f"{name}::whiten"].to(gp.device)).square().flatten(1).sum(1)
        if rotated is None or basis is None:
            pre = raw
        else:  # whiten = (L / c)^-1/2 with one constant c: undo it to get K^-1/2 = L^-1/2
            pre = pre / float(basis.get("whiten::mean", torch.ones(())).item())
        return torch.stack([raw.sqrt(), pre.sqrt()], dim=1).float().cpu()

    def _shard_scales(self, buffer: ShardBuffer) -> torch.Tensor | None:
        if self.config.torch_dtype != torch.int8:
            return None
        return torch.cat(buffer.scales) if buffer.scales else torch.empty(0, dtype=torch.float32)

    def _stored_rows(self, rows: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows in the storage dtype on the CPU (with their scales for int8); refuses a non-finite
        row and one that does not fit that dtype (under lockstep every rank checks here, and all
        raise together)."""
        stored, scales = encode_rows(rows.cpu(), self.config.torch_dtype)
        bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
        overflow = (~torch.isfinite(stored).all(dim=1)).nonzero().flatten().tolist()
        problem = None
        if bad:
            problem = _nonfinite_message("gradient", [indices[b] for b in bad])
        elif overflow:  # finite in fp32 but not in the storage dtype (fp16 tops out at 65504)
            problem = (
                f"the compressed gradient of training example index {indices[overflow[0]]} overflows "
                f"{self.config.dtype}; use GraSSConfig(dtype='bfloat16') or 'float32' for this model."
            )
        self._agree(problem)
        return stored, scales

    def _agree(self, problem: str | None) -> None:
        """Raise ``problem``; under lockstep first learn every rank's, so that all raise the same
        error at the same step (a rank that raised alone would leave the others blocked in the next
        collective forward). One all-reduce of one number per call when nothing failed."""
        if self.lockstep:
            problem = self.dist.agree_on_error(problem)
            if problem is not None:
                problem += ". Every process of the ZeRO-3 job stops at this step."
        if problem is not None:
            raise ValueError(problem)

    def _whitened_rows(
        self, basis: dict[str, torch.Tensor], rotated: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Train rows of a K-FAC cache: per module ``S (whiten * Q_out^T G' Q_in)`` -> ``[B, dim]`` fp32."""
        computer = self.computer
        batch = next(iter(rotated.values())).shape[0]
        rows = torch.zeros(batch, computer.total_dim, dtype=torch.float32, device=computer.device)
        for name, (start, stop) in computer.offsets.items():
            if name not in rotated:  # never reached by the forward: zero gradient
                continue
            scaled = whiten_train(basis, name, rotated[name])
            rows[:, start:stop] += computer.compressors[name].project_factor(scaled)  # type: ignore[attr-defined]
        return rows

    # ---- warm-up and statistics -----------------------------------------------------------------

    def warmup(self, writer: CacheWriter) -> dict[str, torch.Tensor]:
        """The K-FAC eigenbasis (and row whitening) from the covariances of the first
        ``ekfac_sample_size`` examples; reused from the cache folder on resume."""
        entry, path = writer.eigenbasis_entry(), writer.eigenbasis_path
        if entry is not None and path.exists():
            if sha256_file(path) != entry["sha256"]:
                raise CacheError(
                    f"{path} does not match its checksum; delete the cache directory and rebuild"
                )
            return {k: v.clone() for k, v in mmap_tensors(path).items()}
        # rank 0 alone runs the warm-up sample, in the same batches as a single process would: the
        # basis (which rotates the stored rows) is then bit-identical for any number of processes,
        # where summing per-rank parts in another order could turn eigenvectors of (near-)degenerate
        # eigenvalues arbitrarily. The sample is small; other ranks wait (or, under ZeRO-3, step along).
        n = self._warmup_size() if self.dist.rank == 0 else 0
        sample = list(range(n))
        rotated = self.config.mask_basis == "eigen"
        sums: StatsAccumulator | FullCovariances
        if rotated:  # covariances of the full factor spaces, whose eigen-directions the masks keep
            sums = FullCovariances(self.computer.compressors, FULL_COVARIANCE_MAX_WIDTH)
            request = CaptureRequest(rows=False, full_covariances=True)
        else:  # covariances of the masked factors
            sums = StatsAccumulator(self.specs, "kfac")
            request = CaptureRequest(rows=False, covariances=True)
        batches = [sample[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        with self.computer.session(), self._progress(n, "hf-grass: fitting K-FAC eigenbasis") as bar:
            for idx in self._lockstep(batches):
                grads = self._compute(idx, request).grads if idx is not None else None
                if idx is not None:
                    bar.update(len(idx))
                if grads is None:
                    if self.lockstep:
                        self._dummy_step(request)
                    continue
                sums.update(grads)
        # every rank reduces the same keys (modules without gradient in the sample hold zeros)
        damping = self.config.whitening_damping
        if isinstance(sums, FullCovariances):
            sums.sums = self.dist.all_reduce_sum(sums.sums)
            full_in, full_out, tokens, examples = sums.parts()
            basis = fit_rotated_masks(self.computer.compressors, full_in, full_out, tokens, examples, damping)
        else:
            sums.load_state_dict(self.dist.all_reduce_sum(sums.state_dict()))
            cov_in, cov_out, tokens, examples = sums.covariances()
            basis = fit_eigenbasis(self.specs, cov_in, cov_out, tokens=tokens, examples=examples, damping=damping)
        if self.dist.rank == 0:
            save_tensors(path, basis)
        self.dist.barrier()
        writer.record_eigenbasis(sha256_file(path))
        # every rank uses rank 0's file, so the basis is bit-identical across processes
        return {k: v.clone() for k, v in mmap_tensors(path).items()}

    def _warmup_size(self) -> int:
        """The first examples, up to ``ekfac_sample_size`` of them and ``warmup_tokens`` tokens
        (the batch that crosses the token budget is the last)."""
        limit = min(len(self.source), self.config.ekfac_sample_size)
        tokens = 0
        for i in range(limit):
            ids = self.source.example(i).get("input_ids")
            tokens += len(ids) if ids is not None and hasattr(ids, "__len__") else 1
            if tokens >= self.config.warmup_tokens:
                return min(limit, -(-(i + 1) // self.batch_size) * self.batch_size)
        return limit

    def _statistics(
        self, writer: CacheWriter, basis: dict[str, torch.Tensor] | None
    ) -> StatsAccumulator | None:
        """The preconditioner's running sums, resumed from this rank's last checkpoint."""
        if self.config.preconditioner == "identity":
            return None
        stats = StatsAccumulator(self.specs, self.config.preconditioner, basis, device=self.computer.device)
        if writer.stats_file is not None:
            if not writer.stats_file.exists():
                raise CacheError(
                    f"{writer.stats_file} is missing; delete {self.cache_dir} and rebuild the cache"
                )
            stats.load_state_dict(mmap_tensors(writer.stats_file))
        return stats

    # ---- batches ----------------------------------------------------------------------------------

    def _compute(self, indices: list[int], request: CaptureRequest) -> Batch:
        """Forward + backward of the examples ``indices`` that have supervised tokens."""
        examples = [self.source.example(i) for i in indices]
        batch = collate(examples, self.pad_token_id, self.padding_side)
        if "labels" in batch:
            counts = supervised_tokens(batch["labels"], batch.get("attention_mask"))
        else:  # a user's loss without labels: every example counts
            counts = torch.ones(len(indices), dtype=torch.long)
        keep = [k for k in range(len(indices)) if counts[k] > 0]
        skipped = [indices[k] for k in range(len(indices)) if counts[k] == 0]
        if skipped:
            logger.warning(
                "Skipping examples %s: they have no supervised tokens (all labels are -100).", skipped
            )
        if not keep:
            return Batch([], [], skipped, None)
        if len(keep) < len(indices):
            examples = [examples[k] for k in keep]
            batch = collate(examples, self.pad_token_id, self.padding_side)
        agree = None
        if self.lockstep:  # after the forward, before the collective backward: every rank agrees

            def agree(what: str, rows: list[int]) -> None:
                self._agree(_nonfinite_message(what, [indices[keep[r]] for r in rows]) if rows else None)

        try:
            grads = self.computer.compute(batch, request, agree=agree)
        except NonFiniteError as err:
            raise ValueError(_nonfinite_message(err.what, [indices[keep[r]] for r in err.rows])) from None
        return Batch([indices[k] for k in keep], examples, skipped, grads)

    def _dummy_step(self, request: CaptureRequest | None = None) -> None:
        """A batch with one supervised token, run and discarded to keep ZeRO-3 ranks in step."""
        example = self.source.example(0)
        if is_lm_example(example):
            ids = (list(example["input_ids"]) + [self.pad_token_id or 0] * 2)[:2]
            example = {"input_ids": ids, "labels": ids}
        self.computer.compute(
            collate([example], self.pad_token_id, self.padding_side),
            request or CaptureRequest(),
            agree=lambda what, rows: self._agree(None),  # its own loss does not matter, the others' do
        )

    def _lockstep(self, items: list) -> Iterator:
        """The items, then ``None`` until every rank has had as many steps as the busiest one.

        The step count is agreed on before the first item, so this collective never interleaves
        with the collectives of the steps themselves.
        """
        steps = self.dist.max_int(len(items)) if self.lockstep else len(items)
        yield from items
        for _ in range(steps - len(items)):
            yield None

    def _progress(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="ex", disable=self.disable_progress or total == 0)
