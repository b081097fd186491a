"""`BatchRunner`: the examples of a pass, batch by batch, turned into rows exactly as a cache stores
them. The attribution pass (``runner.py``) writes these rows to shards; the scoring pass
(``hf_grass.scoring.during_pass``) scores them against queries and keeps only the lists. Both go
through the same code, so a row scored during a pass is bit-identical to the row a cache holds.

A batch: forward + backward of the examples with supervised tokens, under the capture hooks; the
rows whitened in the warm-up's eigenbasis (K-FAC caches), checked (finite, fits the storage dtype),
encoded in the storage dtype, with their exact norms. Under ZeRO-3 every rank runs as many forwards
as the busiest one (``lockstep``) and all ranks agree on an error before raising it. In other
multi-process runs the ranks agree where their collectives are (``together``, ``raise_together``):
an error on one rank then ends every rank instead of leaving the others at a barrier.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_grass.attribution.plan import Batch, Step
from hf_grass.cache.writer import encode_rows
from hf_grass.capture.engine import BatchGradients, GradientComputer, NonFiniteError, context_length, is_zero3
from hf_grass.capture.hooks import CaptureRequest
from hf_grass.capture.loss import supervised_tokens
from hf_grass.data import ExampleSource, collate, is_lm_example, pad_token_id, padding_side
from hf_grass.distributed import Distributed
from hf_grass.precondition.eigenbasis import Eigenbasis
from hf_grass.precondition.statistics import StatsAccumulator

logger = logging.getLogger("transformers.hf_grass")


class AgreedError(ValueError):
    """An error every rank of a multi-process pass raises together (its message names the ranks
    that failed and what each reported)."""


def describe(err: BaseException) -> str:
    """What a rank reports of its error (the type is implied for a ValueError: bad input)."""
    return str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"


def nonfinite_message(what: str, bad: list[int]) -> str:
    return (
        f"non-finite {what} for training example index {bad[0]} (all: {bad}); check that example and "
        "the model's numerics (e.g. fp16 overflow)"
    )


@dataclass
class EncodedRows:
    """One batch's rows as the cache stores them."""

    batch: Batch  # the examples kept (with supervised tokens) and those skipped
    stored: torch.Tensor  # [B, dim] in the storage dtype, on the CPU
    scales: torch.Tensor | None  # [B] float32 for int8 rows (row = stored * scale)
    norms: torch.Tensor  # [B, 2] float32 exact norms (gradient, preconditioned)


@dataclass(frozen=True)
class Batching:
    """How examples become batches: examples per forward/backward, how they are padded (the
    tokenizer's pad token and side), and whether progress bars show."""

    batch_size: int = 8
    pad_token_id: int | None = 0
    padding_side: str = "right"
    disable_progress: bool = False

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, batch_size: int = 8, disable_progress: bool = False) -> Batching:
        return cls(batch_size, pad_token_id(tokenizer), padding_side(tokenizer), disable_progress)


class BatchRunner:
    """Batches of ``source`` through ``computer``, as rows in the cache's storage format.

    Args:
        computer: the model's capture (targets, compressors, hooks).
        source: the examples, with stable indices.
        batching: batch size and padding (default ``Batching()``).
        dist: this process's rank in the job (default: one process).
    """

    def __init__(
        self,
        computer: GradientComputer,
        source: ExampleSource,
        batching: Batching | None = None,
        dist: Distributed | None = None,
    ):
        self.computer = computer
        self.config = computer.config
        self.source = source
        if source.max_length is None:  # never feed the model more positions than it has
            source.max_length = self.config.max_length or context_length(computer.model)
        batching = batching or Batching()
        self.batching = batching
        self.batch_size = batching.batch_size
        self.pad_token_id = batching.pad_token_id
        self.padding_side = batching.padding_side
        self.disable_progress = batching.disable_progress
        self.dist = dist or Distributed()
        # under ZeRO-3 forwards gather parameters collectively: every rank must run as many
        self.lockstep = self.dist.world_size > 1 and is_zero3(computer.model)

    # ---- the plan ---------------------------------------------------------------------------------

    def plan(self, shards: Sequence[int], repair: Sequence[int] = ()) -> list[Step]:
        """The batches of ``shards`` (shard ``s`` covers examples ``[s * shard_size, (s + 1) *
        shard_size)``). Batches never cross a shard boundary, so the rows of a shard are the same
        whichever shards are computed with it (a resumed or repaired cache is bit-identical)."""
        size, n = self.config.shard_size, len(self.source)
        plan = []
        for shard in shards:
            indices = list(range(shard * size, min((shard + 1) * size, n)))
            batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
            for pos, idx in enumerate(batches):
                plan.append(Step(shard, idx, last=pos == len(batches) - 1, repair=shard in repair))
        return plan

    def my_shards(self, num_shards: int) -> list[int]:
        """This rank's shards: ``s % world_size == rank`` (every rank computes whole shards)."""
        return [s for s in range(num_shards) if s % self.dist.world_size == self.dist.rank]

    # ---- rows -------------------------------------------------------------------------------------

    def row_request(self, basis: Eigenbasis | None, stats: StatsAccumulator | None) -> CaptureRequest:
        """What the hooks capture for the rows (and the statistics, when given)."""
        if basis is not None:  # whitened rows are built from the factor gradients: S (whiten * R G')
            return CaptureRequest(
                rows=False,
                factor_grads=True,
                covariances=stats is not None and stats.needs_covariances,
                # a hashed side's exact norms (and EK-FAC moments) are per coordinate of the side
                curvature_grads=basis.has_hashed_sides,
            )
        factor_grads = stats is not None and stats.needs_factor_grads
        # the factor-space gradients give each row's exact gradient norm (stored for cosine)
        norms_only = self.factorised and not factor_grads
        return CaptureRequest(
            rows=True,
            rows_from_factors=not norms_only,
            factor_grads=factor_grads or self.factorised,
            covariances=stats is not None and stats.needs_covariances,
        )

    def encoded(
        self,
        plan: list[Step],
        basis: Eigenbasis | None,
        stats: StatsAccumulator | None = None,
        desc: str = "hf-grass: caching gradients",
    ) -> Iterator[tuple[Step, EncodedRows | None, list[int]]]:
        """``(step, rows, skipped)`` for every step of ``plan`` (``rows`` is None when no example of
        the step has supervised tokens). ``stats`` (if given) is updated with every batch that is
        not a repair. Under lockstep, the dummy steps that keep ranks in step run here."""
        request = self.row_request(basis, stats)
        total = sum(len(step.indices) for step in plan)
        with self.computer.session(), self.progress(total, desc) as bar:
            for step in self.lockstep_steps(plan):
                if step is None:
                    self.dummy_step()
                    self.agree(None)  # where the busy ranks check their rows
                    continue
                batch = self.compute(step.indices, request)
                bar.update(len(step.indices))
                if batch.grads is None:
                    if self.lockstep:  # nothing to compute here, but the other ranks run a forward
                        self.dummy_step()
                        self.agree(None)
                    yield step, None, batch.skipped
                    continue
                grads, rotated = batch.grads, None
                if basis is not None:
                    rotated = {name: basis.rotate(name, g) for name, g in grads.factor_grads.items()}
                    grads.rows = self.whitened_rows(basis, rotated)  # checked in stored_rows
                if stats is not None and not step.repair:
                    stats.update(grads, rotated)
                stored, scales = self.stored_rows(grads.rows, batch.indices)
                norms = self.row_norms(grads, rotated, basis)
                yield step, EncodedRows(batch, stored, scales, norms), batch.skipped

    @property
    def factorised(self) -> bool:
        return all(c.factorised for c in self.computer.compressors.values())

    def row_norms(
        self, grads: BatchGradients, rotated: dict[str, torch.Tensor] | None, basis: Eigenbasis | None
    ) -> torch.Tensor:
        """``[B, 2]`` float32: each row's gradient norm and preconditioned norm, taken in the factor
        space (before any random projection), for unit-normalised scores.

        The gradient norm is ``||G'||`` over all modules (a hashed side in its own coordinates), an
        unbiased estimate over the masks of ``||g||^2``; the preconditioned norm is ``||K^-1/2 G'||``
        with ``K`` the build-time K-FAC whitening (``Eigenbasis.whitened_norm_sq``), and equals the
        gradient norm for caches without whitening. Compressors without a factor space give the norm
        of their compressed row."""
        assert grads.rows is not None
        if not grads.factor_grads:
            norm = grads.rows.double().norm(dim=1)
            return torch.stack([norm, norm], dim=1).float().cpu()
        raw = gradient_norm_sq(grads)
        if rotated is None or basis is None:
            pre = raw
        else:
            pre = torch.zeros_like(raw)
            for name, turned in rotated.items():
                pre += basis.whitened_norm_sq(name, turned)
        return torch.stack([raw.sqrt(), pre.sqrt()], dim=1).float().cpu()

    def stored_rows(self, rows: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows in the storage dtype on the CPU (with their scales for int8); refuses a non-finite
        row and one that does not fit that dtype (under lockstep every rank checks here, and all
        raise together)."""
        # encoded where the rows are (a GPU's elementwise work is free; host ops on tiny tensors are not)
        stored, scales = encode_rows(rows, self.config.torch_dtype)
        stored, scales = stored.cpu(), scales.cpu() if scales is not None else None
        bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
        overflow = (~torch.isfinite(stored).all(dim=1)).nonzero().flatten().tolist()
        problem = None
        if bad:
            problem = nonfinite_message("gradient", [indices[b] for b in bad])
        elif overflow:  # finite in fp32 but not in the storage dtype (fp16 tops out at 65504)
            problem = (
                f"the compressed gradient of training example index {indices[overflow[0]]} overflows "
                f"{self.config.dtype}; use GraSSConfig(dtype='bfloat16') or 'float32' for this model."
            )
        self.agree(problem)
        return stored, scales

    def agree(self, problem: str | None) -> None:
        """Raise ``problem``; under lockstep first learn every rank's, so that all raise the same
        error at the same step (a rank that raised alone would leave the others blocked in the next
        collective forward). One all-reduce of one number per call when nothing failed."""
        if self.lockstep:
            problem = self.dist.agree_on_error(problem)
            if problem is not None:
                problem += ". Every process of the ZeRO-3 job stops at this step."
        if problem is not None:
            raise ValueError(problem)

    @property
    def agreeing(self) -> bool:
        """Rank-local errors are agreed at shard boundaries: a multi-process run whose forwards are
        not collective (under lockstep every batch agrees already, and an agreement between two
        collective forwards would interleave with them)."""
        return self.dist.active and not self.lockstep

    def raise_together(self, problem: str | None) -> None:
        """Every rank calls this at the same point: if any rank has a ``problem``, all raise
        ``AgreedError`` with every rank's (alone, ``ValueError(problem)``). One all-reduce of one
        number when no rank failed, which is also a barrier."""
        if self.dist.active:
            problem = self.dist.agree_on_error(problem)
            if problem is not None:
                raise AgreedError(problem + ". Every process of the job stops here.")
        if problem is not None:
            raise ValueError(problem)

    @contextlib.contextmanager
    def together(self, active: bool = True) -> Iterator[None]:
        """The block on every rank, then ``raise_together``: an error on one rank is raised on all.
        Collectives inside the block must be ``raise_together`` calls made as often on every rank
        (never under lockstep between collective forwards). A no-op when not ``active``."""
        if not (active and self.dist.active):
            yield
            return
        try:
            yield
        except AgreedError:
            raise
        except Exception as err:
            self.raise_together(describe(err))
            raise  # not reached: a problem is always raised
        self.raise_together(None)

    def whitened_rows(self, basis: Eigenbasis, rotated: dict[str, torch.Tensor]) -> torch.Tensor:
        """Train rows of a K-FAC cache: per module ``S (whiten * R G')`` -> ``[B, dim]`` fp32."""
        return self.computer.project_rows({name: basis.whiten_train(name, g) for name, g in rotated.items()})

    # ---- batches ----------------------------------------------------------------------------------

    def compute(self, indices: list[int], request: CaptureRequest) -> Batch:
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
                self.agree(nonfinite_message(what, [indices[keep[r]] for r in rows]) if rows else None)

        try:
            grads = self.computer.compute(batch, request, agree=agree)
        except NonFiniteError as err:
            raise ValueError(nonfinite_message(err.what, [indices[keep[r]] for r in err.rows])) from None
        return Batch([indices[k] for k in keep], examples, skipped, grads)

    def dummy_step(self, request: CaptureRequest | None = None) -> None:
        """A batch with one supervised token, run and discarded to keep ZeRO-3 ranks in step."""
        example: dict[str, Any] = self.source.example(0)
        if is_lm_example(example):
            ids = (list(example["input_ids"]) + [self.pad_token_id or 0] * 2)[:2]
            example = {"input_ids": ids, "labels": ids}
        self.computer.compute(
            collate([example], self.pad_token_id, self.padding_side),
            request or CaptureRequest(),
            agree=lambda what, rows: self.agree(None),  # its own loss does not matter, the others' do
        )

    def lockstep_steps(self, items: list) -> Iterator:
        """The items, then ``None`` until every rank has had as many steps as the busiest one.

        The step count is agreed on before the first item, so this collective never interleaves
        with the collectives of the steps themselves.
        """
        steps = self.dist.max_int(len(items)) if self.lockstep else len(items)
        yield from items
        for _ in range(steps - len(items)):
            yield None

    def progress(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="ex", disable=self.disable_progress or total == 0)


def gradient_norm_sq(grads: BatchGradients) -> torch.Tensor:
    """``[B]`` float64: ``||G'||^2`` summed over the modules, each hashed side in its own coordinates
    (``curvature_grads``): an unbiased estimate over the masks of the squared gradient norm."""
    first = next(iter(grads.factor_grads.values()))
    out = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
    for name, gp in grads.factor_grads.items():
        # squares summed in the gradient's own precision (float32 loses nothing that matters to a
        # norm; a float64 copy of a wide side's [B, d, m] gradients cost a third of the norms' time)
        out += grads.curvature_grads.get(name, gp).square().flatten(1).sum(1).double()
    return out
