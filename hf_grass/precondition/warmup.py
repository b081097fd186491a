"""The warm-up of a kfac/ekfac cache: covariance sums over a small sample, and the fits that turn
them into an ``Eigenbasis``.

- ``WarmupCovariances``: the sums of ``x x^T`` (bias column included) and ``delta delta^T`` over the
  sample's real tokens in each module's *full* input and output spaces (``mask_basis="eigen"``). The
  capture hooks add each batch into them as the backward runs, so no batch's matrices are held, and
  modules that read the same input (q/k/v, gate/up) share ONE input sum: the first of them to see a
  batch computes its covariance, the others point to it. A side wider than ``max_width`` keeps its
  diagonal. The sums live on the model's device (float64), so a GPU model keeps host memory free
  (docs/howto/memory.md has the model of their size).
- ``fit_eigen_masks``: per module and side, the mask's eigen-directions of the full covariance (or a
  whitened hash of a diagonal side) and the K-FAC eigenvalues, eigendecomposed on the sums' device,
  once per distinct input.
- ``fit_masked_basis``: masks in the module's own coordinates (``mask_basis="input"``): the
  eigenvectors of the masked factor covariances that the pass's statistics hold.

The whitening need not be accurate, only well scaled (mean 1, so fp16 rows keep their range).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
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
    """

    def __init__(
        self,
        widths: dict[str, tuple[int, int, bool]],
        device: torch.device | str = "cpu",
        max_width: int | None = None,
    ):
        self.widths = widths
        self.max_width = max_width or FULL_COVARIANCE_MAX_WIDTH  # read at call time (tests lower it)
        self.device = torch.device(device)
        self.examples = 0
        self.tokens: dict[str, int] = {}
        self.inputs: dict[str, torch.Tensor] = {}  # keyed by the first module that read the input
        self.outputs: dict[str, torch.Tensor] = {}
        self.input_of: dict[str, str] = {}  # module -> the key of its input's sum
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
        _, _, bias = self.widths[name]
        # one-hot ids are read by no other module as an input: never shared
        storage = None if isinstance(x, OneHot) else (x.data_ptr(), tuple(x.shape), x.stride(), bias)
        found = None if storage is None else self._batch_inputs.get(storage)
        if found is None:
            key = self.input_of.setdefault(name, name)
            self._add_to(self.inputs, key, _covariance(x, token_mask, bias, self.max_width))
            if storage is not None:
                self._batch_inputs[storage] = (key, x)
        else:  # the same input as an earlier module of this batch: its sum already holds it
            shared = found[0]
            key = self.input_of.setdefault(name, shared)
            if key != shared:  # never seen (the model's structure changed between batches)
                raise RuntimeError(
                    f"module {name!r} read the input of {shared!r} in one warm-up batch and its own in another"
                )
        self._add_to(self.outputs, name, _covariance(delta, token_mask, False, self.max_width))
        self.tokens[name] = self.tokens.get(name, 0) + _count_tokens(x, token_mask)

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
        return self.outputs.get(name)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.inputs.values(), *self.outputs.values()))

    def free(self) -> None:
        """Drop the sums once the basis is fitted: the capture's last request still references this
        object until the next batch, which would keep them beside the main pass's statistics."""
        self.inputs.clear()
        self.outputs.clear()


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


def _covariance(t: torch.Tensor | OneHot, mask: torch.Tensor | None, bias: bool, max_width: int) -> torch.Tensor:
    """``t^T t`` over the real tokens of ``t [B, T, d]`` (with a trailing column of ones when
    ``bias``), or its diagonal for a side wider than ``max_width``, in the input's precision (float32
    for a float32 or half model: twice as fast as float64, and a batch's sum loses nothing that
    matters to an eigenbasis). One-hot rows: the diagonal matrix (or vector) of token counts."""
    if isinstance(t, OneHot):
        if bias:
            raise ValueError("a one-hot factor has no bias column")
        counts = t.counts(mask)
        return counts if t.width > max_width else torch.diag(counts)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if t.shape[-1] + bias > max_width:
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
    compressors: dict[str, MaskedSides], covariances: WarmupCovariances, damping: float
) -> Eigenbasis:
    """The warm-up fit of an eigen-basis cache (``mask_basis="eigen"``), per module and side.

    A side with a full covariance: the mask ``idx`` (``m`` of ``d``, drawn from the seed) keeps those
    eigen-directions of it, scaled by ``sqrt(d / m)``, so the masked gradient is an unbiased subsample
    of the gradient in the K-FAC eigenbasis. A side kept as a diagonal: a signed hash of its
    coordinates into ``m`` buckets, each coordinate whitened by its variance first
    (``HashMap``), which keeps every coordinate (every word of an ``lm_head``) where a mask would
    drop most of them. A module the sample never reached keeps masks in its own coordinates. The
    whitening is ``(L / mean L)^(-1/2)`` of the damped K-FAC eigenvalues of the stored coordinates.
    """
    solved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # input key -> (eig, vectors)
    # how many modules still need each input's decomposition: it is dropped after its last reader, so
    # the device holds the decompositions of a few inputs at a time, not of the whole model
    readers = Counter(covariances.input_of[name] for name in compressors if name in covariances.input_of)
    modules, damped = {}, {}
    examples = max(float(covariances.examples), 1.0)
    for name, comp in compressors.items():
        tokens = max(float(covariances.tokens.get(name, 0)), 1.0)
        in_key = covariances.input_of.get(name)
        cov_in = covariances.input_covariance(name)
        map_in, eig_in, row_in = _side(cov_in, comp.d_in, comp.in_idx, comp.generator("hash_in"), damping,
                                       solved, in_key, tokens)  # fmt: skip
        map_out, eig_out, row_out = _side(covariances.output_covariance(name), comp.d_out, comp.out_idx,
                                          comp.generator("hash_out"), damping, solved, None, examples)  # fmt: skip
        if in_key is not None:
            readers[in_key] -= 1
            if readers[in_key] == 0:
                solved.pop(in_key, None)
        modules[name] = ModuleBasis(torch.empty(0), map_in=map_in, map_out=map_out, eig_in=eig_in, eig_out=eig_out)
        damped[name] = damped_kfac(row_out, row_in, damping)
    whiten, mean = normalise_whitening(damped)
    for name, mod in modules.items():
        mod.whiten = whiten[name]
    return Eigenbasis(modules, mean)


def _side(
    cov: torch.Tensor | None,
    d: int,
    idx: torch.Tensor,
    gen: torch.Generator,
    damping: float,
    solved: dict[str, tuple[torch.Tensor, torch.Tensor]],
    key: str | None,
    count: float,
) -> tuple[FactorMap, torch.Tensor, torch.Tensor]:
    """``(map, curvature eigenvalues, eigenvalues of the stored coordinates)`` of one side, the
    eigenvalues divided by ``count`` (tokens for inputs, examples for outputs)."""
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
    if key is None or key not in solved:
        eig, vectors = linalg.eigh_psd(cov, torch.float32, keep_device=True)
        eig, vectors = eig, vectors.to(torch.float32)
        if key is not None:  # modules reading the same input share one decomposition
            solved[key] = (eig, vectors)
    else:
        eig, vectors = solved[key]
    kept = (eig[idx.to(eig.device)] / count).cpu()
    fmap = EigenMap(vectors[:, idx.to(vectors.device)].to(torch.float32).cpu().contiguous(), eigen_scale(d, m))
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
