"""Spectral density by stochastic Lanczos quadrature (SLQ; Ghorbani, Krishnan & Xiao 2019; PyHessian).

For a Rademacher probe ``v`` (normalised), ``m`` Lanczos steps give the tridiagonal ``T = S diag(theta) S^T``;
the Gauss quadrature ``sum_i w_i delta(t - theta_i)`` with ``w_i = S_{1i}^2`` matches the moments
``v^T H^j v`` for ``j < 2m``. Averaging over probes estimates the spectral density ``(1/n) sum_i delta(t -
lambda_i)``; a Gaussian kernel of width ``sigma`` smooths it into a density that integrates to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fragdefense.hessian.eigen import _eigh_small, lanczos_tridiagonal
from fragdefense.hessian.hvp import HessianOperator
from fragdefense.utils.checks import check_int_in_range
from fragdefense.utils.conventions import make_generator

__all__ = ["SpectralDensity", "slq"]


@dataclass
class SpectralDensity:
    """Quadrature nodes and weights ``(B, R, m)`` of ``R`` SLQ runs for ``B`` operators of dimension ``dim``;
    each run's weights sum to 1."""

    nodes: Tensor
    weights: Tensor
    dim: int

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Gaussian-smoothed density ``(B, G)`` on ``grid (G,)``: mean over runs of
        ``sum_i w_i N(t; theta_i, sigma^2)`` (``sigma`` default: 1% of the node range)."""
        if sigma is None:
            span = float(self.nodes.max() - self.nodes.min())
            sigma = 0.01 * span if span > 0 else 1.0
        if not sigma > 0:
            raise ValueError(f"`sigma` must be > 0, got {sigma!r}")
        t = grid.to(torch.float64)[None, None, None, :]
        k = torch.exp(-0.5 * ((t - self.nodes[..., None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (self.weights[..., None] * k).sum(2).mean(1)

    def grid(self, n_points: int = 1000, sigma: float | None = None, pad: float = 6.0) -> tuple[Tensor, Tensor]:
        """A grid covering every node +- ``pad * sigma`` and the density on it: ``(grid (G,), density (B, G))``."""
        span = float(self.nodes.max() - self.nodes.min())
        s = sigma if sigma is not None else (0.01 * span if span > 0 else 1.0)
        g = torch.linspace(
            float(self.nodes.min()) - pad * s, float(self.nodes.max()) + pad * s, n_points, dtype=torch.float64
        )
        return g, self.density(g, s)

    def moment(self, j: int) -> Tensor:
        """Estimate of ``tr(H^j) / n`` per operator ``(B,)`` (exact in expectation for ``j < 2m``)."""
        return (self.weights * self.nodes**j).sum(2).mean(1)

    def trace(self) -> Tensor:
        """SLQ trace estimate ``n * E[t]`` per operator ``(B,)``."""
        return self.dim * self.moment(1)


def slq(
    op: HessianOperator,
    n_iter: int = 80,
    n_runs: int = 1,
    *,
    generator: torch.Generator | int | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral density: ``n_runs`` Lanczos runs of ``n_iter`` steps
    (full reorthogonalisation) from Rademacher probes.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        >>> sd = slq(HessianOperator.from_matrix(A), n_iter=4, generator=0)
        >>> sd.nodes.sort().values
        tensor([[[1.0000, 2.0000, 3.0000, 4.0000]]], dtype=torch.float64)
        >>> sd.weights  # Rademacher probes weigh the 4 eigenvalues equally
        tensor([[[0.2500, 0.2500, 0.2500, 0.2500]]], dtype=torch.float64)
    """
    check_int_in_range(n_iter, "n_iter", 1)
    r = check_int_in_range(n_runs, "n_runs", 1)
    generator = make_generator(generator, op.device)
    nodes, weights = [], []
    for _ in range(r):
        T, _ = lanczos_tridiagonal(op, n_iter, generator=generator)
        theta, S = _eigh_small(T)
        nodes.append(theta)
        weights.append(S[:, 0, :] ** 2)
    return SpectralDensity(torch.stack(nodes, 1), torch.stack(weights, 1), op.dim)
