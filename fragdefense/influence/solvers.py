"""Inverse Hessian-vector product solvers, batched over right-hand sides.

Every solver takes ``matvec``, a function mapping a batch of vectors ``V`` of shape ``(T, P)`` to ``V H``
(``H`` symmetric, ``(P, P)``; damping already included), and right-hand sides ``B`` ``(T, P)``, and returns
``X`` ``(T, P)`` with ``X H ~= B`` (the options listed in ``docs/background.md`` §4):

* :func:`solve_exact` — Cholesky of an explicit ``H`` (small parameter sets);
* :func:`conjugate_gradient` — CG, one independent recursion per row, all rows in one ``matvec`` call;
* :func:`lissa` — the Neumann-series recursion of Agarwal et al. used by Koh & Liang
  (``x <- b + x - x H / scale``), optionally with a stochastic (mini-batch) ``matvec``;
* :func:`arnoldi` + :func:`low_rank_inverse` — Schioppa et al.'s Arnoldi iteration: the top eigenpairs of
  ``H`` from a Krylov subspace, then ``H^-1 ~= U diag(1/lambda) U^T`` on that subspace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "solve_exact",
    "conjugate_gradient",
    "lissa",
    "arnoldi",
    "low_rank_inverse",
    "top_eigenvalue",
    "SOLVERS",
]

#: Names accepted by :class:`~fragdefense.influence.ParameterInfluence` (``solver=``).
SOLVERS = ("exact", "cg", "lissa", "arnoldi")

MatVec = Callable[[Tensor], Tensor]


def _check_rhs(b: Tensor, name: str = "b") -> Tensor:
    if not isinstance(b, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (T, P), got {type(b).__name__}")
    if b.ndim != 2:
        raise ValueError(f"`{name}` must have shape (T, P) (one right-hand side per row), got {tuple(b.shape)}")
    if not b.is_floating_point():
        raise TypeError(f"`{name}` must have a floating dtype, got {b.dtype}")
    return b


def solve_exact(hessian: Tensor, b: Tensor) -> Tensor:
    """``X = B H^-1`` by Cholesky (``H`` must be symmetric positive definite; add damping otherwise).

    >>> h = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> solve_exact(h, torch.tensor([[2.0, 4.0]], dtype=torch.float64)).round(decimals=12).tolist()
    [[1.0, 1.0]]
    """
    _check_rhs(b)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1] or hessian.shape[0] != b.shape[1]:
        raise ValueError(f"`hessian` must be ({b.shape[1]}, {b.shape[1]}), got {tuple(hessian.shape)}")
    chol, info = torch.linalg.cholesky_ex(0.5 * (hessian + hessian.T))
    if int(info) != 0:
        raise ValueError(
            "the Hessian is not positive definite (the model is not at a minimum, or the loss is flat in some "
            "direction, e.g. a softmax layer's shared-shift direction); set `damping` > 0 (e.g. 1e-3)"
        )
    return torch.cholesky_solve(b.T, chol).T


def conjugate_gradient(matvec: MatVec, b: Tensor, *, tol: float = 1e-10, max_iter: int | None = None) -> Tensor:
    """Conjugate gradient for ``X H = B``, each row its own recursion (converged rows are frozen).

    Args:
        matvec: ``V -> V H`` for ``V`` ``(T, P)``.
        b: right-hand sides ``(T, P)``.
        tol: stop a row when ``||r|| <= tol * ||b||``.
        max_iter: iterations (default ``2 P``).

    >>> h = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> x = conjugate_gradient(lambda v: v @ h, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    >>> torch.allclose(x @ h, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    True
    """
    _check_rhs(b)
    max_iter = 2 * b.shape[1] if max_iter is None else int(max_iter)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    stop = tol**2 * rs.clamp_min(torch.finfo(b.dtype).tiny)
    active = rs > stop
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        hp = matvec(p)
        php = (p * hp).sum(1)
        if bool((php[active] <= 0).any()):
            raise ValueError("conjugate gradient met a non-positive curvature p^T H p; set `damping` > 0")
        alpha = torch.where(active, rs / php.where(active, torch.ones_like(php)), torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * hp
        rs_new = (r * r).sum(1)
        beta = torch.where(active, rs_new / rs.where(active, torch.ones_like(rs)), torch.zeros_like(rs))
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs > stop)
    return x


def top_eigenvalue(
    matvec: MatVec,
    dim: int,
    *,
    iters: int = 50,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Largest eigenvalue of a symmetric PSD operator by power iteration (used to scale LiSSA).

    >>> h = torch.diag(torch.tensor([1.0, 5.0], dtype=torch.float64))
    >>> round(top_eigenvalue(lambda v: v @ h, 2), 6)
    5.0
    """
    v = torch.randn(1, dim, dtype=dtype, device=device, generator=generator)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float((w * v).sum())
        n = w.norm()
        if float(n) == 0.0:
            return 0.0
        v = w / n
    return lam


def lissa(
    matvec: MatVec,
    b: Tensor,
    *,
    scale: float,
    depth: int = 1000,
    repeats: int = 1,
    tol: float | None = None,
) -> Tensor:
    """LiSSA: ``x_{k+1} = b + x_k - x_k H / scale``, which converges to ``scale * b H^-1`` when
    ``scale > lambda_max(H)``; returns ``x / scale``, averaged over ``repeats`` runs (for stochastic ``matvec``).

    Args:
        matvec: ``V -> V H`` (may be a mini-batch estimate, drawn anew at every call).
        b: right-hand sides ``(T, P)``.
        scale: must exceed the largest eigenvalue of ``H`` (see :func:`top_eigenvalue`).
        depth: recursion depth; the error shrinks like ``(1 - lambda_min / scale) ** depth``.
        repeats: independent recursions averaged.
        tol: stop early when the update's relative norm falls below ``tol`` (deterministic ``matvec`` only).

    >>> h = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> x = lissa(lambda v: v @ h, torch.tensor([[1.0, 0.0]], dtype=torch.float64), scale=5.0, depth=500)
    >>> torch.allclose(x @ h, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    True
    """
    _check_rhs(b)
    if not scale > 0:
        raise ValueError(f"`scale` must be > 0 (above the Hessian's largest eigenvalue), got {scale!r}")
    if int(depth) < 1 or int(repeats) < 1:
        raise ValueError(f"`depth` and `repeats` must be >= 1, got {depth!r}, {repeats!r}")
    out = torch.zeros_like(b)
    for _ in range(int(repeats)):
        x = b.clone()
        for _ in range(int(depth)):
            step = b - matvec(x) / scale
            x = x + step
            if tol is not None and float(step.norm()) <= tol * float(x.norm()):
                break
        out = out + x
    return out / (scale * int(repeats))


def arnoldi(
    matvec: MatVec,
    dim: int,
    *,
    n_iter: int = 100,
    rank: int = 50,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs of a symmetric operator from ``n_iter`` Arnoldi steps (Schioppa et al., 2022).

    Builds an orthonormal Krylov basis ``Q`` (full re-orthogonalisation, twice) and the projected matrix
    ``Q^T H Q``; its eigenpairs, mapped back by ``Q``, approximate the extreme eigenpairs of ``H``.

    Returns:
        ``(eigenvalues (r,), eigenvectors (r, P))``, largest first, ``r = min(rank, Krylov dimension)``.

    >>> h = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> vals, vecs = arnoldi(lambda v: v @ h, 5, n_iter=5, rank=2)
    >>> vals.round(decimals=6).tolist()
    [5.0, 4.0]
    """
    n_iter = min(int(n_iter), int(dim))
    if n_iter < 1 or int(rank) < 1:
        raise ValueError(f"`n_iter` and `rank` must be >= 1, got {n_iter!r}, {rank!r}")
    q = torch.randn(dim, dtype=dtype, device=device, generator=generator)
    basis = [q / q.norm()]
    for _ in range(n_iter - 1):
        w = matvec(basis[-1][None])[0]
        Q = torch.stack(basis)
        for _ in range(2):  # re-orthogonalise twice (classical Gram-Schmidt, numerically like modified GS)
            w = w - (Q @ w) @ Q
        n = w.norm()
        if float(n) <= 1e-10 * float(basis[0].abs().sum() + 1):
            break  # invariant subspace found
        basis.append(w / n)
    Q = torch.stack(basis)  # (k, P)
    HQ = torch.cat([matvec(Q[i : i + 64]) for i in range(0, Q.shape[0], 64)])  # (k, P)
    T = Q @ HQ.T
    vals, vecs = torch.linalg.eigh(0.5 * (T + T.T))
    order = torch.argsort(vals, descending=True)[: int(rank)]
    return vals[order], (vecs[:, order].T @ Q)


def low_rank_inverse(eigenvalues: Tensor, eigenvectors: Tensor, b: Tensor, *, damping: float = 0.0) -> Tensor:
    """``B U^T diag(1 / (lambda + damping)) U`` — the inverse on the subspace of ``eigenvectors`` ``(r, P)``
    (components outside it are dropped, as in Schioppa et al.). Eigenvalues ``<= 0`` are dropped.

    >>> u = torch.eye(2, dtype=torch.float64)
    >>> lam, b = torch.tensor([2.0, 4.0], dtype=torch.float64), torch.tensor([[2.0, 4.0]], dtype=torch.float64)
    >>> low_rank_inverse(lam, u, b).tolist()
    [[1.0, 1.0]]
    """
    _check_rhs(b)
    lam = eigenvalues + damping
    keep = lam > 0
    u = eigenvectors[keep]
    return ((b @ u.T) / lam[keep]) @ u
