"""Certified attributions by randomized smoothing.

**Pixel-level certificates** (:func:`certify_attribution`), after Anani, Lorenz, Fritz & Schiele, "Pixel-level
Certified Explanations via Randomized Smoothing" (ICML 2025): any attribution map is sparsified into a per-pixel
label (the top ``top_percent`` % pixels = 1 "important", the others = 0); the input is smoothed with Gaussian
noise ``N(0, sigma^2 I)``; every pixel takes its majority label over the noisy samples and is certified as in
certified segmentation (Fischer, Baader & Vechev, "Scalable Certified Segmentation via Randomized Smoothing",
ICML 2021): ``n0`` samples pick each pixel's majority label, ``n`` further samples count it, and a one-sided
binomial test of ``H0: p <= tau`` with a multiple-testing correction over the pixels of an image (Bonferroni,
Holm or none) decides certify vs abstain. With probability at least ``1 - alpha`` (per image; per pixel for
``correction="none"``) every certified pixel keeps its label under every L2 perturbation of norm below the common
radius ``R = sigma * Phi^-1(tau)``; with Bonferroni / none each pixel also gets its own radius
``sigma * Phi^-1(p_lower) >= R`` from the Clopper-Pearson lower bound ``p_lower`` at the corrected level.

The statement is about the *smoothed* label map ``x -> argmax_l P_eps(label_i(x + eps) = l)``, not about the
attribution of the clean image; the noisy images are **not clamped** to ``[0, 1]``: smoothing is defined on
``R^d``, so the model and the attribution method are evaluated on ``x + eps`` as is (the ``[0, 1]`` input check
of the registered methods is lifted for those calls only).

**Top-k overlap certificate** (:func:`sparsified_smoothgrad_certificate`), after Levine, Singla & Feizi,
"Certifiably Robust Interpretation in Deep Learning" (2019): see :func:`topk_overlap_bound`.

All functions are batched over images and noise samples (rows of ``chunk_size`` noisy images per attribution
call), device-agnostic, and seeded through :func:`fragdefense.utils.conventions.make_generator`: a list of
per-image seeds / generators makes each image's result independent of the batch it is in.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fragdefense.attributions.maps import REDUCTIONS, to_map
from fragdefense.attributions.registry import AttributionSpec, resolve_attribution
from fragdefense.certify.stats import (
    _check_level,
    binom_test_one_sided,
    clopper_pearson_lower,
    clopper_pearson_upper,
    holm,
    norm_cdf,
    norm_ppf,
)
from fragdefense.utils.checks import check_images, check_int_in_range
from fragdefense.utils.conventions import eval_mode, make_generator, randn

__all__ = [
    "CORRECTIONS",
    "CertifiedAttribution",
    "certify_attribution",
    "SmoothGradCertificate",
    "sparsified_smoothgrad_certificate",
    "topk_overlap_bound",
    "top_percent_to_k",
    "sparsify_top_k",
]

CORRECTIONS: tuple[str, ...] = ("bonferroni", "holm", "none")
_CHUNK_ROWS = 256
_CHUNK_BYTES = 64 * 2**20


def _unbounded_inputs() -> contextlib.AbstractContextManager[None]:
    """Lift the ``[0, 1]`` range check of the registered attribution methods for the calls in this block, in this
    thread only (:func:`fragdefense.attributions._common.allow_unbounded_inputs`; shape, dtype and finiteness are
    still checked). Noisy images ``x + eps`` of randomized smoothing leave ``[0, 1]`` by construction."""
    from fragdefense.attributions._common import allow_unbounded_inputs

    return allow_unbounded_inputs()


# ----------------------------------------------------------------------------------------------------- checks


def _check_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool):
        raise TypeError(f"`sigma` must be a finite number > 0 (noise std in pixel units), got {sigma!r}")
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise TypeError(f"`sigma` must be a finite number > 0 (noise std in pixel units), got {sigma!r}") from None
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"`sigma` must be a finite number > 0 (noise std in pixel units), got {sigma!r}")
    return s


def _check_open(v: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(v, bool):
        raise TypeError(f"`{name}` must be a number in ({lo:g}, {hi:g}), got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number in ({lo:g}, {hi:g}), got {v!r}") from None
    if not (lo < f < hi):
        raise ValueError(f"`{name}` must be in ({lo:g}, {hi:g}), got {v!r}")
    return f


def _check_chunk(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    return check_int_in_range(chunk_size, "chunk_size", 1)


def _check_reduce(reduce: Any) -> str:
    if reduce not in REDUCTIONS:
        raise ValueError(f"`reduce` must be one of {REDUCTIONS}, got {reduce!r}")
    return reduce


def _check_opts(method_opts: Any) -> dict[str, Any]:
    if method_opts is None:
        return {}
    if not isinstance(method_opts, dict):
        raise TypeError(f"`method_opts` must be a dict of keyword options or None, got {type(method_opts).__name__}")
    if "create_graph" in method_opts:
        raise ValueError("`method_opts` must not set `create_graph`: certification needs no gradient through the map")
    return dict(method_opts)


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module returning logits (B, K), got {type(model).__name__}")
    return model


def top_percent_to_k(top_percent: float, num_pixels: int) -> int:
    """Number of "important" pixels: ``ceil(top_percent / 100 * num_pixels)``, at least 1.

    >>> top_percent_to_k(20.0, 1024), top_percent_to_k(25.0, 16), top_percent_to_k(0.01, 16)
    (205, 4, 1)
    """
    return max(1, min(num_pixels, math.ceil(round(top_percent * num_pixels / 100.0, 9))))


def sparsify_top_k(maps: Tensor, k: int) -> Tensor:
    """Boolean top-``k`` mask of each row of ``maps`` ``(R, D)``: ties are broken by the lower flat index (a pixel is
    in the top ``k`` iff ``#{j: m_j > m_i} + #{j < i: m_j = m_i} < k``).

    >>> sparsify_top_k(torch.tensor([[0.1, 0.5, 0.5, 0.2]]), 2).tolist()
    [[False, True, True, False]]
    """
    kth = torch.kthvalue(maps, maps.shape[1] - k + 1, dim=1, keepdim=True).values  # the k-th largest value
    above, tied = maps > kth, maps == kth
    need = k - above.sum(dim=1, keepdim=True)  # tied pixels to take, lowest indices first
    return above | (tied & (tied.cumsum(dim=1) <= need))


# ------------------------------------------------------------------------------------------------ sampling


def _default_chunk(x: Tensor) -> int:
    row_bytes = x[0].numel() * x.element_size()
    return max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // max(1, row_bytes)))


def _noisy_rows(x: Tensor, sigma: float, samples: int, chunk: int, gen: Any) -> Iterator[tuple[int, Tensor]]:
    """Chunks ``(first_row, z)`` of the ``samples * B`` noisy images, sample-major (row ``r`` = sample ``r // B`` of
    image ``r % B``). Sample ``j`` is the ``j``-th ``randn`` draw of ``x``'s shape (with per-image generators: the
    ``j``-th draw of shape ``(C, H, W)`` of each image's generator), whatever the chunk size."""
    buf: list[Tensor] = []
    rows = start = 0
    for _ in range(samples):
        buf.append(x + sigma * randn(x.shape, gen, device=x.device, dtype=x.dtype))
        rows += x.shape[0]
        while rows >= chunk:
            cat = torch.cat(buf) if len(buf) > 1 else buf[0]
            yield start, cat[:chunk]
            rest = cat[chunk:]
            buf, rows, start = ([rest] if rest.shape[0] else []), rest.shape[0], start + chunk
    if rows:
        yield start, torch.cat(buf) if len(buf) > 1 else buf[0]


def _label_counts(
    spec: AttributionSpec,
    model: nn.Module,
    x: Tensor,
    t: Tensor,
    *,
    sigma: float,
    samples: int,
    split: int,
    k: int,
    reduce: str,
    chunk: int,
    gen: Any,
    opts: dict[str, Any],
) -> Tensor:
    """``(2, B, H * W)`` int64: per image and pixel, how many of the noisy samples ``j < split`` (row 0) and
    ``j >= split`` (row 1) put the pixel in the top ``k`` of the attribution map of the target class."""
    b_size, _, h, w = x.shape
    counts = torch.zeros(2 * b_size, h * w, dtype=torch.int64, device=x.device)
    with _unbounded_inputs():
        for start, z in _noisy_rows(x, sigma, samples, chunk, gen):
            r = torch.arange(start, start + z.shape[0], device=x.device)
            img, smp = r % b_size, r // b_size
            attr = spec(model, z, t[img], **opts)
            if not isinstance(attr, Tensor) or attr.ndim != 4 or attr.shape[0] != z.shape[0]:
                raise ValueError(
                    f"`method` {spec.name!r} must return attributions (N, C, H, W) for N = {z.shape[0]} images, "
                    f"got {getattr(attr, 'shape', type(attr).__name__)}"
                )
            m = to_map(attr.detach(), reduce, normalize=False).reshape(z.shape[0], -1)
            if m.shape[1] != h * w:
                raise ValueError(f"`method` {spec.name!r} returned maps of {m.shape[1]} pixels, expected {h} x {w}")
            if not torch.isfinite(m).all():
                raise ValueError(f"`method` {spec.name!r} returned a non-finite attribution on a noisy image")
            labels = sparsify_top_k(m, k).to(torch.int64)
            counts.index_add_(0, img + b_size * (smp >= split).long(), labels)
    return counts.view(2, b_size, h * w)


def _on_unique(fn: Any, counts: Tensor, *args: Any) -> Tensor:
    """``fn(values, *args)`` evaluated on the distinct values of an integer tensor only, scattered back."""
    u, inv = torch.unique(counts, return_inverse=True)
    return fn(u.to(torch.float64), *args)[inv]


# ----------------------------------------------------------------------------------------- pixel certificates


@dataclass
class CertifiedAttribution:
    """Result of :func:`certify_attribution` for a batch of ``B`` images of ``H x W`` pixels.

    Attributes:
        labels: ``(B, H, W)`` int8: 1 certified important, 0 certified not important, -1 abstain.
        radius: ``(B, H, W)`` float64: certified L2 radius per certified pixel (0 where abstaining):
            ``sigma * Phi^-1(p_lower)`` for Bonferroni / none, the common radius ``R`` for Holm.
        certified_rate: ``(B,)`` share of certified pixels.
        counts: ``(B, H, W)`` int64: how many of the ``n`` counting samples gave the pixel its selected label.
        selected: ``(B, H, W)`` int8: the majority label of the ``n0`` selection samples (0 on a tie).
        p_lower: ``(B, H, W)`` float64: Clopper-Pearson lower bound of the selected label's probability at level
            ``alpha / (H W)`` (Bonferroni, Holm) or ``alpha`` (none).
        p_values: ``(B, H, W)`` float64: one-sided binomial p-values of ``H0: p <= tau``.
        target: ``(B,)`` the explained class (fixed for all noise samples).
        common_radius: ``R = sigma * Phi^-1(tau)``, a radius at which every certified pixel holds.
        k: number of pixels labelled important in each noisy map.
    """

    labels: Tensor
    radius: Tensor
    certified_rate: Tensor
    counts: Tensor
    selected: Tensor
    p_lower: Tensor
    p_values: Tensor
    target: Tensor
    common_radius: float
    k: int
    sigma: float
    n0: int
    n: int
    tau: float
    alpha: float
    top_percent: float
    correction: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def certified(self) -> Tensor:
        """``(B, H, W)`` bool: certified pixels."""
        return self.labels >= 0

    @property
    def certified_important(self) -> Tensor:
        """``(B, H, W)`` bool: pixels certified as important (label 1)."""
        return self.labels == 1

    def certified_rate_at(self, radii: float | Sequence[float] | Tensor) -> Tensor:
        """``(B, len(radii))``: the share of pixels certified with radius ``>= r`` for each ``r`` (the rate-vs-radius
        curve of Anani et al.); with Holm every certified pixel has radius ``R``."""
        r = torch.as_tensor(radii, dtype=torch.float64, device=self.radius.device).reshape(-1)
        ok = self.certified.flatten(1)[:, None, :] & (self.radius.flatten(1)[:, None, :] >= r[None, :, None])
        return ok.to(torch.float64).mean(dim=2)


def certify_attribution(
    model: nn.Module,
    x: Tensor,
    method: Any,
    *,
    sigma: float = 0.25,
    n0: int = 10,
    n: int = 100,
    tau: float = 0.75,
    alpha: float = 0.001,
    top_percent: float = 20.0,
    correction: str = "bonferroni",
    target: Any = None,
    chunk_size: int | None = None,
    generator: Any = None,
    method_opts: dict[str, Any] | None = None,
    reduce: str = "abs_sum",
) -> CertifiedAttribution:
    """Pixel-level certified attribution labels by randomized smoothing (Anani, Lorenz, Fritz & Schiele, "Pixel-level
    Certified Explanations via Randomized Smoothing"; certification as in Fischer, Baader & Vechev, "Scalable
    Certified Segmentation via Randomized Smoothing").

    For every image: draw ``n0 + n`` noisy copies ``x + sigma * eps`` (not clamped: smoothing is on ``R^d``), compute
    the attribution map of the target class on each (channels reduced by ``reduce``), label its top
    ``top_percent`` % pixels 1 and the rest 0; the first ``n0`` copies choose each pixel's majority label (0 on a
    tie), the next ``n`` count it; the pixel is certified when the one-sided binomial test of ``H0: p <= tau``
    rejects after the correction over the ``H W`` pixels. Guarantee (with probability ``>= 1 - alpha`` over the
    noise, per image for Bonferroni / Holm): every certified pixel's smoothed label equals ``labels`` at every
    ``x + delta`` with ``||delta||_2 < R = sigma * Phi^-1(tau)`` (and, Bonferroni / none, below its own radius).

    Args:
        model: classifier on images in ``[0, 1]`` (run in eval mode; evaluated on unclamped noisy images).
        x: images ``(B, C, H, W)`` in ``[0, 1]``.
        method: a registered attribution name, a callable ``f(model, x, target)`` or a captum ``Attribution`` (see
            :func:`fragdefense.attributions.resolve_attribution`); called without ``create_graph``.
        sigma: noise std (pixel units), finite ``> 0``.
        n0, n: selection and counting samples, ``>= 1``.
        tau: probability threshold in ``(0.5, 1)``; alpha: error level in ``(0, 1)``.
        top_percent: share of pixels labelled important, in ``(0, 100)``.
        correction: ``"bonferroni"`` (default), ``"holm"`` or ``"none"`` (per-pixel level ``alpha``).
        target: ``None`` = the class predicted on the clean image, else an int or ``(B,)`` labels.
        chunk_size: noisy images per attribution call (default: 256, fewer for large images).
        generator: ``None``, an int seed, a ``torch.Generator``, or a list of per-image seeds / generators (results
            per image then do not depend on the batch).
        method_opts: keyword options of the method; reduce: ``"abs_sum"``, ``"abs_mean"`` or ``"sum"``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
        >>> res = certify_attribution(net, torch.rand(2, 3, 4, 4), "saliency", n=50, generator=[0, 1])
        >>> res.labels.shape, res.certified_rate.tolist()  # a linear model's saliency does not depend on x
        (torch.Size([2, 4, 4]), [1.0, 1.0])
    """
    _check_model(model)
    check_images(x, "x")
    sigma = _check_sigma(sigma)
    n0 = check_int_in_range(n0, "n0", 1)
    n = check_int_in_range(n, "n", 1)
    tau = _check_open(tau, "tau", 0.5, 1.0)
    alpha = _check_level(alpha, "alpha")
    top_percent = _check_open(top_percent, "top_percent", 0.0, 100.0)
    if correction not in CORRECTIONS:
        raise ValueError(f"`correction` must be one of {CORRECTIONS}, got {correction!r}")
    chunk = _check_chunk(chunk_size)
    reduce = _check_reduce(reduce)
    opts = _check_opts(method_opts)
    spec = resolve_attribution(method, "method")
    gen = make_generator(generator, x.device)
    if isinstance(gen, list) and len(gen) != x.shape[0]:
        raise ValueError(f"`generator` holds {len(gen)} per-image generators for a batch of {x.shape[0]}")

    b_size, _, h, w = x.shape
    m_pix = h * w
    k = top_percent_to_k(top_percent, m_pix)
    x = x.detach()
    with eval_mode(model):
        t = _predicted(model, x, target)
        counts = _label_counts(
            spec, model, x, t, sigma=sigma, samples=n0 + n, split=n0, k=k, reduce=reduce,
            chunk=chunk or _default_chunk(x), gen=gen, opts=opts,
        )  # fmt: skip
    sel = 2 * counts[0] > n0  # majority of the selection samples; ties -> 0
    c = torch.where(sel, counts[1], n - counts[1])
    level = alpha if correction == "none" else alpha / m_pix
    p_values = _on_unique(lambda u: binom_test_one_sided(u, n, tau), c)
    p_lower = _on_unique(lambda u: clopper_pearson_lower(u, n, level), c)
    cert = holm(p_values, alpha) if correction == "holm" else p_values <= level
    big_r = sigma * float(norm_ppf(tau))
    if correction == "holm":
        radius = torch.where(cert, torch.full_like(p_lower, big_r), torch.zeros_like(p_lower))
    else:
        radius = torch.where(cert, sigma * norm_ppf(p_lower.clamp_min(tau)), torch.zeros_like(p_lower))
    labels = torch.where(cert, sel.to(torch.int8), torch.full_like(sel, -1, dtype=torch.int8))
    shape = (b_size, h, w)
    return CertifiedAttribution(
        labels=labels.view(shape),
        radius=radius.view(shape),
        certified_rate=cert.to(torch.float64).mean(dim=1),
        counts=c.view(shape),
        selected=sel.to(torch.int8).view(shape),
        p_lower=p_lower.view(shape),
        p_values=p_values.view(shape),
        target=t,
        common_radius=big_r,
        k=k,
        sigma=sigma,
        n0=n0,
        n=n,
        tau=tau,
        alpha=alpha,
        top_percent=top_percent,
        correction=correction,
        method=spec.name,
        settings={"reduce": reduce, "chunk_size": chunk, "method_opts": opts},
    )


def _predicted(model: nn.Module, x: Tensor, target: Any) -> Tensor:
    from fragdefense.attributions._common import predicted_target

    return predicted_target(model, x, target)


# ------------------------------------------------------------------------------------- top-k overlap bound


def topk_overlap_bound(
    smoothed: Tensor,
    radius: float | Sequence[float] | Tensor,
    *,
    sigma: float,
    k: int,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
) -> Tensor:
    """Certified lower bound on the top-``k`` overlap of a Gaussian-smoothed attribution with values in ``[0, 1]``
    (Levine, Singla & Feizi, "Certifiably Robust Interpretation in Deep Learning"), ``(B, len(radius))`` int64.

    Assumptions: every base attribution value lies in ``[0, 1]`` (here: the sparsified map, 1 on the top pixels),
    so each smoothed value ``S_i(x) = E_eps[g_i(x + eps)]`` satisfies, for ``||delta||_2 <= r``,
    ``Phi(Phi^-1(S_i(x)) - r / sigma) <= S_i(x + delta) <= Phi(Phi^-1(S_i(x)) + r / sigma)`` (``Phi^-1(S_i)`` is
    ``1 / sigma``-Lipschitz). ``lower`` / ``upper`` are bounds on ``S(x)`` (e.g. simultaneous confidence bounds of a
    Monte-Carlo estimate; default: ``smoothed`` itself, i.e. exact values). Let ``T`` be the top ``k`` of
    ``smoothed`` (ties to the lower index), ``L_(1) >= .. >= L_(k)`` the shifted lower bounds on ``T`` and
    ``U_(1) >= ..`` the shifted upper bounds outside ``T``. If fewer than ``m`` elements of ``T`` stayed in the top
    ``k`` of ``S(x + delta)``, one of the ``m`` elements with the largest ``L`` left it, and ``k - m + 1`` outside
    elements entered with values at least as large, so ``U_(k - m + 1) >= L_(m)``. The bound is the largest ``m``
    with ``L_(m) > U_(k - m + 1)`` (``U = -inf`` past the last outside element). At ``r = 0`` with exact values it
    is ``k`` iff the ranking is decided at ``k`` (``S_[k] > S_[k + 1]``); it decreases with ``r``.

    >>> s = torch.tensor([[0.9, 0.8, 0.2, 0.1]])
    >>> topk_overlap_bound(s, [0.0, 0.1, 1.0], sigma=0.25, k=2).tolist()
    [[2, 2, 0]]
    """
    sigma = _check_sigma(sigma)
    if not isinstance(smoothed, Tensor) or smoothed.ndim < 2:
        raise ValueError("`smoothed` must be a tensor (B, H, W) or (B, D) of smoothed values in [0, 1]")
    s = smoothed.reshape(smoothed.shape[0], -1).to(torch.float64)
    d = s.shape[1]
    k = check_int_in_range(k, "k", 1, d)
    lo = s if lower is None else lower.reshape(s.shape).to(torch.float64)
    hi = s if upper is None else upper.reshape(s.shape).to(torch.float64)
    r = torch.as_tensor(radius, dtype=torch.float64, device=s.device).reshape(-1)
    if not torch.isfinite(r).all() or (r < 0).any():
        raise ValueError(f"`radius` must hold finite numbers >= 0, got {radius!r}")
    top = sparsify_top_k(s, k)
    shift = (r / sigma)[None, :, None]
    low = norm_cdf(norm_ppf(lo.clamp(0.0, 1.0))[:, None, :] - shift)  # (B, R, D)
    up = norm_cdf(norm_ppf(hi.clamp(0.0, 1.0))[:, None, :] + shift)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=s.device)
    low_in = torch.where(top[:, None, :], low, -inf).sort(dim=2, descending=True).values[..., :k]
    up_out = torch.where(top[:, None, :], -inf, up).sort(dim=2, descending=True).values[..., : d - k]
    m = torch.arange(1, k + 1, device=s.device)
    idx = k - m  # 0-based index of U_(k - m + 1)
    pad = torch.cat([up_out, torch.full((*up_out.shape[:2], k), -math.inf, dtype=torch.float64, device=s.device)], 2)
    ok = low_in > pad[..., idx]
    return ok.to(torch.int64).cumprod(dim=2).sum(dim=2)


@dataclass
class SmoothGradCertificate:
    """Result of :func:`sparsified_smoothgrad_certificate`.

    Attributes:
        smoothed: ``(B, H, W)`` Monte-Carlo estimate of the sparsified smoothed map (share of noisy samples in which
            the pixel is among the ``k_sparse`` largest).
        lower, upper: ``(B, H, W)`` simultaneous Clopper-Pearson bounds (level ``alpha / (2 H W)`` each).
        topk: ``(B, H, W)`` bool: the certified top-``k`` set (top ``k`` of ``smoothed``).
        radii: ``(R,)``; bound: ``(B, R)`` int64 certified lower bound on the top-``k`` overlap at each radius.
    """

    smoothed: Tensor
    lower: Tensor
    upper: Tensor
    topk: Tensor
    radii: Tensor
    bound: Tensor
    target: Tensor
    k: int
    k_sparse: int
    sigma: float
    n: int
    alpha: float
    method: str


def sparsified_smoothgrad_certificate(
    model: nn.Module,
    x: Tensor,
    *,
    sigma: float = 0.25,
    n: int = 100,
    k: int,
    radius: float | Sequence[float] | Tensor,
    alpha: float = 0.001,
    k_sparse: int | None = None,
    method: Any = "saliency",
    target: Any = None,
    chunk_size: int | None = None,
    generator: Any = None,
    method_opts: dict[str, Any] | None = None,
    reduce: str = "abs_sum",
) -> SmoothGradCertificate:
    """Sparsified SmoothGrad with a certified top-``k`` overlap bound (Levine, Singla & Feizi, "Certifiably Robust
    Interpretation in Deep Learning").

    The base map of a noisy image is sparsified to ``{0, 1}`` (1 on its ``k_sparse`` largest pixels, default ``k``);
    the smoothed map ``S(x)`` is its mean over ``n`` Gaussian samples (not clamped). Simultaneous two-sided
    Clopper-Pearson bounds (Bonferroni over the ``2 H W`` one-sided bounds) hold with probability ``>= 1 - alpha``;
    :func:`topk_overlap_bound` turns them into a lower bound, valid for every ``||delta||_2 <= r``, on the overlap
    between ``topk`` (the top ``k`` of the estimate) and the top ``k`` of the true smoothed map at ``x + delta``.

    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    >>> cert = sparsified_smoothgrad_certificate(net, torch.rand(1, 3, 4, 4), n=50, k=4, radius=[0.0, 5.0],
    ...                                          generator=0)
    >>> cert.bound.tolist()  # constant saliency: decided at radius 0, nothing certified at a huge radius
    [[4, 0]]
    """
    _check_model(model)
    check_images(x, "x")
    sigma = _check_sigma(sigma)
    n = check_int_in_range(n, "n", 1)
    alpha = _check_level(alpha, "alpha")
    b_size, _, h, w = x.shape
    k = check_int_in_range(k, "k", 1, h * w)
    k_sparse = k if k_sparse is None else check_int_in_range(k_sparse, "k_sparse", 1, h * w)
    radii = torch.as_tensor(radius, dtype=torch.float64, device=x.device).reshape(-1)
    if not torch.isfinite(radii).all() or (radii < 0).any():
        raise ValueError(f"`radius` must hold finite numbers >= 0, got {radius!r}")
    chunk = _check_chunk(chunk_size)
    reduce = _check_reduce(reduce)
    opts = _check_opts(method_opts)
    spec = resolve_attribution(method, "method")
    gen = make_generator(generator, x.device)
    x = x.detach()
    with eval_mode(model):
        t = _predicted(model, x, target)
        counts = _label_counts(
            spec, model, x, t, sigma=sigma, samples=n, split=0, k=k_sparse, reduce=reduce,
            chunk=chunk or _default_chunk(x), gen=gen, opts=opts,
        )[1]  # fmt: skip
    level = alpha / (2 * h * w)
    lo = _on_unique(lambda u: clopper_pearson_lower(u, n, level), counts)
    hi = _on_unique(lambda u: clopper_pearson_upper(u, n, level), counts)
    smoothed = counts.to(torch.float64) / n
    bound = topk_overlap_bound(smoothed, radii, sigma=sigma, k=k, lower=lo, upper=hi)
    shape = (b_size, h, w)
    return SmoothGradCertificate(
        smoothed=smoothed.view(shape),
        lower=lo.view(shape),
        upper=hi.view(shape),
        topk=sparsify_top_k(smoothed, k).view(shape),
        radii=radii,
        bound=bound,
        target=t,
        k=k,
        k_sparse=k_sparse,
        sigma=sigma,
        n=n,
        alpha=alpha,
        method=spec.name,
    )
