"""The brute-force EK-FAC of ``kronfluence_oracle``, in float64, and the step-by-step diagnosis.

Per-example gradients come from batch-of-one autograd on the summed token loss (hooks read each
module's input x_t, with a trailing 1 for a bias, and output gradient delta_t; ``G_i = sum_t delta_t
x_t^T``). Then, per module: ``A = sum x x^T / tokens``, ``S = sum delta delta^T / examples``, their
``eigh``, the corrected eigenvalues ``L = mean_i (Q_S^T G_i Q_A)^2``, the damping ``lambda = damping *
mean(L)`` and ``score(q, i) = sum_modules <Q_S ((Q_S^T G_q Q_A) / (L + lambda)) Q_A^T, G_i>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_grass.capture.loss import per_example_loss
from hf_grass.compressors.factor_maps import EigenMap


@dataclass
class Parts:
    modules: list[str]
    train: dict[str, torch.Tensor]  # name -> [n, d_out, d_in] float64 per-example gradients
    queries: dict[str, torch.Tensor]  # name -> [n_query, d_out, d_in]
    cov_in: dict[str, torch.Tensor]  # sum_t x x^T / tokens
    cov_out: dict[str, torch.Tensor]  # sum_t delta delta^T / examples
    tokens: int


def _linear_view(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs with a trailing 1 when the module has a bias (Linear and HF Conv1D alike)."""
    if getattr(module, "bias", None) is not None:
        x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
    return x


def per_example_parts(
    model: nn.Module, examples: list[dict[str, Any]], modules: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Batch-of-one gradients ``[n, d_out, d_in]`` and the sums of ``x x^T`` and ``delta delta^T``."""
    grads: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    xx: dict[str, torch.Tensor] = {}
    dd: dict[str, torch.Tensor] = {}
    tokens = 0
    seen: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def hook(name: str):
        def forward(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            box: list[torch.Tensor] = []
            output.register_hook(lambda g: box.append(g.detach()))
            seen[name] = (_linear_view(mod, inputs[0].detach()), box)

        return forward

    handles = [model.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    try:
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor([ex.get("labels", ex["input_ids"])])
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits
            per_example_loss(logits, labels, "sum", None).sum().backward()
            tokens += ids.shape[1]
            for m in modules:
                x, box = seen[m]
                x, d = x[0].double(), box[0][0].double()
                grads[m].append(d.T @ x)
                xx[m] = xx.get(m, 0) + x.T @ x
                dd[m] = dd.get(m, 0) + d.T @ d
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {m: torch.stack(g) for m, g in grads.items()}, xx, dd, tokens


def reference_parts(
    model: nn.Module, train: list[dict[str, Any]], queries: list[dict[str, Any]], modules: list[str]
) -> Parts:
    g_train, xx, dd, tokens = per_example_parts(model, train, modules)
    g_query, _, _, _ = per_example_parts(model, queries, modules)
    n = len(train)
    return Parts(modules, g_train, g_query, {m: xx[m] / tokens for m in modules}, {m: dd[m] / n for m in modules}, tokens)


def eigen(parts: Parts, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q_in, Q_out, corrected eigenvalues [d_out, d_in])`` of one module."""
    _, q_in = torch.linalg.eigh(parts.cov_in[name])
    _, q_out = torch.linalg.eigh(parts.cov_out[name])
    rotated = q_out.T @ parts.train[name] @ q_in
    return q_in, q_out, rotated.square().mean(0)


def module_scores(parts: Parts, damping: float) -> dict[str, torch.Tensor]:
    """Per module ``[n_query, n_train]`` EK-FAC scores with damping ``damping * mean(L)``."""
    out = {}
    for name in parts.modules:
        q_in, q_out, lam = eigen(parts, name)
        inv = 1.0 / (lam + damping * lam.mean())
        pre = q_out @ ((q_out.T @ parts.queries[name] @ q_in) * inv) @ q_in.T
        out[name] = torch.einsum("qoi,noi->qn", pre, parts.train[name])
    return out


def ekfac_scores(parts: Parts, damping: float) -> torch.Tensor:
    return sum(module_scores(parts, damping).values())  # type: ignore[return-value]


def diagnose(parts: Parts, cache: Any, kron_dir: Path, damping: float) -> dict[str, Any]:
    """Each step of each library against the brute force, per module (worst module reported):

    - covariance spectra: hf_grass's warm-up eigenvalues (``eig_in`` / ``eig_out``, the kept
      eigen-directions) and kronfluence's, against ``eigh`` of the brute-force covariances;
    - corrected eigenvalues: each library's ``L`` against the brute-force ``L`` computed *in that
      library's own eigenbasis* (so a rotation within a degenerate eigenspace is no difference);
    - damping: each library's absolute damping against ``damping * mean(L)``.
    """
    from hf_grass.scoring.preconditioning import cache_eigenbasis, fitted_preconditioner

    basis = cache_eigenbasis(cache)
    if basis is None or not basis.eigen_masks:
        raise RuntimeError("the diagnosis reads a cache whose masks are taken in the warm-up eigenbasis")
    pre = fitted_preconditioner(cache, "ekfac", damping)
    kron = _kronfluence_factors(kron_dir)
    out: dict[str, Any] = {}
    worst: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        worst[key] = max(worst.get(key, 0.0), value)

    for name in parts.modules:
        ev_in = torch.linalg.eigvalsh(parts.cov_in[name])
        ev_out = torch.linalg.eigvalsh(parts.cov_out[name])
        mod = basis.modules[name]
        if not (isinstance(mod.map_in, EigenMap) and isinstance(mod.map_out, EigenMap)) or mod.eig_in is None \
                or mod.eig_out is None:  # fmt: skip
            raise RuntimeError(f"{name}: the diagnosis needs both sides as kept eigen-directions (no hashed side)")
        # hf_grass: eigen-directions kept in the mask's order; sort them to compare spectra
        note("hf_grass cov_in spectrum rel err", _rel(mod.eig_in.sort().values, ev_in))
        note("hf_grass cov_out spectrum rel err", _rel(mod.eig_out.sort().values, ev_out))
        # the kept eigenvectors without the masks' scale: the corrected eigenvalues are of the unscaled
        # coordinates (``EKFAC.fit`` divides the scale out)
        b_in = mod.map_in.vectors.double()
        b_out = mod.map_out.vectors.double()
        lam_grass = pre.factors[name]["eig"].double()
        lam_brute = (b_out.T @ parts.train[name] @ b_in).square().mean(0)
        note("hf_grass corrected eigenvalues rel err (own basis)", _rel(lam_grass, lam_brute))
        note("hf_grass mask scale - 1", abs(mod.scale - 1.0))
        if kron is not None and name in kron["lambda_matrix"]:
            k_in = kron["activation_eigenvectors"][name].double()
            k_out = kron["gradient_eigenvectors"][name].double()
            lam_kron = kron["lambda_matrix"][name].double() / float(kron["num_lambda_processed"][name])
            lam_kb = (k_out.T @ parts.train[name] @ k_in).square().mean(0)
            note("kronfluence corrected eigenvalues rel err (own basis)", _rel(lam_kron, lam_kb))
            a = kron["activation_covariance"][name].double() / float(kron["num_activation_covariance_processed"][name])
            note("kronfluence cov_in rel err", _rel(a, parts.cov_in[name]))
    out["worst_over_modules"] = worst
    brute = module_scores(parts, damping)
    totals = torch.stack([brute[m].abs().sum() for m in parts.modules])
    out["brute_force_share_of_|score|_per_module"] = {
        m: float(t / totals.sum()) for m, t in zip(parts.modules, totals)
    }
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def _kronfluence_factors(folder: Path) -> dict[str, dict[str, torch.Tensor]] | None:
    """kronfluence's saved factors (``factors_factors/*.safetensors``), by factor name and module."""
    from safetensors.torch import load_file

    root = next(iter(Path(folder).glob("**/factors_factors")), None)
    if root is None:
        return None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for file in root.glob("*.safetensors"):
        out[file.stem] = load_file(str(file))
    return out
