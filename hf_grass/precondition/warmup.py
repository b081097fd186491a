"""The warm-up of a kfac/ekfac cache: covariance sums over a small sample, and the fits that turn
them into an ``Eigenbasis``.

- ``WarmupCovariances``: the sums of ``x x^T`` (bias column included) and ``delta delta^T`` over the
  sample's real tokens in each module's *full* input and output spaces (``mask_basis="eigen"``). The
  capture hooks add each batch into them as the backward runs, so no batch's matrices are held, and
  modules that read the same input (q/k/v, gate/up) share ONE input sum: the first of them to see a
  batch computes its covariance, the others point to it. The experts of one MoE layer pool the sides
  that live in the layer's own space (``PooledSides``): one sum of their inputs (the hidden states)
  and one of their down weights' output gradients, per layer, not per expert. A side wider than
  ``max_width`` keeps its diagonal, and so do the experts' own sides, whole families of them
  largest first, where they would take the sums past ``WARMUP_MAX_BYTES``. The sums live on the
  model's device (float64), so a GPU model keeps host memory free (docs/howto/memory.md has the
  model of their size).
- ``fit_eigen_masks``: per module and side, the mask's eigen-directions of the full covariance (or a
  whitened hash of a diagonal side) and the K-FAC eigenvalues, eigendecomposed on the sums' device,
  once per distinct sum (an input read by several modules, a side pooled over experts).
- ``fit_masked_basis``: masks in the module's own coordinates (``mask_basis="input"``): the
  eigenvectors of the masked factor covariances that the pass's statistics hold.

The whitening need not be accurate, only well scaled (mean 1, so fp16 rows keep their range).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hf_grass.compressors.factor_maps import EigenMap, FactorMap, HashMap, eigen_scale
from hf_grass.kernels.onehot import OneHot
from hf_grass.precondition import linalg
from hf_grass.precondition.eigenbasis import Eigenbasis, ModuleBasis, damped_kfac, normalise_whitening
from hf_grass.precondition.statistics import ModuleSpec, Statistics

# Above this width a factor's full covariance (width^2 float64 numbers, and an eigendecomposition of
# width^3) costs more than it is worth: e.g. a 49k-word lm_head output, or a 14k-wide MLP of a 7B
# model. Its diagonal is kept instead, and the side is hashed.
FULL_COVARIANCE_MAX_WIDTH = 8192

# The experts' own sides (``PooledSides``) keep full sums only while all the sums, counted before the
# warm-up, stay within this many bytes: the 32 GB of host memory that issue 18 allows the warm-up of
# an 8B model (whose dense sums, 26.5 GB, fit under it). Past it, whole families of expert sides (one
# weight's side in every expert of every layer) keep their diagonal and are hashed, the largest family
# first: every expert is treated alike, and an expert's own side is the one a full sum buys least for,
# since it sees about top_k / experts of the sample's tokens. Dense and pooled sides are never
# demoted, so a dense model's warm-up is what it was (docs/howto/memory.md).
WARMUP_MAX_BYTES = 32 * 10**9


@dataclass(frozen=True)
class PooledSides:
    """How one expert's warm-up sums are kept (``capture.experts.warmup_pools``).

    ``input`` / ``output``: the key of the sum this side adds to, shared with the other experts of its
    layer (the side lives in the layer's own space: its hidden states, or its output's gradient), or
    None for a side of the expert's own (its intermediate space). ``family`` names the experts alike
    (one weight, in every layer): their own sides keep full sums, or fall back to diagonals, together.
    """

    input: str | None
    output: str | None
    family: str


class MaskedSides(Protocol):
    """What the fit reads of a factgrass compressor: widths, masks, generators."""

    d_in: int
    d_out: int
    bias: bool
    in_idx: torch.Tensor
    out_idx: torch.Tensor

    def generator(self, role: str) -> torch.Generator: ...


class WarmupCovariances:
    """Full-space covariance sums of the warm-up sample (see the module docstring).

    Args:
        widths: per module ``(d_in, d_out, bias)`` (``d_in`` counts the bias column).
        device: where the sums live (the model's device).
        max_width: sides wider than this keep their diagonal (default ``FULL_COVARIANCE_MAX_WIDTH``).
        pools: per expert, the sums its sides share with its layer's other experts (``PooledSides``).
        max_bytes: the experts' own sides fall back to diagonals past this (default ``WARMUP_MAX_BYTES``).
    """

    def __init__(
        self,
        widths: dict[str, tuple[int, int, bool]],
        device: torch.device | str = "cpu",
        max_width: int | None = None,
        *,
        pools: dict[str, PooledSides] | None = None,
        max_bytes: int | None = None,
    ):
        self.widths = widths
        self.max_width = max_width or FULL_COVARIANCE_MAX_WIDTH  # read at call time (tests lower it)
        self.pools = pools or {}
        self.max_bytes = WARMUP_MAX_BYTES if max_bytes is None else max_bytes
        self.device = torch.device(device)
        # decided before the first batch, from the widths alone: the same on every run and process
        self.fallbacks = plan_fallbacks(widths, self.pools, self.max_width, self.max_bytes)
        self.diagonal = {(name, f.side) for f in self.fallbacks for name in f.modules}
        self.examples = 0
        self.tokens: dict[str, int] = {}
        self.inputs: dict[str, torch.Tensor] = {}  # keyed by the first module that read the input
        self.outputs: dict[str, torch.Tensor] = {}
        self.input_of: dict[str, str] = {}  # module -> the key of its input's sum
        self.output_of: dict[str, str] = {}  # module -> the key of its output's sum (itself, or a pool)
        self.pooled_tokens: dict[tuple[str, str], int] = {}  # (side, pool key) -> tokens summed into it
        # this batch: the storage of an input -> (its key, the input). The input is kept until the
        # batch ends: under activation checkpointing a recomputed input is freed during the backward,
        # and a later input at the same address must not be taken for it
        self._batch_inputs: dict[tuple, tuple[str, torch.Tensor]] = {}

    def new_batch(self, examples: int) -> None:
        self.examples += examples
        self._batch_inputs = {}

    def add(
        self, name: str, x: torch.Tensor | OneHot, delta: torch.Tensor | OneHot, token_mask: torch.Tensor | None
    ) -> None:
        """One module's inputs ``[B, T, d_in(-1)]`` and output gradients ``[B, T, d_out]`` of this batch.

        Either side may be one-hot (``OneHot``: an embedding's ids, or the vocabulary side of a tied
        embedding's use): its sum is the diagonal of token counts, never a ``[tokens, width]`` matrix.
        """
        d_in, d_out, bias = self.widths[name]
        pool = self.pools.get(name)
        count = _count_tokens(x, token_mask)
        full_in = d_in <= self.max_width and (name, "in") not in self.diagonal
        if pool is not None and pool.input is not None:  # an expert: its layer's pooled input sum
            self._bind(self.input_of, name, pool.input)
            self._add_to(self.inputs, pool.input, _covariance(x, token_mask, bias, full_in))
            self._count_pooled("in", pool.input, count)
        else:
            self._add_input(name, x, token_mask, bias, full_in)
        out_key = name if pool is None or pool.output is None else pool.output
        self._bind(self.output_of, name, out_key)
        full_out = d_out <= self.max_width and (name, "out") not in self.diagonal
        self._add_to(self.outputs, out_key, _covariance(delta, token_mask, False, full_out))
        if out_key != name:
            self._count_pooled("out", out_key, count)
        self.tokens[name] = self.tokens.get(name, 0) + count

    def _add_input(
        self, name: str, x: torch.Tensor | OneHot, token_mask: torch.Tensor | None, bias: bool, full: bool
    ) -> None:
        """A module's own input sum, or nothing where an earlier module of this batch read the same
        tensor (its sum already holds it)."""
        # one-hot ids are read by no other module as an input: never shared
        storage = None if isinstance(x, OneHot) else (x.data_ptr(), tuple(x.shape), x.stride(), bias)
        found = None if storage is None else self._batch_inputs.get(storage)
        if found is None:
            key = self.input_of.setdefault(name, name)
            self._add_to(self.inputs, key, _covariance(x, token_mask, bias, full))
            if storage is not None:
                self._batch_inputs[storage] = (key, x)
        else:  # the same input as an earlier module of this batch: its sum already holds it
            shared = found[0]
            key = self.input_of.setdefault(name, shared)
            if key != shared:  # never seen (the model's structure changed between batches)
                raise RuntimeError(
                    f"module {name!r} read the input of {shared!r} in one warm-up batch and its own in another"
                )

    @staticmethod
    def _bind(store: dict[str, str], name: str, key: str) -> None:
        if store.setdefault(name, key) != key:
            raise RuntimeError(
                f"module {name!r} added to the warm-up sum {store[name]!r} and then to {key!r}"
            )

    def _count_pooled(self, side: str, key: str, count: int) -> None:
        self.pooled_tokens[(side, key)] = self.pooled_tokens.get((side, key), 0) + count

    def _add_to(self, store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        if key in store:
            store[key].add_(value)  # in place: no float64 copy of each batch's matrices
        else:
            store[key] = value.to(self.device, torch.float64)

    def input_covariance(self, name: str) -> torch.Tensor | None:
        """Module ``name``'s input sum (shared with the modules that read the same input), or None."""
        key = self.input_of.get(name)
        return None if key is None else self.inputs[key]

    def output_covariance(self, name: str) -> torch.Tensor | None:
        """Module ``name``'s output sum (its layer's pooled one for an expert's down weight), or None."""
        key = self.output_of.get(name)
        return None if key is None else self.outputs[key]

    def counts(self, name: str) -> tuple[float, float]:
        """What the fit divides module ``name``'s sums by, so that the input's is a covariance per
        token and the output's a sum over an example's tokens, averaged over examples (K-FAC's two
        factors): its tokens and the examples. A pooled input is a mean over every token of its sum
        (the layer's routed tokens). A pooled output is that mean times this expert's tokens per
        example: ``examples * pool tokens / own tokens``, so an expert that sees few tokens gets a
        small output factor, as its own sum would have given it."""
        tokens = max(float(self.tokens.get(name, 0)), 1.0)
        examples = max(float(self.examples), 1.0)
        pool = self.pools.get(name)
        if pool is None:
            return tokens, examples
        c_in, c_out = tokens, examples
        if pool.input is not None:
            c_in = float(self.pooled_tokens.get(("in", pool.input), 0))
        if pool.output is not None:
            c_out = examples * self.pooled_tokens.get(("out", pool.output), 0) / tokens
        return max(c_in, 1.0), max(c_out, 1.0)

    def fallback_line(self) -> str | None:
        """The log line saying which experts' sides keep diagonals for the budget, or None."""
        if not self.fallbacks:
            return None
        parts = [f"{f.family} {'inputs' if f.side == 'in' else 'output gradients'} of {len(f.modules)} experts "
                 f"({f.full_bytes / 1e9:.2f} GB in full)" for f in self.fallbacks]  # fmt: skip
        return (
            "the warm-up keeps the covariances of the " + "; the ".join(parts) + " as diagonals, and hashes "
            f"those sides: in full, the warm-up's sums would take more than {self.max_bytes / 1e9:.1f} GB "
            "(WARMUP_MAX_BYTES; docs/howto/memory.md)"
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.inputs.values(), *self.outputs.values()))

    def free(self) -> None:
        """Drop the sums once the basis is fitted: the capture's last request still references this
        object until the next batch, which would keep them beside the main pass's statistics."""
        self.inputs.clear()
        self.outputs.clear()


@dataclass(frozen=True)
class Fallback:
    """One family of experts' own sides kept as diagonals (hashed) for the byte budget."""

    family: str
    side: str  # "in" or "out"
    modules: tuple[str, ...]
    full_bytes: int  # what their full sums would have taken


def sum_bytes(d: int, max_width: int) -> int:
    """A float64 warm-up sum of a ``d``-wide side: ``d x d``, or its diagonal past ``max_width``."""
    return 8 * d * d if d <= max_width else 8 * d


def plan_fallbacks(
    widths: dict[str, tuple[int, int, bool]], pools: dict[str, PooledSides], max_width: int, max_bytes: int
) -> list[Fallback]:
    """Which families of the experts' own sides keep diagonals, so that the sums fit ``max_bytes``.

    The sums are counted before the warm-up, from the widths: every module's own input and output
    (an upper bound: modules that turn out to read one input share its sum), one sum per pool, and the
    experts' own sides. While that exceeds ``max_bytes``, the family of own sides (one weight's side,
    in every expert of every layer) whose full sums take the most bytes falls back to diagonals. Only
    experts' own sides do: a model without experts, or whose other sums alone exceed the budget,
    keeps its other sums as they are (the dense memory model).
    """
    total, pooled = 0, {}
    families: dict[tuple[str, str], list[str]] = {}
    for name, (d_in, d_out, _) in widths.items():
        pool = pools.get(name)
        for side, d, key in (("in", d_in, pool and pool.input), ("out", d_out, pool and pool.output)):
            if key:
                pooled[(side, key)] = sum_bytes(d, max_width)
            else:
                total += sum_bytes(d, max_width)
                if pool is not None and d <= max_width:
                    families.setdefault((pool.family, side), []).append(name)
    total += sum(pooled.values())
    out = []

    def cost(item: tuple[tuple[str, str], list[str]]) -> int:
        (_, side), names = item
        return sum(8 * widths[n][0 if side == "in" else 1] ** 2 for n in names)

    # the largest family first; ties in name order, so the plan is the same on every run
    for (family, side), names in sorted(families.items(), key=lambda item: (-cost(item), item[0])):
        if total <= max_bytes:
            break
        full = cost(((family, side), names))
        total -= full - sum(8 * widths[n][0 if side == "in" else 1] for n in names)
        out.append(Fallback(family, side, tuple(names), full))
    return out


# A wide side's squares are summed over chunks of tokens of at most this many float32 bytes: in one
# piece, an lm_head's output gradients ([8192 tokens, 128256] for Llama-3.1-8B) would take 4.2 GB in
# float32 and as much again squared, beside the sums.
DIAGONAL_CHUNK_BYTES = 64 << 20


def _real_tokens(t: torch.Tensor | OneHot, mask: torch.Tensor | None) -> torch.Tensor | OneHot:
    """``[B, T, d]`` -> ``[tokens, d]``: padding positions carry inputs but are not data."""
    if isinstance(t, OneHot):
        return OneHot(t.select(mask)[None], t.width, t.dtype)  # [1, tokens, width]
    if mask is not None and mask.shape == t.shape[:2]:
        return t[mask]
    return t.reshape(-1, t.shape[-1])


def _count_tokens(t: torch.Tensor | OneHot, mask: torch.Tensor | None) -> int:
    if isinstance(t, OneHot):
        return t.select(mask).numel()
    if mask is not None and mask.shape == t.shape[:2]:
        return int(mask.sum())
    return t.numel() // t.shape[-1]


def _covariance(t: torch.Tensor | OneHot, mask: torch.Tensor | None, bias: bool, full: bool) -> torch.Tensor:
    """``t^T t`` over the real tokens of ``t [B, T, d]`` (with a trailing column of ones when
    ``bias``), or its diagonal where not ``full``, in the input's precision (float32
    for a float32 or half model: twice as fast as float64, and a batch's sum loses nothing that
    matters to an eigenbasis). One-hot rows: the diagonal matrix (or vector) of token counts."""
    if isinstance(t, OneHot):
        if bias:
            raise ValueError("a one-hot factor has no bias column")
        counts = t.counts(mask)
        return torch.diag(counts) if full else counts
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if not full:
        return _diagonal(t, mask, bias, acc)
    t = _real_tokens(t, mask).to(acc)
    if bias:  # the gradient's input has a trailing 1 (DESIGN.md §2)
        t = torch.cat([t, torch.ones(t.shape[0], 1, dtype=acc, device=t.device)], dim=1)
    return gram(t)


def _diagonal(t: torch.Tensor, mask: torch.Tensor | None, bias: bool, acc: torch.dtype) -> torch.Tensor:
    """The diagonal of ``t^T t`` over the real tokens, summed over chunks of tokens
    (``DIAGONAL_CHUNK_BYTES``), so no copy of the whole side is made."""
    flat = t.reshape(-1, t.shape[-1])
    keep = mask.reshape(-1) if mask is not None and mask.shape == t.shape[:2] else None
    out = torch.zeros(flat.shape[1] + bias, dtype=acc, device=t.device)
    step = max(1, DIAGONAL_CHUNK_BYTES // (4 * flat.shape[1]))
    for lo in range(0, flat.shape[0], step):
        part = flat[lo : lo + step] if keep is None else flat[lo : lo + step][keep[lo : lo + step]]
        out[: flat.shape[1]] += part.to(acc).square().sum(0)
        if bias:
            out[-1] += part.shape[0]
    return out


# Column blocks of ``gram``: the products of the blocks on and above the diagonal, 10 of 16, ran in
# 0.55x (width 1536) and 0.65x (576) of one full ``t^T t`` on 2 CPU threads; the warm-up of
# SmolLM2-135M spends most of its time in these products.
GRAM_BLOCKS, GRAM_MIN_WIDTH = 4, 256


def gram(t: torch.Tensor) -> torch.Tensor:
    """``t^T t`` for ``t [n, d]``: only the column blocks on and above the diagonal are multiplied
    (``GRAM_BLOCKS`` of them per side); each block below the diagonal is its mirror's transpose."""
    d = t.shape[1]
    if d < GRAM_MIN_WIDTH or t.device.type != "cpu":  # a GPU multiplies the full product faster
        return t.T @ t
    edges = [round(i * d / GRAM_BLOCKS) for i in range(GRAM_BLOCKS + 1)]
    out = torch.empty(d, d, dtype=t.dtype, device=t.device)
    for lo, hi in zip(edges[:-1], edges[1:]):
        row = t[:, lo:hi].T @ t[:, lo:]  # [hi - lo, d - lo]: the diagonal block and those right of it
        out[lo:hi, lo:] = row
        out[hi:, lo:hi] = row[:, hi - lo :].T
    return out


def fit_eigen_masks(
    compressors: dict[str, MaskedSides], covariances: WarmupCovariances, damping: float, top: bool = False
) -> Eigenbasis:
    """The warm-up fit of an eigen-basis cache (``mask_basis="eigen"``), per module and side.

    A side with a full covariance: with ``top`` (``mask_basis="top"``), the mask keeps its ``m``
    eigen-directions of largest eigenvalue, unscaled: the score of the gradients' projections on the
    top K-FAC subspace, the whitened directions a sketch of the row's width can hold (LoGra's
    initialisation of its projection). Otherwise the mask ``idx`` (``m`` of ``d``, drawn from the
    seed) keeps those eigen-directions of it, scaled by ``sqrt(d / m)``, so the masked gradient is an
    unbiased subsample of the gradient in the K-FAC eigenbasis. A side kept as a diagonal: a signed hash of its
    coordinates into ``m`` buckets, each coordinate whitened by its variance first
    (``HashMap``), which keeps every coordinate (every word of an ``lm_head``) where a mask would
    drop most of them. A module the sample never reached keeps masks in its own coordinates. The
    whitening is ``(L / mean L)^(-1/2)`` of the damped K-FAC eigenvalues of the stored coordinates.
    An expert's pooled side takes the eigenbasis of its layer's pooled sum (each expert its own mask
    of it), and eigenvalues scaled by ``WarmupCovariances.counts``.
    """
    # (side, the sum's key) -> (eigenvalues, vectors)
    solved: dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]] = {}
    fit = _SideFit(damping, top, solved)
    # how many modules still need each sum's decomposition: it is dropped after its last reader, so
    # the device holds the decompositions of a few sums at a time, not of the whole model (an input
    # shared by q/k/v, or a side pooled over a layer's experts, is decomposed once)
    keys = {name: (("in", covariances.input_of.get(name)), ("out", covariances.output_of.get(name)))
            for name in compressors}  # fmt: skip
    readers = Counter(k for pair in keys.values() for k in pair if k[1] is not None)
    modules, damped = {}, {}
    for name, comp in compressors.items():
        count_in, count_out = covariances.counts(name)
        key_in, key_out = keys[name]
        map_in, eig_in, row_in = _side(fit, covariances.input_covariance(name), comp.d_in, comp.in_idx,
                                       comp.generator("hash_in"), key_in, count_in)  # fmt: skip
        map_out, eig_out, row_out = _side(fit, covariances.output_covariance(name), comp.d_out, comp.out_idx,
                                          comp.generator("hash_out"), key_out, count_out)  # fmt: skip
        for key in (key_in, key_out):
            if key[1] is not None:
                readers[key] -= 1
                if readers[key] == 0:
                    solved.pop(key, None)
        modules[name] = ModuleBasis(torch.empty(0), map_in=map_in, map_out=map_out, eig_in=eig_in, eig_out=eig_out)
        damped[name] = damped_kfac(row_out, row_in, damping)
    whiten, mean = normalise_whitening(damped)
    for name, mod in modules.items():
        mod.whiten = whiten[name]
    return Eigenbasis(modules, mean)


@dataclass
class _SideFit:
    """What every side of one ``fit_eigen_masks`` shares: the whitening damping, the masks' kind
    (``top``) and the decompositions already made, by (side, the sum's key)."""

    damping: float
    top: bool
    solved: dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]]


def _side(
    fit: _SideFit,
    cov: torch.Tensor | None,
    d: int,
    idx: torch.Tensor,
    gen: torch.Generator,
    key: tuple[str, str | None],
    count: float,
) -> tuple[FactorMap, torch.Tensor, torch.Tensor]:
    """``(map, curvature eigenvalues, eigenvalues of the stored coordinates)`` of one side, the
    eigenvalues divided by ``count`` (``WarmupCovariances.counts``)."""
    damping, solved = fit.damping, fit.solved
    idx = idx.cpu()
    m = idx.numel()
    if cov is not None and cov.dim() == 1:  # a wide side: whitened signed hash
        var = cov.double().cpu().clamp(min=0) / count
        floor = damping * float(var.mean()) if float(var.mean()) > 0 else 1.0
        whiten = (var + floor).rsqrt()
        buckets = torch.randint(0, m, (d,), generator=gen)
        signs = torch.randint(0, 2, (d,), generator=gen).to(torch.float32).mul_(2).sub_(1)
        fmap = HashMap(buckets, signs, (whiten / whiten.mean()).to(torch.float32), m)
        stored = torch.zeros(m, dtype=torch.float64).index_add_(0, buckets, var * fmap.whiten.double().square())
        return fmap, var, stored
    if cov is None:  # never reached by the warm-up sample: masks in the module's own coordinates
        vectors = torch.zeros(d, m, dtype=torch.float32)
        vectors[idx, torch.arange(m)] = 1.0
        zeros = torch.zeros(m, dtype=torch.float64)
        return EigenMap(vectors, eigen_scale(d, m)), zeros, zeros
    if key not in solved:
        eig, vectors = linalg.eigh_psd(cov, torch.float32, keep_device=True)
        eig, vectors = eig, vectors.to(torch.float32)
        solved[key] = (eig, vectors)  # modules that share the sum share its decomposition
    else:
        eig, vectors = solved[key]
    scale = eigen_scale(d, m)
    if fit.top:  # the m largest (eigh_psd sorts ascending; ties broken by position, deterministically)
        idx, scale = torch.arange(d - m, d).flip(0), 1.0
    kept = (eig[idx.to(eig.device)] / count).cpu()
    fmap = EigenMap(vectors[:, idx.to(vectors.device)].to(torch.float32).cpu().contiguous(), scale)
    return fmap, kept, kept


def fit_masked_basis(specs: Iterable[ModuleSpec], stats: Statistics, damping: float) -> Eigenbasis:
    """Masks in the module's own coordinates (``mask_basis="input"``, or logra): per module the
    eigenvectors of the masked factor covariances (``stats``'s ``covariances``) and the whitening
    ``(L / mean L)^(-1/2)`` with ``L`` the damped K-FAC eigenvalues."""
    modules, damped = {}, {}
    examples = max(float(stats.examples), 1.0)
    for m in specs:
        mod = stats.modules[m.name]
        assert mod.cov_in is not None and mod.cov_out is not None and mod.tokens is not None
        eig_in, q_in = linalg.eigh_psd(mod.cov_in)
        eig_out, q_out = linalg.eigh_psd(mod.cov_out)
        modules[m.name] = ModuleBasis(torch.empty(0), q_in=q_in, q_out=q_out)
        damped[m.name] = damped_kfac(eig_out / examples, eig_in / max(float(mod.tokens), 1.0), damping)
    whiten, mean = normalise_whitening(damped)
    for name, mod in modules.items():
        mod.whiten = whiten[name]
    return Eigenbasis(modules, mean)


def module_widths(compressors: dict[str, Any]) -> dict[str, tuple[int, int, bool]]:
    """``(d_in, d_out, bias)`` per module, what ``WarmupCovariances`` needs."""
    return {name: (c.d_in, c.d_out, c.bias) for name, c in compressors.items()}
