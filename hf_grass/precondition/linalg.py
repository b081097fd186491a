"""The small float64 linear algebra every preconditioner shares."""

from __future__ import annotations

import torch


def symmetrise(mat: torch.Tensor) -> torch.Tensor:
    """``(M + M^T) / 2`` in float64 on the CPU: sums of outer products are symmetric only up to
    rounding, and ``eigh`` reads one triangle."""
    mat = mat.to(torch.float64).cpu()
    return (mat + mat.T) / 2


def eigh_psd(
    mat: torch.Tensor, dtype: torch.dtype = torch.float64, keep_device: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: a covariance has none below) and eigenvectors of a symmetrised
    matrix, float64; ``dtype=torch.float32`` decomposes in single precision (half the time on a CPU;
    the warm-up's masks keep eigen-directions drawn at random, which float32 gives orthonormal to
    ~1e-6, and its eigenvalues only scale the whitening). ``keep_device``: decompose where the matrix
    lives (a GPU decomposes a 4096-wide covariance in a fraction of a second) instead of on the CPU."""
    mat = mat.to(dtype) if keep_device else mat.cpu().to(dtype)
    eig, vecs = torch.linalg.eigh((mat + mat.T) / 2)
    return eig.clamp(min=0).double(), vecs.double()


def rotate(q_out: torch.Tensor, q_in: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """Factor-space gradients ``[B, m_out, m_in]`` in a Kronecker eigenbasis: ``Q_out^T G' Q_in``
    (float64)."""
    q_in = q_in.to(gp.device, torch.float64)
    q_out = q_out.to(gp.device, torch.float64)
    return q_out.T @ gp.to(torch.float64) @ q_in


def unrotate(q_out: torch.Tensor, q_in: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rotate``: ``Q_out G' Q_in^T`` (float64)."""
    q_in = q_in.to(gp.device, torch.float64)
    q_out = q_out.to(gp.device, torch.float64)
    return q_out @ gp.to(torch.float64) @ q_in.T
