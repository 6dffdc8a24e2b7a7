"""Stochastic trace estimators of a batch of symmetric operators: Hutchinson and Hutch++.

Both are unbiased; each returns its estimate with a standard error (from the spread of the per-probe
quadratic forms), so a ``+- z * std_error`` interval is a normal-approximation confidence interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fragdefense.hessian.hvp import HessianOperator
from fragdefense.utils.checks import check_int_in_range
from fragdefense.utils.conventions import make_generator

__all__ = ["TraceEstimate", "hutchinson", "hutchpp", "exact_trace"]


@dataclass
class TraceEstimate:
    """``estimate (B,)``, ``std_error (B,)`` (standard error of the stochastic part), ``n_matvecs`` (batched
    products used) and the per-probe ``samples (B, m)`` of the stochastic part."""

    estimate: Tensor
    std_error: Tensor
    n_matvecs: int
    samples: Tensor

    def interval(self, z: float = 1.96) -> tuple[Tensor, Tensor]:
        """Normal-approximation confidence interval ``estimate +- z * std_error``."""
        return self.estimate - z * self.std_error, self.estimate + z * self.std_error


def _probes(b: int, n: int, m: int, dist: str, dtype: torch.dtype, device: torch.device, gen) -> Tensor:  # noqa: ANN001
    if dist == "rademacher":
        return torch.randint(0, 2, (b, m, n), generator=gen, device=device).to(dtype) * 2 - 1
    if dist == "gaussian":
        return torch.randn(b, m, n, generator=gen, device=device, dtype=dtype)
    raise ValueError(f"unknown `distribution`={dist!r}; expected 'rademacher' or 'gaussian'")


def _gen(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    return make_generator(generator, device)  # the seeding convention: None | int seed | torch.Generator


def _stderr(samples: Tensor) -> Tensor:
    m = samples.shape[1]
    if m < 2:
        return torch.full_like(samples[:, 0], math.inf)
    return samples.std(dim=1) / math.sqrt(m)


def hutchinson(
    op: HessianOperator,
    n_samples: int = 100,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | int | None = None,
) -> TraceEstimate:
    """Hutchinson's estimator ``tr(H) ~ mean_j z_j^T H z_j`` with ``n_samples`` Rademacher (or Gaussian) probes.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> est = hutchinson(HessianOperator.from_matrix(A), 10, generator=0)
        >>> est.estimate  # exact for a diagonal matrix with Rademacher probes
        tensor([55.], dtype=torch.float64)
    """
    m = check_int_in_range(n_samples, "n_samples", 1)
    gen = _gen(generator, op.device)
    z = _probes(op.batch, op.dim, m, distribution, op.dtype, op.device, gen)
    samples = torch.stack([(op(z[:, j]) * z[:, j]).sum(1) for j in range(m)], 1)
    return TraceEstimate(samples.mean(1), _stderr(samples), m, samples)


def hutchpp(
    op: HessianOperator,
    n_matvecs: int = 99,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | int | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff, 2021): ``tr(Q^T H Q) + Hutchinson((I - QQ^T) H (I - QQ^T))``
    with ``Q`` an orthonormal basis of ``H S`` for ``n_matvecs / 3`` random probes ``S``; unbiased, and far
    more accurate than Hutchinson when a few eigenvalues dominate the trace (Hessians of trained networks).
    ``std_error`` is that of the Hutchinson part.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> U = torch.linalg.qr(torch.randn(50, 5, dtype=torch.float64))[0]
        >>> A = U @ torch.diag(torch.tensor([100.0, 50, 20, 10, 5], dtype=torch.float64)) @ U.T
        >>> est = hutchpp(HessianOperator.from_matrix(A), 15, generator=0)
        >>> round(float(est.estimate), 6)  # rank 5 <= 15 / 3 probes: exact
        185.0
    """
    m = check_int_in_range(n_matvecs, "n_matvecs", 3)
    s = m // 3
    g_n = m - 2 * s
    gen = _gen(generator, op.device)
    b, n = op.batch, op.dim
    S = _probes(b, n, s, distribution, op.dtype, op.device, gen)
    G = _probes(b, n, g_n, distribution, op.dtype, op.device, gen)
    HS = torch.stack([op(S[:, j]) for j in range(s)], 2)  # (B, n, s)
    Q, _ = torch.linalg.qr(HS)  # (B, n, s)
    HQ = torch.stack([op(Q[:, :, j].contiguous()) for j in range(s)], 2)
    t_low = (Q * HQ).sum((1, 2))
    Gp = G - torch.einsum("bns,bjs->bjn", Q, torch.einsum("bns,bjn->bjs", Q, G))  # (I - QQ^T) g_j
    samples = torch.stack([(op(Gp[:, j].contiguous()) * Gp[:, j]).sum(1) for j in range(g_n)], 1)
    return TraceEstimate(t_low + samples.mean(1), _stderr(samples), 2 * s + g_n, samples)


def exact_trace(op: HessianOperator) -> Tensor:
    """Exact traces ``(B,)`` from ``n`` products with the unit vectors (small cases).

    >>> exact_trace(HessianOperator.from_matrix(torch.eye(3)))
    tensor([3.])
    """
    eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
    return sum(op(eye[j].expand(op.batch, -1).contiguous())[:, j] for j in range(op.dim))  # type: ignore[return-value]
