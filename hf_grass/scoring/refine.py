"""A refined iHVP for queries (after ASTRA, Wang et al. 2025): EK-FAC's answer improved by
preconditioned conjugate gradients with exact curvature-vector products.

EK-FAC approximates each module's block of the curvature by a Kronecker eigenbasis with corrected
eigenvalues, and ignores every block between two modules. ``Refiner`` solves instead

    (C H C^T + D) x = b

for each query's factor gradient ``b`` (every module at once), where ``C`` maps a weight gradient
into the preconditioner's curvature coordinates (the kept eigen-directions of each side, or the
masked coordinates; a hashed side's own coordinates), ``D`` is EK-FAC's damping
``lambda_l = damping * mean(eig_l)`` per module, and ``H`` is one of:

- ``"gauss-newton"``: the Gauss-Newton matrix ``(1/n) sum_i J_i^T (d^2 L_i / dz^2) J_i`` of the
  training loss over a sample of training documents: products ``H v`` run a forward-mode ``J v``
  (``torch.func.jvp``), the loss's exact Hessian in the logits, and a backward;
- ``"empirical"``: the empirical Fisher ``(1/n) sum_i g_i g_i^T`` of the same sample, whose
  per-example curvature gradients are captured once, so that its products are two matrix products.

The preconditioner of the conjugate gradients is the cache's own EK-FAC (or K-FAC), fitted in the
same coordinates. Its only cost is at query time: the solution replaces ``H^-1 b`` before the
whitening and the final projection (``queries.query_side``), so the cache is unchanged. ``steps``
counts curvature products; the first one only rescales EK-FAC's answer (the same ranking), the
next ones change it. Measured in docs/benchmarks.md ("Refined iHVP").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from hf_grass.capture.engine import GradientComputer, _batch_size, frozen_eval
from hf_grass.capture.hooks import CaptureRequest
from hf_grass.capture.loss import model_logits, per_example_loss
from hf_grass.capture.target_module import TargetModule
from hf_grass.compressors.base import FactorisedCompressor
from hf_grass.compressors.factor_maps import HashMap
from hf_grass.precondition.base import Preconditioner
from hf_grass.precondition.eigenbasis import Eigenbasis

REFINE_CURVATURES = ("gauss-newton", "empirical")

Blocks = dict[str, torch.Tensor]  # module name -> [n, c_out, c_in] float64


def check_refine_options(steps: int, curvature: str, examples: int) -> None:
    """``ValueError`` for refinement options out of range (``ScoringOptions``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"refine_steps must be an int >= 0 (0: EK-FAC alone), got {steps!r}")
    if curvature not in REFINE_CURVATURES:
        raise ValueError(f"refine_curvature must be one of {', '.join(REFINE_CURVATURES)}, got {curvature!r}")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples <= 0:
        raise ValueError(f"refine_examples must be a positive int, got {examples!r}")


class CurvatureMaps:
    """Per module, the dense maps between a weight gradient ``G [d_out, d_in]`` (bias column last)
    and the curvature coordinates ``C(G) = M_out^T G M_in / scale`` the preconditioner acts in;
    ``None`` for a hashed side (its own coordinates: the identity). ``scale`` is the masks' scale of
    eigen-direction sides (``ModuleBasis.scale``): EK-FAC's eigenvalues are those of the unscaled
    coordinates, so the products are taken there too."""

    def __init__(self, computer: GradientComputer, basis: Eigenbasis, names: Sequence[str]):
        self.maps: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.scale: dict[str, float] = {}
        for name in names:
            comp = computer.compressors[name]
            assert isinstance(comp, FactorisedCompressor)
            m_in, m_out = comp._dense_maps()  # type: ignore[attr-defined]
            mod = basis.modules[name]
            keep_in = None if isinstance(mod.map_in, HashMap) else m_in
            keep_out = None if isinstance(mod.map_out, HashMap) else m_out
            self.maps[name] = (keep_in, keep_out)
            self.scale[name] = mod.scale

    def to_curvature(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """``[..., d_out, d_in] -> [..., c_out, c_in]`` float64."""
        m_in, m_out = self.maps[name]
        out = g.to(torch.float64)
        if m_out is not None:
            out = m_out.to(out.device).T @ out
        if m_in is not None:
            out = out @ m_in.to(out.device)
        return out / self.scale[name]

    def lift(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The transpose of ``to_curvature``: ``[..., c_out, c_in] -> [..., d_out, d_in]`` float64."""
        m_in, m_out = self.maps[name]
        out = x.to(torch.float64)
        if m_out is not None:
            out = m_out.to(out.device) @ out
        if m_in is not None:
            out = out @ m_in.to(out.device).T
        return out / self.scale[name]


class EmpiricalProducts:
    """``x -> C F C^T x`` for the empirical Fisher ``F = (1/n) sum_i g_i g_i^T`` of the sample,
    from its per-example curvature gradients, captured once."""

    def __init__(self, computer: GradientComputer, maps: CurvatureMaps, batches: Sequence[Mapping[str, torch.Tensor]],
                 hashed: bool):  # fmt: skip
        self.maps = maps
        request = CaptureRequest(rows=False, factor_grads=True, curvature_grads=hashed)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in maps.maps}
        with computer.session():
            for batch in batches:
                grads = computer.compute(batch, request)
                for name in parts:
                    g = grads.curvature_grads.get(name, grads.factor_grads[name])
                    parts[name].append(g.to(torch.float64) / maps.scale[name])
        self.grads = {name: torch.cat(p).flatten(1) for name, p in parts.items()}
        self.n = next(iter(self.grads.values())).shape[0]

    def __call__(self, x: Blocks) -> Blocks:
        dots = sum(x[name].flatten(1) @ g.T for name, g in self.grads.items())  # [n_query, n]
        assert isinstance(dots, torch.Tensor)
        return {name: (dots @ g / self.n).reshape(x[name].shape) for name, g in self.grads.items()}


class GaussNewtonProducts:
    """``x -> C H C^T x`` for the Gauss-Newton matrix of the training loss over the sample:
    ``v = C^T x`` as a tangent of the target weights, ``J v`` by forward mode, the loss's Hessian in
    the logits by double backward, ``J^T`` by a backward, back into curvature coordinates."""

    def __init__(
        self, computer: GradientComputer, maps: CurvatureMaps, batches: Sequence[Mapping[str, torch.Tensor]]
    ):
        self.computer = computer
        self.maps = maps
        self.batches = list(batches)
        self.targets: dict[str, TargetModule] = {t.name: t for t in computer.targets if t.name in maps.maps}
        self.n = sum(_batch_size(b) or 0 for b in self.batches)
        names = {id(p): n for n, p in computer.model.named_parameters()}
        self.params: dict[str, nn.Parameter] = {}  # parameter name -> parameter, each once
        for t in self.targets.values():
            for p in (t.weight_parameter, t.bias_parameter):
                if p is not None:
                    if hasattr(p, "ds_shape"):
                        raise ValueError("refine_curvature='gauss-newton' cannot run on ZeRO-3 partitioned weights; "
                                         "query on one process with the full model")  # fmt: skip
                    self.params[names[id(p)]] = p
        self.name_of = {id(p): name for name, p in self.params.items()}  # a target's parameter -> its name

    def _tangents(self, x: Blocks, j: int) -> dict[str, torch.Tensor]:
        """Query ``j``'s ``C^T x`` as one tangent per parameter (targets sharing one add up)."""
        out = {name: torch.zeros_like(p) for name, p in self.params.items()}
        for name, t in self.targets.items():
            v = self.maps.lift(name, x[name][j])
            weight = v[:, :-1] if t.bias else v
            w = self.name_of[id(t.weight_parameter)]
            t.weight_of(out[w]).add_((weight.T if t.transposed else weight).to(out[w].dtype))
            if t.bias:
                b = self.name_of[id(t.bias_parameter)]
                out[b].add_(v[:, -1].to(out[b].dtype))
        return out

    def _gradients(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each target's weight gradient ``[d_out, d_in]`` (bias column last) from parameter grads."""
        out = {}
        for name, t in self.targets.items():
            w = t.weight_of(grads[self.name_of[id(t.weight_parameter)]])
            g = w.T if t.transposed else w
            if t.bias:
                g = torch.cat([g, grads[self.name_of[id(t.bias_parameter)]][..., None]], dim=-1)
            out[name] = g
        return out

    def __call__(self, x: Blocks) -> Blocks:
        n_query = next(iter(x.values())).shape[0]
        out = {name: torch.zeros_like(v, dtype=torch.float64) for name, v in x.items()}
        computer, model = self.computer, self.computer.model
        names = list(self.params)
        primals = tuple(p.detach() for p in self.params.values())
        # eval mode, only the targets' weights requiring grad (the J^T products), hooks off
        with frozen_eval(model, self.params.values()), torch.enable_grad():
            for batch in self.batches:
                inputs = {**computer.model_inputs(batch), **computer._forward_flags}
                labels = batch["labels"].to(computer.device)
                mask = batch.get("attention_mask")
                mask = mask.to(computer.device).bool() if mask is not None else None
                logits = model_logits(model(**inputs))  # with the graph of the J^T products
                z = logits.detach().requires_grad_(True)
                loss = per_example_loss(z, labels, computer.config.loss_reduction, mask).sum()
                dz = torch.autograd.grad(loss, z, create_graph=True)[0]

                def forward(*ps: torch.Tensor, inputs: dict = inputs) -> torch.Tensor:
                    return model_logits(torch.func.functional_call(model, dict(zip(names, ps)), (), inputs))

                for j in range(n_query):
                    tangents = self._tangents(x, j)
                    with torch.no_grad(), _math_attention():
                        jv = torch.func.jvp(forward, primals, tuple(tangents[name] for name in names))[1]
                    hjv = torch.autograd.grad(dz, z, grad_outputs=jv.to(z.dtype), retain_graph=True)[0]
                    found = torch.autograd.grad(logits, list(self.params.values()), grad_outputs=hjv.to(logits.dtype),
                                                retain_graph=True, allow_unused=True)  # fmt: skip
                    grads = {name: g if g is not None else torch.zeros_like(p)
                             for (name, p), g in zip(self.params.items(), found)}  # fmt: skip
                    for name, g in self._gradients(grads).items():
                        out[name][j] += self.maps.to_curvature(name, g)
        return {name: v / self.n for name, v in out.items()}


@contextmanager
def _math_attention() -> Iterator[None]:
    """PyTorch's fused attention kernels have no forward-mode derivative; its math one has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


class Refiner:
    """Solves ``(C H C^T + D) x = b`` for query factor gradients by preconditioned conjugate
    gradients (see the module docstring).

    Args:
        computer: the attributor's ``GradientComputer`` (its targets, compressors and loss).
        preconditioner: the cache's fitted factor-space preconditioner (EK-FAC or K-FAC): the
            conjugate gradients' preconditioner, and the damping ``D``.
        basis: the cache's eigenbasis.
        batches: the training documents the curvature averages over.
        steps: curvature products (0: the preconditioner's answer alone).
        curvature: ``"gauss-newton"`` or ``"empirical"``.
    """

    def __init__(
        self,
        computer: GradientComputer,
        preconditioner: Preconditioner,
        basis: Eigenbasis,
        batches: Sequence[Mapping[str, torch.Tensor]],
        steps: int,
        curvature: str = "gauss-newton",
    ):
        if preconditioner.acts_on != "factors":
            raise ValueError(
                f"refine_steps needs a factor-space preconditioner ('ekfac' or 'kfac'), not {preconditioner.name!r}"
            )
        if curvature == "gauss-newton" and computer.loss_fn is not None:
            raise ValueError(
                "refine_curvature='gauss-newton' needs the built-in loss (its Hessian in the logits); with a "
                "per_example_loss use refine_curvature='empirical'"
            )
        self.computer, self.preconditioner, self.basis = computer, preconditioner, basis
        self.batches, self.steps, self.curvature = list(batches), steps, curvature
        self._products: EmpiricalProducts | GaussNewtonProducts | None = None

    def products(self, names: Sequence[str]) -> EmpiricalProducts | GaussNewtonProducts:
        """The curvature's products (built once: the empirical one captures the sample here)."""
        if self._products is None:
            maps = CurvatureMaps(self.computer, self.basis, names)
            if self.curvature == "empirical":
                self._products = EmpiricalProducts(
                    self.computer, maps, self.batches, self.basis.has_hashed_sides
                )
            else:
                self._products = GaussNewtonProducts(self.computer, maps, self.batches)
        return self._products

    def damping(self, name: str) -> float:
        """EK-FAC's ``lambda_l = damping * mean(eig_l)`` of module ``name``."""
        return self.preconditioner.damping * float(self.preconditioner.factors[name]["eig"].mean())

    def solve(self, b: Blocks) -> Blocks:
        """``x ~ (C H C^T + D)^-1 b`` per query (``b``: curvature coordinates, ``[n, c_out, c_in]``)."""
        precondition = self.preconditioner.apply
        z = {name: precondition(name, v) for name, v in b.items()}
        if self.steps == 0:
            return z
        products = self.products(list(b))
        x = {name: torch.zeros_like(v) for name, v in z.items()}
        r = {name: v.to(torch.float64, copy=True) for name, v in b.items()}
        p = dict(z)
        rz = _dot(r, z)
        for _ in range(self.steps):
            ap = products(p)
            ap = {name: ap[name] + self.damping(name) * p[name] for name in p}
            pap = _dot(p, ap)
            alpha = torch.where(
                pap > 0, rz / pap.clamp(min=torch.finfo(pap.dtype).tiny), torch.zeros_like(pap)
            )
            for name in x:
                x[name] += _bcast(alpha, x[name]) * p[name]
                r[name] -= _bcast(alpha, r[name]) * ap[name]
            z = {name: precondition(name, v) for name, v in r.items()}
            rz_new = _dot(r, z)
            beta = torch.where(
                rz > 0, rz_new / rz.clamp(min=torch.finfo(rz.dtype).tiny), torch.zeros_like(rz)
            )
            p = {name: z[name] + _bcast(beta, p[name]) * p[name] for name in p}
            rz = rz_new
        return x


def _dot(a: Blocks, b: Blocks) -> torch.Tensor:
    """Per query, the inner product over every module: ``[n]``."""
    return sum((a[name] * b[name]).flatten(1).sum(1) for name in a)  # type: ignore[return-value]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))
