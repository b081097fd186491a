"""`AttributionPass`: examples -> per-example compressed gradients -> a gradient cache on disk.

The pass, in order:

1. **warm-up** (preconditioners that whiten rows: kfac/ekfac): rank 0 alone accumulates the factor
   covariances of the first examples (``ekfac_sample_size``, ``warmup_tokens``), fits the K-FAC
   eigenbasis that whitens the stored rows and writes it; every rank then reads that one file;
2. **statistics**: the running float64 sums the preconditioner is fitted from, checkpointed with
   every shard (resumed from the last checkpoint);
3. **sharding**: shard ``s`` covers examples ``[s * shard_size, (s + 1) * shard_size)``; in a
   multi-process run rank ``r`` computes the shards with ``s % world_size == r``, so every rank
   writes whole shards of its own and no sampler padding can duplicate an example. Batches never
   cross a shard boundary, which makes a resumed run bit-identical to an uninterrupted one;
4. **writing**: the rows of each batch (``BatchRunner.encoded``, shared with the scoring pass) are
   buffered per shard, and each finished shard is committed through ``CacheWriter`` (crash-safe);
   rank 0 merges the per-rank manifests at the end.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from hf_grass._version import __version__
from hf_grass.attribution.batches import Batching, BatchRunner
from hf_grass.attribution.plan import ShardBuffer, Step, module_entries, module_specs
from hf_grass.cache.files import CacheError, mmap_tensors, save_tensors, sha256_file
from hf_grass.cache.manifest import common_prefix
from hf_grass.cache.writer import CacheWriter, ShardContent, num_shards
from hf_grass.capture.engine import GradientComputer
from hf_grass.capture.experts import warmup_pools
from hf_grass.capture.fingerprint import model_fingerprint
from hf_grass.capture.hooks import CaptureRequest
from hf_grass.capture.loss import loss_name
from hf_grass.data import ExampleSource, document_encoding
from hf_grass.distributed import Distributed
from hf_grass.precondition import preconditioner_class
from hf_grass.precondition.eigenbasis import Eigenbasis
from hf_grass.precondition.statistics import StatsAccumulator
from hf_grass.precondition.warmup import WarmupCovariances, fit_eigen_masks, fit_masked_basis, module_widths

logger = logging.getLogger("transformers.hf_grass")


class AttributionPass(BatchRunner):
    """One attribution pass of ``computer`` over ``source`` into the cache at ``cache_dir``.

    Args:
        computer: the model's capture (targets, compressors, hooks).
        source: the examples, with stable indices.
        cache_dir: the cache directory (created, or resumed when it holds this run's cache).
        batching: batch size and padding (default ``Batching()``).
        dist: this process's rank in the job (default: one process).
        model_info: the model's fingerprint for the manifest (default: computed from ``computer``).
    """

    def __init__(
        self,
        computer: GradientComputer,
        source: ExampleSource,
        cache_dir: str | os.PathLike,
        batching: Batching | None = None,
        dist: Distributed | None = None,
        model_info: dict[str, Any] | None = None,
    ):
        super().__init__(computer, source, batching, dist)
        self.cache_dir = Path(cache_dir)
        self.model_info = dict(model_info or model_fingerprint(computer.model, computer.targets))
        # never silent about what the scores cannot see: logged, and recorded in the manifest
        cover = computer.coverage()
        self.model_info["coverage"] = cover.as_dict()
        if self.dist.rank == 0:
            logger.log(cover.level, "Gradient cache %s: %s", self.cache_dir, cover.line())
        self.specs = module_specs(computer)
        self.preconditioner = preconditioner_class(self.config.preconditioner)

    # ---- the pass -------------------------------------------------------------------------------

    def run(self, verify_existing: bool = False) -> Path:
        """Write (or resume) the cache. On resume, shards already listed but missing or truncated on
        disk (with ``verify_existing``, also any whose sha256 does not match) are recomputed."""
        n = len(self.source)
        header = {
            "model": self.model_info,
            "modules": module_entries(self.computer),
            "dim": self.computer.row_dim,
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
            basis = self.warmup(writer) if self.preconditioner.whitens_rows else None
            if basis is not None:
                basis.attach(self.computer.compressors)  # masks in the eigenbasis: their maps
            # each rank resumes from its own files: a failure there must stop the others too
            with self.together():
                stats, plan = self._resume(writer, basis, verify_existing)
            self._write_agreed(writer, plan, basis, stats)
            with self.together():  # agreeing is a barrier too: rank 0 merges once every part is complete
                writer.finish(complete=True)
            with self.together():
                if self.dist.world_size > 1 and self.dist.rank == 0:
                    writer.merge()
        finally:
            writer.close()
        return self.cache_dir

    def _resume(
        self, writer: CacheWriter, basis: Eigenbasis | None, verify_existing: bool
    ) -> tuple[StatsAccumulator | None, list[Step]]:
        """This rank's statistics and plan: its shards not yet written, damaged ones first."""
        stats = self._statistics(writer, basis)
        mine = self.my_shards(num_shards(len(self.source), self.config.shard_size))
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
        # damaged shards (missing or corrupt files) first: recomputed with the same request, their rows
        # come out bit-identical, but their examples are not counted in the statistics again
        return stats, self.plan(damaged + todo, repair=damaged)

    def _write_agreed(
        self,
        writer: CacheWriter,
        plan: list[Step],
        basis: Eigenbasis | None,
        stats: StatsAccumulator | None,
    ) -> None:
        """``_write_shards``; in a multi-process run without lockstep the ranks agree after every
        shard, each as many times as the busiest rank: an error on one rank ends the others at
        their next shard boundary, not at the final barrier."""
        agreeing, mine = self.agreeing, sum(step.last for step in plan)
        boundaries = self.dist.max_int(mine) if agreeing else 0
        with self.together(agreeing):
            self._write_shards(writer, plan, basis, stats)
            for _ in range(boundaries - mine):  # a rank with fewer shards
                self.raise_together(None)

    def _write_shards(
        self,
        writer: CacheWriter,
        plan: list[Step],
        basis: Eigenbasis | None,
        stats: StatsAccumulator | None,
    ) -> None:
        buffer, truncated_before = ShardBuffer(), self.source.truncated
        for step, rows, skipped in self.encoded(plan, basis, stats):
            buffer.skipped += skipped
            if rows is not None:
                batch = rows.batch
                buffer.norms.append(rows.norms)
                buffer.rows.append(rows.stored)
                if rows.scales is not None:
                    buffer.scales.append(rows.scales)
                buffer.indices += batch.indices
                buffer.docs += [
                    {"index": i, "text": ex.get("text"), "id": ex.get("id")}
                    for i, ex in zip(batch.indices, batch.examples)
                ]
                buffer.leads += [self.source.leading_special(ex) for ex in batch.examples]
            if not step.last:
                continue
            empty = torch.empty(0, self.computer.row_dim, dtype=self.config.torch_dtype)
            content = ShardContent(
                buffer.indices,
                torch.cat(buffer.rows) if buffer.rows else empty,
                buffer.docs,
                buffer.skipped,
                scales=self._shard_scales(buffer),
                norms=torch.cat(buffer.norms) if buffer.norms else torch.empty(0, 2),
                truncated=self.source.truncated - truncated_before,
                prefix=common_prefix(buffer.leads),
            )
            writer.commit_shard(step.shard, content, stats.state_dict() if stats is not None and not step.repair else None)
            buffer, truncated_before = ShardBuffer(), self.source.truncated
            if self.agreeing:  # did another rank fail?
                self.raise_together(None)

    def _shard_scales(self, buffer: ShardBuffer) -> torch.Tensor | None:
        if self.config.torch_dtype != torch.int8:
            return None
        return torch.cat(buffer.scales) if buffer.scales else torch.empty(0, dtype=torch.float32)

    # ---- warm-up and statistics -----------------------------------------------------------------

    def warmup(self, writer: CacheWriter) -> Eigenbasis:
        """The K-FAC eigenbasis (and row whitening) from the covariances of the first
        ``ekfac_sample_size`` examples; reused from the cache folder on resume."""
        entry, path = writer.eigenbasis_entry(), writer.eigenbasis_path
        found = entry is not None and path.exists()
        # every rank takes the same branch, decided together: a rank that skipped the warm-up
        # while another ran it would leave that one waiting in the warm-up's collectives (e.g. a
        # resume after a crash between two ranks recording the basis)
        damaged = found and sha256_file(path) != entry["sha256"]  # type: ignore[index]
        try:
            self.raise_together(
                f"{path} does not match its checksum; delete the cache directory and rebuild" if damaged else None
            )
        except ValueError as err:
            raise CacheError(str(err)) from None
        if self.dist.max_int(0 if found else 1) == 0:
            return Eigenbasis.from_tensors({k: v.clone() for k, v in mmap_tensors(path).items()})
        # rank 0 alone runs the warm-up sample and fits the basis, in the same batches as a single
        # process would: the basis (which rotates the stored rows) is then bit-identical for any
        # number of processes, and no rank holds (or all-reduces) covariances but rank 0. The sample
        # is small; other ranks wait at the barrier (or, under ZeRO-3, step along).
        n = self._warmup_size() if self.dist.rank == 0 else 0
        sample = list(range(n))
        sums: WarmupCovariances | StatsAccumulator
        if self.config.eigen_masks:  # covariances of the full factor spaces
            widths, targets = module_widths(self.computer.compressors), self.computer.targets
            sums = WarmupCovariances(widths, self.computer.device, pools=warmup_pools(targets))
            fallback = sums.fallback_line()
            if fallback is not None and self.dist.rank == 0:
                logger.warning("Gradient cache %s: %s.", self.cache_dir, fallback)
            request = CaptureRequest(rows=False, full_covariances=sums)
        else:  # covariances of the masked factors
            sums = StatsAccumulator(self.specs, frozenset({"covariances"}), device=self.computer.device)
            request = CaptureRequest(rows=False, covariances=True)
        batches = [sample[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        # rank 0 alone computes (unless in lockstep): its error must reach the ranks waiting to reduce
        warming = self.progress(n, "hf-grass: fitting K-FAC eigenbasis")
        with self.together(self.agreeing), self.computer.session(), warming as bar:
            for idx in self.lockstep_steps(batches):
                batch = self.compute(idx, request) if idx is not None else None
                if idx is not None:
                    bar.update(len(idx))
                if batch is None or batch.grads is None:
                    if self.lockstep:  # no forward here, but the other ranks run one: step along
                        self.dummy_step(CaptureRequest(rows=False))
                    continue
                if isinstance(sums, WarmupCovariances):
                    sums.new_batch(len(batch.indices))  # the hooks added the batch's covariances
                else:
                    sums.update(batch.grads)
        # rank 0 fits and writes the basis; an error there must reach the ranks waiting for its file
        # (no collective forward runs here, so this agreement is safe under lockstep too)
        with self.together(self.dist.active):
            if self.dist.rank == 0:
                damping = self.config.whitening_damping
                if isinstance(sums, WarmupCovariances):
                    basis = fit_eigen_masks(self.computer.compressors, sums, damping, top=self.config.mask_basis == "top")  # type: ignore[arg-type]
                    sums.free()  # the capture's last request references them: free them before the main pass
                else:
                    basis = fit_masked_basis(self.specs, sums.sums, damping)
                del sums  # the covariances are not needed past the fit
                save_tensors(path, basis.to_tensors())
                del basis  # the file is read back below: one copy of the basis in host memory, not two
        writer.record_eigenbasis(sha256_file(path))
        # every rank uses rank 0's file, so the basis is bit-identical across processes
        return Eigenbasis.from_tensors({k: v.clone() for k, v in mmap_tensors(path).items()})

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

    def _statistics(self, writer: CacheWriter, basis: Eigenbasis | None) -> StatsAccumulator | None:
        """The preconditioner's running sums, resumed from this rank's last checkpoint."""
        needs = self.preconditioner.statistics(self.config.eigen_masks)
        if not needs:
            return None
        stats = StatsAccumulator(self.specs, needs, basis, device=self.computer.device)
        if writer.stats_file is not None:
            if not writer.stats_file.exists():
                raise CacheError(
                    f"{writer.stats_file} is missing; delete {self.cache_dir} and rebuild the cache"
                )
            stats.load_state_dict(mmap_tensors(writer.stats_file))
        return stats
