"""Top eigenpairs of a batch of symmetric operators: Lanczos with full reorthogonalisation, deflated power
iteration (PyHessian's method, for comparison), and exact eigendecomposition for small cases.

All routines take a :class:`~fragdefense.hessian.hvp.HessianOperator` of ``B`` independent operators and run
the ``B`` problems together (one batched product per iteration).
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

__all__ = ["EigenResult", "lanczos", "lanczos_tridiagonal", "power_iteration", "exact_eigen", "WHICH"]

Which = Literal["LA", "LM", "SA"]
WHICH: tuple[str, ...] = ("LA", "LM", "SA")


@dataclass
class EigenResult:
    """Eigenpairs of ``B`` operators: ``eigenvalues (B, k)`` (sorted by the ``which`` criterion, best first),
    ``eigenvectors (B, k, n)`` (unit norm, or ``None``), ``residuals (B, k)`` (``||H v - lambda v||``; ``None``
    for exact results), ``converged (B,)``, ``n_iter`` (batched products used)."""

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor | None
    converged: Tensor
    n_iter: int


def _random_unit(b: int, n: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator | None) -> Tensor:
    v = torch.randn(b, n, dtype=dtype, device=device, generator=gen)
    return v / v.norm(dim=1, keepdim=True)


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices sorting Ritz values ``(B, m)`` by the ``which`` criterion, best first."""
    if which == "LA":
        key = theta
    elif which == "SA":
        key = -theta
    elif which == "LM":
        key = theta.abs()
    else:
        raise ValueError(f"unknown `which`={which!r}; expected one of {WHICH}")
    return torch.argsort(key, dim=1, descending=True)


def _eigh_small(T: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of small (tridiagonal) matrices ``(B, m, m)`` in float64 via LAPACK through numpy (on CPU,
    ``torch.linalg.eigh`` costs ~30 ms for a 30 x 30 matrix, numpy < 1 ms)."""
    import numpy as np

    w, v = np.linalg.eigh(T.detach().to("cpu", torch.float64).numpy())
    return torch.from_numpy(w).to(T.device), torch.from_numpy(v).to(T.device)


def _project_out(w: Tensor, Q: Tensor) -> Tensor:
    """``w - Q^T (Q w)`` for a batch: ``w (B, n)``, orthonormal rows ``Q (B, j, n)``."""
    return w - torch.bmm(torch.bmm(Q, w[:, :, None]).transpose(1, 2), Q)[:, 0]


def _generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    return make_generator(generator, device)  # the seeding convention: None | int seed | torch.Generator


def lanczos_tridiagonal(
    op: HessianOperator,
    n_iter: int,
    *,
    v0: Tensor | None = None,
    reorth: bool = True,
    generator: torch.Generator | int | None = None,
) -> tuple[Tensor, Tensor]:
    """``n_iter`` Lanczos steps from ``v0`` (default: Rademacher, normalised); returns the tridiagonal
    ``T (B, m, m)`` (float64) and the orthonormal basis ``Q (B, m, n)`` (``m = min(n_iter, n)``). With ``reorth``
    every new vector is orthogonalised twice against the whole basis (classical Gram-Schmidt, twice is enough),
    which keeps ``Q`` orthonormal to working precision; a breakdown (invariant subspace found) continues with a
    fresh random vector orthogonal to the basis.

    Used by stochastic Lanczos quadrature (:func:`fragdefense.hessian.density.slq`).

    >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> T, Q = lanczos_tridiagonal(HessianOperator.from_matrix(A), 5, generator=0)
    >>> torch.allclose(torch.linalg.eigvalsh(T[0]), torch.arange(1.0, 6.0, dtype=torch.float64))
    True
    """
    b, n = op.batch, op.dim
    m = min(check_int_in_range(n_iter, "n_iter", 1), n)
    gen = _generator(generator, op.device)
    if v0 is None:
        q = torch.randint(0, 2, (b, n), generator=gen, device=op.device).to(op.dtype) * 2 - 1
    else:
        q = v0.to(op.dtype).reshape(b, n).clone()
    q = q / q.norm(dim=1, keepdim=True)
    Q = torch.zeros(b, m, n, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(b, m, dtype=torch.float64, device=op.device)
    beta = torch.zeros(b, max(m - 1, 0), dtype=torch.float64, device=op.device)
    for j in range(m):
        Q[:, j] = q
        w = op(q)
        a = (w * q).sum(1)
        alpha[:, j] = a.double()
        if j + 1 == m:
            break
        w = w - a[:, None] * q
        if j > 0:
            w = w - beta[:, j - 1, None].to(op.dtype) * Q[:, j - 1]
        if reorth:
            for _ in range(2):
                w = _project_out(w, Q[:, : j + 1])
        nb = w.norm(dim=1)
        scale = alpha[:, : j + 1].abs().amax(1).to(op.dtype).clamp_min(torch.finfo(op.dtype).tiny)
        broke = nb <= 1e3 * torch.finfo(op.dtype).eps * scale
        if broke.any():
            r = _random_unit(b, n, op.dtype, op.device, gen)
            for _ in range(2):
                r = _project_out(r, Q[:, : j + 1])
            r = r / r.norm(dim=1, keepdim=True)
            nb = torch.where(broke, torch.zeros_like(nb), nb)
            q = torch.where(broke[:, None], r, w / nb.clamp_min(torch.finfo(op.dtype).tiny)[:, None])
        else:
            q = w / nb[:, None]
        beta[:, j] = nb.double()
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return T, Q


def lanczos(
    op: HessianOperator,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    which: Which = "LA",
    v0: Tensor | None = None,
    generator: torch.Generator | int | None = None,
    return_vectors: bool = True,
    min_iter: int | None = None,
    compact: bool = True,
) -> EigenResult:
    """Top-``k`` eigenpairs of each of the ``B`` operators by Lanczos with full reorthogonalisation.

    An operator is done when each of its ``k`` wanted Ritz pairs ``(theta, y)`` satisfies the eigenvalue error
    bound ``min(r, r^2 / gap) <= tol * |theta|`` (``r = ||H y - theta y|| = beta_m |s_m|``, ``gap`` = distance to
    the nearest other Ritz value; Parlett, *The Symmetric Eigenvalue Problem*, ch. 11), or after ``max_iter``
    products (capped at ``n``: ``n`` steps give the exact spectrum). With ``compact`` and an operator that can be
    restricted to a subset of its batch (:meth:`HessianOperator.restrict`, e.g. input Hessians), finished
    operators leave the batch, so the batch costs what its slowest members need, not ``B`` times that.

    A single Krylov space holds one copy of a repeated eigenvalue: with ``k > 1`` and an exactly repeated top
    eigenvalue the later pairs are the next distinct ones (use :func:`power_iteration`, which deflates, or
    :func:`exact_eigen` when multiplicities matter).

    Args:
        op: the operators (e.g. :func:`~fragdefense.hessian.param_hessian`, :func:`~fragdefense.hessian.input_hessian`).
        k: number of eigenpairs.
        max_iter: maximum products per operator.
        tol: relative eigenvalue tolerance (see above).
        which: ``"LA"`` largest algebraic (default), ``"LM"`` largest magnitude, ``"SA"`` smallest algebraic.
        v0: start vectors ``(B, n)`` (default: random Gaussian from ``generator``).
        return_vectors: also return the Ritz vectors ``(B, k, n)``.
        min_iter: run at least this many steps (default ``k + 1``).
        compact: drop finished operators from the batch (when the operator supports it).

    Example:
        >>> A = torch.diag(torch.tensor([5.0, -7.0, 1.0, 0.5], dtype=torch.float64))
        >>> r = lanczos(HessianOperator.from_matrix(A), k=2, generator=0)
        >>> r.eigenvalues.round(decimals=8)
        tensor([[5., 1.]], dtype=torch.float64)
        >>> lanczos(HessianOperator.from_matrix(A), k=1, which="LM", generator=0).eigenvalues.round(decimals=8)
        tensor([[-7.]], dtype=torch.float64)
    """
    b, n = op.batch, op.dim
    k = check_int_in_range(k, "k", 1, n)
    m_max = min(check_int_in_range(max_iter, "max_iter", 1), n)
    k = min(k, m_max)
    if which not in WHICH:
        raise ValueError(f"unknown `which`={which!r}; expected one of {WHICH}")
    if not (tol >= 0):
        raise ValueError(f"`tol` must be a number >= 0, got {tol!r}")
    m_min = min(max(k + 1, min_iter or 0), n)
    gen = _generator(generator, op.device)
    dt, dev = op.dtype, op.device
    if v0 is None:
        q = _random_unit(b, n, dt, dev, gen)
    else:
        q = v0.to(dt).reshape(b, n)
        q = q / q.norm(dim=1, keepdim=True)
    Q = torch.zeros(b, m_max, n, dtype=dt, device=dev)
    alpha = torch.zeros(b, m_max, dtype=torch.float64, device=dev)
    beta = torch.zeros(b, m_max, dtype=torch.float64, device=dev)
    tiny = torch.finfo(dt).tiny
    out_val = torch.zeros(b, k, dtype=dt, device=dev)
    out_res = torch.zeros(b, k, dtype=dt, device=dev)
    out_vec = torch.zeros(b, k, n, dtype=dt, device=dev) if return_vectors else None
    out_conv = torch.zeros(b, dtype=torch.bool, device=dev)
    active = torch.arange(b, device=dev)  # original index of each row of the current operator
    steps = 0
    prev_th: Tensor | None = None

    def finalize(rows: Tensor, theta: Tensor, S: Tensor, m: int, j: int, conv: Tensor) -> None:
        idx = _order(theta[rows], which)[:, :k]
        dst = active[rows]
        out_val[dst] = theta[rows].gather(1, idx).to(dt)
        out_res[dst] = (beta[rows, j, None] * S[rows, -1, :].abs()).gather(1, idx).to(dt)
        out_conv[dst] = conv[rows]
        if out_vec is not None:
            Sk = S[rows].gather(2, idx[:, None, :].expand(-1, m, -1)).to(dt)  # (b', m, k)
            vecs = torch.bmm(Sk.transpose(1, 2), Q[rows, :m])
            out_vec[dst] = vecs / vecs.norm(dim=2, keepdim=True)

    for j in range(m_max):
        Q[:, j] = q
        w = op(q)
        a = (w * q).sum(1)
        alpha[:, j] = a.double()
        # full reorthogonalisation (two passes of classical Gram-Schmidt) subsumes the three-term recurrence
        for _ in range(2):
            w = _project_out(w, Q[:, : j + 1])
        nb = w.norm(dim=1)
        beta[:, j] = nb.double()
        m = steps = j + 1
        T = torch.diag_embed(alpha[:, :m])
        if m > 1:
            T = T + torch.diag_embed(beta[:, : m - 1], 1) + torch.diag_embed(beta[:, : m - 1], -1)
        theta, S = _eigh_small(T)
        done = torch.zeros(op.batch, dtype=torch.bool, device=dev)
        if m >= m_min:
            # "LM" watches both ends of the spectrum: the largest-magnitude value may still be growing at the
            # other end when the current leader has converged
            sets = ("LA", "SA") if which == "LM" else (which,)
            idx = torch.cat([_order(theta, w_)[:, : min(k, m)] for w_ in sets], 1)
            th = theta.gather(1, idx)
            r = (beta[:, j, None] * S[:, -1, :].abs()).gather(1, idx)
            if m > 1:
                d = (theta[:, None, :] - th[:, :, None]).abs()
                d = d.scatter(2, idx[:, :, None], math.inf)  # not the value itself
                gap = d.amin(2)
            else:
                gap = torch.full_like(th, math.inf)
            err = torch.minimum(r, r * r / gap)
            # the gap is estimated from Ritz values, which is optimistic early on: also require the watched Ritz
            # values to have moved by less than the tolerance since the previous step
            moved = (th - prev_th).abs() if prev_th is not None else torch.full_like(th, math.inf)
            ref = th.abs().amax(1, keepdim=True) if which == "LM" else th.abs()
            scale_th = tol * ref.clamp_min(1e-300)
            done = ((err <= scale_th) & (moved <= scale_th)).all(1) | (m == n)
            prev_th = th
        if bool(done.all()) or m == m_max:
            finalize(torch.arange(op.batch, device=dev), theta, S, m, j, done)
            break
        n_done = int(done.sum())
        if compact and n_done and op.can_restrict and 4 * n_done >= op.batch:
            finalize(done.nonzero().flatten(), theta, S, m, j, done)
            keep = ~done
            op = op.restrict(keep)
            active, Q, alpha, beta, w, nb = active[keep], Q[keep], alpha[keep], beta[keep], w[keep], nb[keep]
            prev_th = prev_th[keep] if prev_th is not None else None
        scale = alpha[:, :m].abs().amax(1).to(dt).clamp_min(tiny)
        broke = nb <= 1e3 * torch.finfo(dt).eps * scale
        if broke.any():  # invariant subspace: continue with a random vector orthogonal to the basis
            rnd = _random_unit(op.batch, n, dt, dev, gen)
            for _ in range(2):
                rnd = _project_out(rnd, Q[:, :m])
            rnd = rnd / rnd.norm(dim=1, keepdim=True)
            beta[:, j] = torch.where(broke, torch.zeros_like(beta[:, j]), beta[:, j])
            q = torch.where(broke[:, None], rnd, w / nb.clamp_min(tiny)[:, None])
        else:
            q = w / nb[:, None]
    return EigenResult(out_val, out_vec, out_res, out_conv, steps)


def power_iteration(
    op: HessianOperator,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | int | None = None,
) -> EigenResult:
    """Top-``k`` largest-magnitude eigenpairs by power iteration with deflation (the algorithm of PyHessian's
    ``hessian.eigenvalues``): each pair starts from a random vector kept orthogonal to the pairs found before
    and stops when the Rayleigh quotient changes by less than ``tol`` (relative) between two products, or after
    ``max_iter`` products. Slower and less accurate than :func:`lanczos`; provided as the baseline.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, -2.0, 1.0, 0.5], dtype=torch.float64))
        >>> r = power_iteration(HessianOperator.from_matrix(A), k=2, tol=1e-10, max_iter=500, generator=0)
        >>> [round(v, 4) for v in r.eigenvalues[0].tolist()]
        [5.0, -2.0]
    """
    b, n = op.batch, op.dim
    k = check_int_in_range(k, "k", 1, n)
    check_int_in_range(max_iter, "max_iter", 1)
    gen = _generator(generator, op.device)
    found: list[Tensor] = []
    evals, res, total, conv = [], [], 0, torch.ones(b, dtype=torch.bool, device=op.device)

    def deflate(v: Tensor) -> Tensor:
        for u in found:
            v = v - (v * u).sum(1, keepdim=True) * u
        return v

    for _ in range(k):
        v = deflate(_random_unit(b, n, op.dtype, op.device, gen))
        v = v / v.norm(dim=1, keepdim=True)
        lam = None
        ok = torch.zeros(b, dtype=torch.bool, device=op.device)
        for _ in range(max_iter):
            v = deflate(v)
            v = v / v.norm(dim=1, keepdim=True)
            hv = op(v)
            total += 1
            new = (hv * v).sum(1)
            if lam is not None:
                ok = (new - lam).abs() <= tol * (lam.abs() + 1e-6)
                if bool(ok.all()):
                    lam = new
                    break
            lam = new
            v = hv / hv.norm(dim=1, keepdim=True).clamp_min(torch.finfo(op.dtype).tiny)
        res.append((hv - lam[:, None] * v).norm(dim=1))
        v = deflate(v)
        v = v / v.norm(dim=1, keepdim=True)
        found.append(v)
        evals.append(lam)
        conv &= ok
    return EigenResult(torch.stack(evals, 1), torch.stack(found, 1), torch.stack(res, 1), conv, total)


def exact_eigen(op: HessianOperator | Tensor, k: int | None = None, which: Which = "LA") -> EigenResult:
    """Exact eigenpairs of small operators (dense matrices from ``n`` products, then ``torch.linalg.eigh``).

    >>> r = exact_eigen(torch.diag(torch.tensor([1.0, 3.0, 2.0])), k=2)
    >>> r.eigenvalues
    tensor([[3., 2.]])
    """
    H = op if isinstance(op, Tensor) else op.dense()
    if H.ndim == 2:
        H = H[None]
    H = 0.5 * (H + H.transpose(1, 2))
    theta, S = torch.linalg.eigh(H)
    idx = _order(theta, which)[:, : (k or H.shape[1])]
    vecs = S.gather(2, idx[:, None, :].expand(-1, H.shape[1], -1)).transpose(1, 2)
    return EigenResult(theta.gather(1, idx), vecs, None, torch.ones(H.shape[0], dtype=torch.bool), H.shape[1])
