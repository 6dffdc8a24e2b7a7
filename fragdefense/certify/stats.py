"""Batched statistics for randomized-smoothing certificates, in plain torch (float64, on the input's device).

* :func:`betainc`: the regularized incomplete beta function ``I_x(a, b)`` (torch has no ``betainc``); continued
  fraction with the modified Lentz algorithm (Press et al., "Numerical Recipes", section 6.4), vectorised.
* :func:`binom_test_one_sided`: p-value of the one-sided binomial test ``H0: p <= p0`` against ``p > p0``,
  ``P(X >= k | n, p0) = I_{p0}(k, n - k + 1)`` (scipy's ``binomtest(k, n, p0, alternative="greater")``).
* :func:`clopper_pearson_lower`: the one-sided Clopper-Pearson lower confidence bound, the ``alpha`` quantile of
  ``Beta(k, n - k + 1)`` (scipy's ``beta.ppf(alpha, k, n - k + 1)``), by bisection on :func:`betainc` followed by
  Newton steps; :func:`clopper_pearson_upper` by the symmetry ``upper(k) = 1 - lower(n - k)``.
* :func:`bonferroni`, :func:`holm`: multiple-testing corrections over the last dimension (the pixels of an image);
  :func:`norm_ppf`: ``Phi^-1`` (``torch.special.ndtri``).

All functions accept tensors (or numbers) that broadcast, and return float64 / bool tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "betainc",
    "binom_test_one_sided",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "bonferroni",
    "holm",
    "norm_ppf",
    "norm_cdf",
]

_FPMIN = 1e-300
_EPS = 1e-15


def _f64(v: Any, device: torch.device | None = None) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(dtype=torch.float64, device=device if device is not None else v.device)
    return torch.as_tensor(v, dtype=torch.float64, device=device)


def _device(*vs: Any) -> torch.device | None:
    return next((v.device for v in vs if isinstance(v, Tensor)), None)


def _betacf(a: Tensor, b: Tensor, x: Tensor, max_iter: int = 100000) -> Tensor:
    """Continued fraction of ``I_x(a, b)`` (modified Lentz), converged element-wise to ~1e-15."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = torch.ones_like(x)
    d = 1.0 - qab * x / qap
    d = torch.where(d.abs() < _FPMIN, torch.full_like(d, _FPMIN), d).reciprocal()
    h = d.clone()
    done = torch.zeros_like(x, dtype=torch.bool)
    for m in range(1, max_iter + 1):
        m2 = 2.0 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = torch.where(d.abs() < _FPMIN, torch.full_like(d, _FPMIN), d).reciprocal()
        c = 1.0 + aa / c
        c = torch.where(c.abs() < _FPMIN, torch.full_like(c, _FPMIN), c)
        h = torch.where(done, h, h * d * c)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = torch.where(d.abs() < _FPMIN, torch.full_like(d, _FPMIN), d).reciprocal()
        c = 1.0 + aa / c
        c = torch.where(c.abs() < _FPMIN, torch.full_like(c, _FPMIN), c)
        de = d * c
        h = torch.where(done, h, h * de)
        done = done | ((de - 1.0).abs() < _EPS)
        if m % 4 == 0 and bool(done.all()):
            break
    return h


def betainc(a: Tensor | float, b: Tensor | float, x: Tensor | float) -> Tensor:
    """Regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``x`` in ``[0, 1]`` (float64).

    >>> round(float(betainc(2.0, 3.0, 0.4)), 10)  # 1 - P(Binomial(4, 0.4) <= 1)
    0.5248
    """
    dev = _device(a, b, x)
    a, b, x = torch.broadcast_tensors(_f64(a, dev), _f64(b, dev), _f64(x, dev))
    swap = x > (a + 1.0) / (a + b + 2.0)
    a2, b2 = torch.where(swap, b, a), torch.where(swap, a, b)
    x2 = torch.where(swap, 1.0 - x, x).clamp(0.0, 1.0)
    inner = x2.clamp(1e-300, 1.0 - 1e-16)
    log_front = (
        torch.lgamma(a2 + b2) - torch.lgamma(a2) - torch.lgamma(b2) + a2 * torch.log(inner) + b2 * torch.log1p(-inner)
    )
    r = torch.exp(log_front) * _betacf(a2, b2, inner) / a2
    r = torch.where(x2 <= 0.0, torch.zeros_like(r), r)
    out = torch.where(swap, 1.0 - r, r)
    return out.clamp(0.0, 1.0)


def binom_test_one_sided(k: Tensor | int, n: Tensor | int, p: Tensor | float) -> Tensor:
    """p-value ``P(X >= k)``, ``X ~ Binomial(n, p)``: the one-sided test of ``H0: p_true <= p`` (scipy's
    ``binomtest(k, n, p, alternative="greater").pvalue``). ``k = 0`` gives 1.

    >>> round(float(binom_test_one_sided(9, 10, 0.5)), 10)  # 11 / 1024
    0.0107421875
    """
    dev = _device(k, n, p)
    k, n, p = torch.broadcast_tensors(_f64(k, dev), _f64(n, dev), _f64(p, dev))
    return _binom_tail(k, n, p)


_EXACT_SUM_CELLS = 1 << 18


class _BinomTail:
    """``p -> P(X >= k)``, ``X ~ Binomial(n, p)``, for fixed broadcast float64 ``k``, ``n``: a log-sum-exp of the
    probability mass function (log binomial coefficients computed once) when ``numel * (n + 1)`` is small (exact
    and cheap for the ``n`` of certification), else ``I_p(k, n - k + 1)`` by :func:`betainc`."""

    def __init__(self, k: Tensor, n: Tensor) -> None:
        self.k, self.n = k, n
        n_max = int(n.max()) if n.numel() else 0
        self.exact = k.numel() * (n_max + 1) <= _EXACT_SUM_CELLS
        if self.exact and k.numel():
            j = torch.arange(n_max + 1, device=k.device, dtype=torch.float64)
            kk, nn_ = k.reshape(-1, 1), n.reshape(-1, 1)
            self.j, self.nj = j, (nn_ - j).clamp_min(0.0)
            log_choose = torch.lgamma(nn_ + 1.0) - torch.lgamma(j + 1.0) - torch.lgamma(self.nj + 1.0)
            self.log_choose = torch.where((j <= nn_) & (j >= kk), log_choose, torch.full_like(log_choose, -math.inf))

    def log(self, p: Tensor) -> Tensor:
        """``log P(X >= k)`` (``-inf`` where the tail underflows)."""
        k, n = self.k, self.n
        if k.numel() == 0:
            return torch.zeros_like(k)
        if self.exact:
            pp = p.reshape(-1, 1)
            log_pmf = self.log_choose + torch.xlogy(self.j, pp) + torch.xlogy(self.nj, 1.0 - pp)
            top = log_pmf.amax(dim=1, keepdim=True)  # torch.logsumexp is slow on -inf entries
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            rel = log_pmf - top
            rel = torch.where(rel > -700.0, rel, torch.full_like(rel, -math.inf))  # no denormals: exp is slow on them
            out = (top[:, 0] + rel.exp().sum(dim=1).log()).clamp_max(0.0).reshape(k.shape)
        else:
            safe_k = k.clamp_min(1.0)
            out = betainc(safe_k, (n - safe_k + 1.0).clamp_min(1.0), p).log()
        return torch.where(k <= 0, torch.zeros_like(out), out)

    def __call__(self, p: Tensor) -> Tensor:
        return self.log(p).exp()


def _binom_tail(k: Tensor, n: Tensor, p: Tensor) -> Tensor:
    return _BinomTail(k, n)(p)


def clopper_pearson_lower(k: Tensor | int, n: Tensor | int, alpha: Tensor | float) -> Tensor:
    """One-sided Clopper-Pearson lower confidence bound of a binomial proportion at level ``1 - alpha``: the
    ``p`` with ``P(X >= k | n, p) = alpha``, i.e. ``Beta(k, n - k + 1).ppf(alpha)``; 0 for ``k = 0`` and
    ``alpha ** (1 / n)`` for ``k = n``. Newton steps on ``log P(X >= k | p)`` in ``log p`` from the Wilson score bound,
    safeguarded by bisection; the tail is an exact sum of the mass function for moderate ``n`` and
    :func:`betainc` otherwise.

    >>> round(float(clopper_pearson_lower(10, 10, 0.05)), 12) == round(0.05 ** 0.1, 12)
    True
    >>> float(clopper_pearson_lower(0, 10, 0.05))
    0.0
    """
    dev = _device(k, n, alpha)
    k, n, alpha = torch.broadcast_tensors(_f64(k, dev), _f64(n, dev), _f64(alpha, dev))
    if k.numel() == 0:
        return k.clone()
    a = k.clamp_min(1.0)
    b = (n - k + 1.0).clamp_min(1.0)
    tail = _BinomTail(k, n)
    log_alpha = alpha.log()
    log_norm = torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)
    # start: the Wilson score bound; then safeguarded Newton on log P(X >= k | p) - log(alpha) (increasing) in log p
    z = norm_ppf(1.0 - alpha)
    nn_ = n.clamp_min(1.0)
    ph = k / nn_
    den = 1.0 + z * z / nn_
    p = ((ph + z * z / (2 * nn_)) - z * torch.sqrt(ph * (1 - ph) / nn_ + z * z / (4 * nn_ * nn_))) / den
    p = torch.where((p > 1e-300) & (p < 1.0), p, torch.full_like(p, 0.5))
    lo, hi = torch.zeros_like(k), torch.ones_like(k)
    trivial = (k <= 0) | (k >= n)  # closed forms below
    for _ in range(200):
        lt = tail.log(p)
        g = lt - log_alpha
        hi = torch.where(g > 0, p, hi)
        lo = torch.where(g > 0, lo, p)
        log_dens = log_norm + (a - 1.0) * torch.log(p) + (b - 1.0) * torch.log1p(-p)
        # Newton in u = log p (log P(X >= k) is close to linear in log p for small p)
        cand = torch.exp(torch.log(p) - g / torch.exp(log_dens - lt + torch.log(p)))
        mid = torch.where(lo > 0.01 * hi, 0.5 * (lo + hi), torch.sqrt(lo.clamp_min(1e-300) * hi))
        ok = torch.isfinite(cand) & (cand >= lo) & (cand <= hi)
        new = torch.where(ok, cand, mid)
        done = (ok & ((cand - p).abs() <= 1e-12 * p)) | (hi - lo <= 1e-14 * hi) | trivial
        p = new
        if bool(done.all()):
            break
    p = torch.where(k >= n, alpha ** (1.0 / n.clamp_min(1.0)), p)
    return torch.where(k <= 0, torch.zeros_like(p), p)


def clopper_pearson_upper(k: Tensor | int, n: Tensor | int, alpha: Tensor | float) -> Tensor:
    """One-sided Clopper-Pearson upper bound at level ``1 - alpha``: ``1 - clopper_pearson_lower(n - k, n, alpha)``
    (``Beta(k + 1, n - k).ppf(1 - alpha)``; 1 for ``k = n``).

    >>> float(clopper_pearson_upper(10, 10, 0.05))
    1.0
    """
    dev = _device(k, n, alpha)
    k, n = _f64(k, dev), _f64(n, dev)
    return 1.0 - clopper_pearson_lower(n - k, n, alpha)


def bonferroni(p_values: Tensor, alpha: float) -> Tensor:
    """Reject ``H0`` where ``p <= alpha / m``, ``m`` = size of the last dimension (the family).

    >>> bonferroni(torch.tensor([[0.001, 0.02, 0.5]]), 0.05).tolist()
    [[True, False, False]]
    """
    m = p_values.shape[-1]
    return p_values <= alpha / m


def holm(p_values: Tensor, alpha: float) -> Tensor:
    """Holm's step-down procedure ("A Simple Sequentially Rejective Multiple Test Procedure", Holm 1979) over the
    last dimension: sort the ``m`` p-values ascending and reject ``H0_(1) .. H0_(j)`` while
    ``p_(i) <= alpha / (m - i + 1)``. Controls the family-wise error rate at ``alpha`` like Bonferroni and rejects
    at least as many hypotheses.

    >>> holm(torch.tensor([[0.01, 0.04, 0.03, 0.2]]), 0.1).tolist()
    [[True, True, True, False]]
    """
    m = p_values.shape[-1]
    sorted_p, order = torch.sort(p_values, dim=-1, stable=True)
    thr = alpha / torch.arange(m, 0, -1, device=p_values.device, dtype=torch.float64)
    ok = (sorted_p.to(torch.float64) <= thr).to(torch.int64).cumprod(dim=-1).bool()
    return torch.zeros_like(ok).scatter(-1, order, ok)


def norm_ppf(q: Tensor | float) -> Tensor:
    """``Phi^-1(q)``, the standard normal quantile (``torch.special.ndtri``), float64.

    >>> round(float(norm_ppf(0.975)), 6)
    1.959964
    """
    return torch.special.ndtri(_f64(q))


def norm_cdf(z: Tensor | float) -> Tensor:
    """``Phi(z)`` (``torch.special.ndtr``), float64.

    >>> float(norm_cdf(0.0))
    0.5
    """
    return torch.special.ndtr(_f64(z))


def _check_level(alpha: float, name: str = "alpha") -> float:
    if isinstance(alpha, bool):
        raise TypeError(f"`{name}` must be a number in (0, 1), got {alpha!r}")
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number in (0, 1), got {alpha!r}") from None
    if not (0.0 < a < 1.0) or not math.isfinite(a):
        raise ValueError(f"`{name}` must be in (0, 1), got {alpha!r}")
    return a
