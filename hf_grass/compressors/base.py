"""The compressor interface and its registry.

A compressor is a fixed random linear map ``C: R^p -> R^k`` applied to the vectorised per-example
gradient ``vec(G)`` of one module, ``G = sum_t delta_t x_t^T`` of shape ``[d_out, d_in]`` and
flattened row-major (index ``o * d_in + i``). Every compressor is normalised so that
``E ||C g||^2 = ||g||^2`` over its random draw.

Bias convention: a module with bias has the bias gradient as the last column of ``G`` (its input
gets a trailing 1). ``d_in`` is then the width *including* that column and ``bias=True``;
``compress(x, delta)`` takes ``x`` *without* the column (``d_in - 1`` wide) and adds it implicitly,
while ``compress_gradient(g)`` takes the full ``[B, d_out, d_in]`` gradient.

One-hot factors: either factor of ``compress`` may be a ``kernels.onehot.OneHot`` (an embedding's
token ids, or the vocabulary side of a tied embedding's use), which factorised compressors never
build; the others build it with the gradient.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

import torch

from hf_grass.kernels import SJLTMap
from hf_grass.kernels.onehot import OneHot
from hf_grass.kernels.reference import accumulation_dtype
from hf_grass.seeding import make_generator


class CompressorSettings(Protocol):
    """What a compressor reads of the run's configuration (``GraSSConfig`` provides it)."""

    compressor: str
    proj_dim: int | None
    total_dim: int | None  # the global layout: every module maps into one shared row
    factor_dim: int
    mask_basis: str | None
    sparsify_factor: int
    sjlt_nnz: int
    distribution: str
    seed: int


_REGISTRY: dict[str, type[Compressor]] = {}


def register_compressor(name: str):
    """Class decorator: make a compressor buildable by ``GraSSConfig(compressor=name)``.

    ``name`` must be the name of the module that defines the class: that is how
    ``hf_grass.compressors.available_compressors()`` finds it without importing anything.
    """

    def wrap(cls: type[Compressor]) -> type[Compressor]:
        if name in _REGISTRY:
            raise ValueError(f"compressor {name!r} is registered twice")
        if cls.__module__.rpartition(".")[2] != name:
            raise ValueError(f"compressor {name!r} must be defined in a module named {name}.py")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered(name: str) -> type[Compressor]:
    """The class of an imported compressor module (``hf_grass.compressors.compressor_class``
    imports it first)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"compressor module {name!r} registers no compressor class") from None


class Compressor(ABC):
    """A seeded random linear map from one module's per-example gradient to ``output_dim`` numbers."""

    name: ClassVar[str] = ""
    #: factorised compressors never build the [B, d_out, d_in] gradient and expose a factor space
    factorised: ClassVar[bool] = False

    def __init__(
        self,
        config: CompressorSettings,
        module_name: str,
        d_in: int,
        d_out: int,
        bias: bool = False,
        embed: bool = False,
    ):
        for label, value in (("d_in", d_in), ("d_out", d_out)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{label} must be a positive int, got {value!r} (module {module_name!r})")
        if bias and d_in < 2:
            raise ValueError(f"bias=True needs d_in >= 2 (inputs plus the bias column); got d_in={d_in}")
        if embed and not self.factorised:
            raise ValueError(f"{self.name} has no factor space to embed exactly")
        # embed: the factor space goes into the row as it is (no random projection), because the
        # whole model's factor spaces fit the global budget (set by GradientComputer)
        self.embed = embed
        self.config = config
        self.module_name = module_name
        self.d_in = d_in
        self.d_out = d_out
        self.bias = bias
        self.p = d_in * d_out
        # the global layout maps every module into the shared row, which may be wider than a module
        self.output_dim = config.total_dim if config.total_dim is not None else int(config.proj_dim)
        if config.total_dim is None and self.output_dim > self.p:
            raise ValueError(
                f"proj_dim={self.output_dim} is larger than the gradient of module {module_name!r} "
                f"({d_out} x {d_in} = {self.p} numbers); lower proj_dim or exclude that module."
            )
        self.device = torch.device("cpu")
        self._draw()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def check_config(cls, config: CompressorSettings) -> None:
        """Refuse settings this compressor cannot use, with a ``ValueError`` saying how to fix them
        (called by ``GraSSConfig`` validation; the base accepts everything)."""
        return None

    def generator(self, role: str) -> torch.Generator:
        """The CPU generator of one random object of this module (seeded by seed, name, role)."""
        return make_generator(self.config.seed, self.module_name, f"{self.name}/{role}")

    @abstractmethod
    def _draw(self) -> None:
        """Draw the random objects (on the CPU, from ``self.generator(role)``)."""

    def _tensors(self) -> list[str]:
        """Names of the attributes that follow the compressor to a device (tensors and SJLT maps)."""
        return [k for k, v in vars(self).items() if isinstance(v, (torch.Tensor, SJLTMap))]

    def to(self, device: torch.device | str) -> Compressor:
        device = torch.device(device)
        for key in self._tensors():
            setattr(self, key, getattr(self, key).to(device))
        self.device = device
        return self

    @property
    def bias_index(self) -> int | None:
        """Column index of the implicit bias input, or None."""
        return self.d_in - 1 if self.bias else None

    # ---- the map --------------------------------------------------------------------------------

    def compress(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Compress ``sum_t delta_t x_t^T`` per example: x ``[B,T,d_in(-1)]``, delta ``[B,T,d_out]`` -> ``[B,k]``.

        The default materialises the per-example gradient; sub-classes override it when they can
        read less.
        """
        self._check_factors(x, delta)
        return self.compress_gradient(self.outer(x, delta))

    def compress_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """Compress explicit per-example gradients ``g [B, d_out, d_in]`` -> ``[B, k]``."""
        if g.dim() != 3 or g.shape[1:] != (self.d_out, self.d_in):
            raise ValueError(
                f"{self.module_name}: expected gradients of shape [B, {self.d_out}, {self.d_in}], "
                f"got {tuple(g.shape)}"
            )
        return self._compress_flat(g.reshape(g.shape[0], self.p))

    @abstractmethod
    def _compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        """``[B, p]`` row-major vec(G) -> ``[B, k]`` in the accumulation dtype."""

    @abstractmethod
    def dense_matrix(self) -> torch.Tensor:
        """The explicit ``[k, p]`` float64 matrix of the map (for tests on small sizes)."""

    # ---- helpers --------------------------------------------------------------------------------

    def _check_factors(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        width = self.d_in - 1 if self.bias else self.d_in
        if x.dim() != 3 or delta.dim() != 3 or x.shape[:2] != delta.shape[:2]:
            raise ValueError(
                f"{self.module_name}: expected x [B,T,{width}] and delta [B,T,{self.d_out}], got "
                f"{tuple(x.shape)} and {tuple(delta.shape)}"
            )
        if x.shape[-1] != width or delta.shape[-1] != self.d_out:
            raise ValueError(
                f"{self.module_name}: expected x width {width} and delta width {self.d_out}"
                f"{' (bias column is implicit)' if self.bias else ''}, got {x.shape[-1]} and {delta.shape[-1]}"
            )

    def with_bias_column(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the trailing ones column appended when the module has a bias."""
        if not self.bias:
            return x
        return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)

    def outer(self, x: torch.Tensor | OneHot, delta: torch.Tensor | OneHot) -> torch.Tensor:
        """The materialised per-example gradient ``[B, d_out, d_in]`` (accumulation dtype); a one-hot
        factor (an embedding's ids) is built here, as this gradient is built anyway."""
        acc = accumulation_dtype(x, delta)
        x, delta = (t.dense() if isinstance(t, OneHot) else t for t in (x, delta))
        return torch.bmm(delta.to(acc).transpose(1, 2), self.with_bias_column(x).to(acc))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(module={self.module_name!r}, d_in={self.d_in}, d_out={self.d_out}, "
            f"bias={self.bias}, k={self.output_dim})"
        )


class FactorisedCompressor(Compressor):
    """A compressor that works in a small factor space ``[m_out, m_in]`` and never builds ``G``.

    ``compress = project_factor ∘ factor_gradient``; the factor space is also where the K-FAC /
    EK-FAC preconditioner lives.
    """

    factorised: ClassVar[bool] = True
    m_in: int
    m_out: int

    @abstractmethod
    def factors(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token factor-space inputs ``[B,T,m_in]`` and output gradients ``[B,T,m_out]``."""

    def factor_gradient(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``G'[b] = sum_t delta'_t x'_t^T`` -> ``[B, m_out, m_in]``."""
        self._check_factors(x, delta)
        xs, ds = self.factors(x, delta)
        return torch.bmm(ds.transpose(1, 2), xs)

    @abstractmethod
    def factor_gradient_from_full(self, g: torch.Tensor) -> torch.Tensor:
        """The factor-space gradient of explicit gradients ``[B, d_out, d_in]`` (for oracles)."""

    @abstractmethod
    def project_factor(self, gp: torch.Tensor) -> torch.Tensor:
        """Factor-space gradients ``[B, m_out, m_in]`` -> compressed ``[B, k]``."""

    @abstractmethod
    def project_factor_matrix(self) -> torch.Tensor:
        """The explicit ``[k, m_out*m_in]`` float64 matrix of ``project_factor``."""

    def compress(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.project_factor(self.factor_gradient(x, delta))

    def _compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        g = v.reshape(v.shape[0], self.d_out, self.d_in)
        return self.project_factor(self.factor_gradient_from_full(g))


def nearest_square(n: int) -> int:
    """The perfect square closest to ``n`` (for error messages that suggest a value)."""
    r = math.isqrt(n)
    return r * r if n - r * r <= (r + 1) ** 2 - n else (r + 1) ** 2


def check_square(name: str, value: int) -> int:
    root = math.isqrt(value)
    if root * root != value:
        raise ValueError(f"{name}={value} must be a perfect square")
    return root
