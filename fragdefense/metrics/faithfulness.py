r"""Faithfulness scores of attribution maps: deletion / insertion AUC, ROAD and faithfulness correlation.

Every score takes ``(model, x, y, maps)``: ``model`` maps images in ``[0, 1]`` to logits ``(N, K)``, ``x`` is
``(B, C, H, W)``, ``y`` the ``(B,)`` explained classes and ``maps`` the attributions, and returns one value per
image, shape ``(B,)``.

* :func:`deletion_auc` / :func:`insertion_auc` (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for
  Explanation of Black-box Models"): pixels removed from the image (deletion: replaced by the baseline) or put
  back into the baseline (insertion) in map order, most important first; the softmax probability of ``y`` is
  recorded after every step and integrated by the trapezoid rule over the fraction of pixels in ``[0, 1]``.
* :func:`road` (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation Strategy for
  Attribution Methods"): the most (MoRF) or least (LeRF) relevant pixels are removed and filled by noisy
  linear imputation (:func:`noisy_linear_imputation`), for a list of percentages.
* :func:`faithfulness_correlation` (Bhatt, Weller & Moura, "Evaluating and Aggregating Feature-based Model
  Explanations"): Pearson correlation between the attribution mass of random pixel subsets and the output drop
  when the subset is set to the baseline.

Conventions
-----------
* **Pixels.** A map holds one value per pixel; removing a pixel removes all its channels. ``maps`` may be
  ``(B, H, W)``, ``(B, 1, H, W)`` or ``(B, C, H, W)``; channel maps are reduced by **summing over the channels**
  (the attribution of a pixel is the sum of its channels' attributions). Quantus instead broadcasts a
  ``(B, 1, H, W)`` map to every channel and treats every channel element as a feature; both agree on
  single-channel images (and deletion agrees on colour images when Quantus removes ``C`` elements per pixel).
* **Ties** in the map are broken by a random permutation drawn per image from ``generator``: image ``b`` first
  draws ``rand((H * W,), dtype=float64)`` keys and equal map values are taken in ascending key order. A constant
  (or all-zero) map therefore gives random deletion / insertion / ROAD orders; tie-free maps do not depend on the
  keys.
* **Batching.** All perturbed images of a call (images x steps, images x percentages, images x runs) form one
  flat batch, built chunk by chunk and evaluated ``chunk_size`` images per model forward (``None``:
  ``max(256, 2**24 // (C * H * W))``, 64 MB of float32 input; ROAD: ``max(64, 2**21 // (C * H * W))`` because
  the imputation holds several float64 copies). The model runs under ``torch.no_grad`` in eval mode.
* **Randomness** (ties, ROAD noise, faithfulness-correlation subsets) follows
  :func:`fragdefense.utils.conventions.make_generator`: ``None``, an ``int``, a ``torch.Generator`` or a list of
  one seed / generator per image; with a list every image's result is independent of the batch it is in.
* **Validation.** Every argument is checked before any model call; errors name the argument.

>>> import torch
>>> from fragdefense.models import create_model
>>> model = create_model("small_cnn", width=4).eval()
>>> x, y, maps = torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.rand(2, 8, 8)
>>> deletion_auc(model, x, y, maps, steps=8).shape
torch.Size([2])
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.metrics._checks import check_finite
from fragdefense.metrics.registry import register_metric
from fragdefense.utils.checks import as_model_dtype, check_images, check_int_in_range, check_nonneg_float
from fragdefense.utils.conventions import default_chunk, eval_mode, make_generator, rand, randn

__all__ = [
    "deletion_auc",
    "insertion_auc",
    "road",
    "faithfulness_correlation",
    "noisy_linear_imputation",
    "gaussian_blur",
]

_BASELINES = ("zeros", "blur", "mean")
_ROAD_ORDERS = ("morf", "lerf")
_ROAD_SCORES = ("accuracy", "probability")
_OUTPUTS = ("probability", "logit")


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def _check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(f"`model` must be callable (images in [0, 1] -> logits), got {type(model).__name__}")


def _check_labels(y: Any, x: Tensor) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"`y` must be a torch.Tensor of class indices, shape (B,), got {type(y).__name__}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"`y` must have shape (B,) = ({x.shape[0]},), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"`y` must hold integer class indices, got dtype {y.dtype}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"`y` must hold class indices >= 0, got min {int(y.min())}")
    return y.to(device=x.device, dtype=torch.long)


def _pixel_maps(maps: Any, x: Tensor) -> Tensor:
    """``maps`` as ``(B, H, W)`` on ``x``'s device (channel maps summed over the channels)."""
    b, c, h, w = x.shape
    if not isinstance(maps, Tensor):
        raise TypeError(f"`maps` must be a torch.Tensor of shape (B, H, W), got {type(maps).__name__}")
    if not maps.is_floating_point():
        raise TypeError(f"`maps` must have a floating dtype, got {maps.dtype}")
    if maps.ndim == 4 and maps.shape[0] == b and maps.shape[1] in (1, c) and tuple(maps.shape[2:]) == (h, w):
        maps = maps.sum(1)
    elif maps.ndim != 3 or tuple(maps.shape) != (b, h, w):
        raise ValueError(
            f"`maps` must have shape (B, H, W) = ({b}, {h}, {w}), or (B, 1, H, W) / (B, C, H, W) with C = {c}; "
            f"got shape {tuple(maps.shape)}"
        )
    check_finite(maps, "maps")
    return maps.detach().to(x.device)


def _check_chunk(chunk_size: Any) -> int | None:
    return None if chunk_size is None else check_int_in_range(chunk_size, "chunk_size", 1)


def _check_generator(generator: Any, x: Tensor) -> Any:
    gen = make_generator(generator, x.device)
    if isinstance(gen, list) and len(gen) != x.shape[0]:
        raise ValueError(f"`generator` holds {len(gen)} per-image seeds / generators for a batch of {x.shape[0]}")
    return gen


def _check_baseline(baseline: Any, x: Tensor, blur_kernel_size: Any, blur_sigma: Any) -> Any:
    if isinstance(baseline, str):
        if baseline not in _BASELINES:
            raise ValueError(f"`baseline` must be one of {_BASELINES} or a tensor, got {baseline!r}")
        if baseline == "blur":
            _check_blur(blur_kernel_size, blur_sigma, x.shape[-2:])
        return baseline
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        baseline = torch.tensor(float(baseline))
    if not isinstance(baseline, Tensor):
        raise TypeError(f"`baseline` must be one of {_BASELINES}, a number or a tensor, got {type(baseline).__name__}")
    try:
        out = torch.broadcast_to(baseline.to(device=x.device, dtype=x.dtype), x.shape)
    except RuntimeError:
        raise ValueError(
            f"`baseline` tensor of shape {tuple(baseline.shape)} does not broadcast to the images {tuple(x.shape)}"
        ) from None
    if not bool(torch.isfinite(out).all()):
        raise ValueError("`baseline` contains NaN or Inf values")
    return out


def _check_blur(kernel_size: Any, sigma: Any, hw: Sequence[int]) -> tuple[int, float]:
    k = check_int_in_range(kernel_size, "blur_kernel_size", 1)
    if k % 2 == 0:
        raise ValueError(f"`blur_kernel_size` must be odd, got {k}")
    if k // 2 >= min(hw):
        raise ValueError(f"`blur_kernel_size` // 2 must be smaller than the image side {min(hw)}, got {k}")
    s = check_nonneg_float(sigma, "blur_sigma")
    if s == 0.0:
        raise ValueError("`blur_sigma` must be > 0, got 0")
    return k, s


def _baseline_images(baseline: Any, x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    if isinstance(baseline, Tensor):
        return baseline
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x)
    return gaussian_blur(x, kernel_size, sigma)


def _default_chunk(x: Tensor, floats: int = 2**19, minimum: int = 16) -> int:
    return default_chunk(x, floats, minimum)


# ----------------------------------------------------------------------------------------------------------
# shared machinery
# ----------------------------------------------------------------------------------------------------------
def gaussian_blur(x: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur of images ``(B, C, H, W)``, reflect padding (the kernel of
    ``torchvision.transforms.functional.gaussian_blur``: ``exp(-t^2 / (2 sigma^2))``, ``t`` in
    ``-(k-1)/2 .. (k-1)/2``, normalised to sum 1).

    >>> gaussian_blur(torch.ones(1, 3, 8, 8), 5, 1.0).allclose(torch.ones(1, 3, 8, 8))
    True
    """
    check_images(x, "x", unit_range=False)
    k, s = _check_blur(kernel_size, sigma, x.shape[-2:])
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    g = torch.exp(-0.5 * (t / s) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    p = k // 2
    out = F.pad(x, (p, p, p, p), mode="reflect")
    out = F.conv2d(out, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(out, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _ranks(a: Tensor, generator: Any, descending: bool = True) -> Tensor:
    """Position of every pixel in the removal order, ``(B, D)``: map order, ties by per-image random keys."""
    b, d = a.shape
    kdt = torch.float32 if a.device.type == "mps" else torch.float64
    keys = rand((b, d), generator, device=a.device, dtype=kdt)
    perm = keys.argsort(dim=1, stable=True)
    order = perm.gather(1, torch.sort(a.gather(1, perm), dim=1, descending=descending, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(d, device=a.device).expand(b, d))
    return rank


def _eval_ctx(model: Any) -> Any:
    return eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()


def _row_scores(
    model: Any, n_rows: int, build: Callable[[int, int], Tensor], y_rows: Tensor, chunk: int, kind: str
) -> Tensor:
    """Model scores of ``n_rows`` perturbed images built ``chunk`` at a time by ``build(start, stop)``."""
    out = []
    with torch.no_grad(), _eval_ctx(model):
        for start in range(0, n_rows, chunk):
            stop = min(n_rows, start + chunk)
            xb = build(start, stop)
            logits = model(as_model_dtype(xb, model))
            if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != stop - start:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"`model` must return logits of shape (N, K) for N images, got {shape}")
            yy = y_rows[start:stop]
            if start == 0 and int(y_rows.max()) >= logits.shape[1]:
                raise ValueError(f"`y` holds class {int(y_rows.max())} but the model has {logits.shape[1]} classes")
            if kind == "accuracy":
                v = (logits.argmax(1) == yy).to(logits.dtype)
            elif kind == "probability":
                v = logits.softmax(1).gather(1, yy[:, None])[:, 0]
            else:
                v = logits.gather(1, yy[:, None])[:, 0]
            out.append(v)
    return torch.cat(out)


def _prepare(
    model: Any, x: Any, y: Any, maps: Any, generator: Any, chunk_size: Any
) -> tuple[Tensor, Tensor, Tensor, Any, int | None]:
    _check_model(model)
    check_images(x, "x")
    y = _check_labels(y, x)
    a = _pixel_maps(maps, x)
    gen = _check_generator(generator, x)
    return x, y, a, gen, _check_chunk(chunk_size)


# ----------------------------------------------------------------------------------------------------------
# deletion / insertion
# ----------------------------------------------------------------------------------------------------------
def _deletion_insertion(
    insertion: bool,
    model: Any,
    x: Tensor,
    y: Tensor,
    maps: Tensor,
    steps: int | None,
    baseline: Any,
    blur_kernel_size: int,
    blur_sigma: float,
    generator: Any,
    chunk_size: int | None,
    return_curve: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    x, y, a, gen, chunk = _prepare(model, x, y, maps, generator, chunk_size)
    b, c, h, w = x.shape
    d = h * w
    s = min(100, d) if steps is None else check_int_in_range(steps, "steps", 1, d)
    base_spec = _check_baseline(baseline, x, blur_kernel_size, blur_sigma)
    if not isinstance(return_curve, bool):
        raise TypeError(f"`return_curve` must be a bool, got {return_curve!r}")
    chunk = chunk or _default_chunk(x)

    base = _baseline_images(base_spec, x, blur_kernel_size, blur_sigma)
    rank = _ranks(a.reshape(b, d), gen)
    ks = torch.tensor([i * d // s for i in range(s + 1)], device=x.device)
    n_pts = s + 1

    def build(start: int, stop: int) -> Tensor:
        r = torch.arange(start, stop, device=x.device)
        bi, si = r // n_pts, r % n_pts
        done = (rank[bi] < ks[si, None]).view(-1, 1, h, w)  # pixels removed (deletion) / put back (insertion)
        return torch.where(done, x[bi], base[bi]) if insertion else torch.where(done, base[bi], x[bi])

    curve = _row_scores(model, b * n_pts, build, y.repeat_interleave(n_pts), chunk, "probability").view(b, n_pts)
    frac = ks.to(torch.float64) / d
    auc = torch.trapezoid(curve.to(torch.float64), frac, dim=1).to(curve.dtype)
    return (auc, curve) if return_curve else auc


def deletion_auc(
    model: Any,
    x: Tensor,
    y: Tensor,
    maps: Tensor,
    *,
    steps: int | None = None,
    baseline: str | float | Tensor = "zeros",
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    generator: Any = None,
    chunk_size: int | None = None,
    return_curve: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Deletion AUC (Petsiuk, Das & Saenko, "RISE"): lower is better.

    After step ``i`` (``i = 0 .. steps``) the ``k_i = i * H * W // steps`` most important pixels (all channels)
    are replaced by the baseline; the curve is the softmax probability of ``y`` at each ``k_i`` (``k_0 = 0``: the
    image itself, ``k_steps = H * W``: the baseline) and the AUC its trapezoid integral over ``k_i / (H * W)``.

    Args:
        model: images in ``[0, 1]`` -> logits ``(N, K)``.
        x: images ``(B, C, H, W)`` in ``[0, 1]``; y: classes ``(B,)``.
        maps: ``(B, H, W)`` (or ``(B, 1 | C, H, W)``, summed over channels); higher = more important.
        steps: number of removal steps, ``1 .. H * W`` (``None``: ``min(100, H * W)``).
        baseline: ``"zeros"``, ``"blur"`` (:func:`gaussian_blur` of the image with ``blur_kernel_size`` /
            ``blur_sigma``), ``"mean"`` (per-image per-channel mean), a number, or a tensor broadcastable to
            ``x``.
        generator: breaks ties in the map (see the module docstring); per-image list for batch independence.
        chunk_size: images per model forward (``None``: see the module docstring).
        return_curve: also return the ``(B, steps + 1)`` curve.

    Relation to Quantus 0.6 ``PixelFlipping`` (``features_in_step = H * W / steps`` on single-channel images,
    ``C * H * W / steps`` on colour ones with a tie-free map): its curve is ``curve[:, 1:]`` (it does not
    evaluate the unperturbed image) and its ``return_auc_per_sample`` is ``np.trapz`` with unit spacing over those
    ``steps`` points, not the area over the fraction of pixels in ``[0, 1]``. Its ``perturb_baseline="black"`` is
    the per-image minimum of the image (``baseline=x.amin((1, 2, 3), keepdim=True)`` here), not 0, and its
    ``"mean"`` is the mean of the partly perturbed image, recomputed at every step.

    >>> import torch
    >>> from fragdefense.models import create_model
    >>> model = create_model("small_cnn", width=4).eval()
    >>> auc, curve = deletion_auc(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.rand(2, 8, 8),
    ...                           steps=4, return_curve=True)
    >>> auc.shape, curve.shape
    (torch.Size([2]), torch.Size([2, 5]))
    """
    return _deletion_insertion(
        False, model, x, y, maps, steps, baseline, blur_kernel_size, blur_sigma, generator, chunk_size, return_curve
    )


def insertion_auc(
    model: Any,
    x: Tensor,
    y: Tensor,
    maps: Tensor,
    *,
    steps: int | None = None,
    baseline: str | float | Tensor = "blur",
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    generator: Any = None,
    chunk_size: int | None = None,
    return_curve: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Insertion AUC (Petsiuk, Das & Saenko, "RISE"): higher is better.

    Starts from the baseline (default ``"blur"``, as in RISE) and puts back the ``k_i = i * H * W // steps`` most
    important pixels of the image; arguments and curve as in :func:`deletion_auc` (``k_0 = 0``: the baseline,
    ``k_steps = H * W``: the image). Quantus 0.6 has no insertion metric.

    >>> import torch
    >>> from fragdefense.models import create_model
    >>> model = create_model("small_cnn", width=4).eval()
    >>> insertion_auc(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.rand(2, 8, 8), steps=4,
    ...               baseline="zeros").shape
    torch.Size([2])
    """
    return _deletion_insertion(
        True, model, x, y, maps, steps, baseline, blur_kernel_size, blur_sigma, generator, chunk_size, return_curve
    )


# ----------------------------------------------------------------------------------------------------------
# ROAD
# ----------------------------------------------------------------------------------------------------------
def _stencil(u: Tensor) -> Tensor:
    """``12 x`` the weighted sum of the 8 neighbours (1/6 direct, 1/12 diagonal; zero outside the image) of every
    pixel of ``u`` ``(N, H, W)``: the separable ``[1, 2, 1] x [1, 2, 1]`` sum minus 4 times the centre."""
    p = F.pad(u, (1, 1, 1, 1))
    h = torch.add(p[..., :-2], p[..., 2:]).add_(p[..., 1:-1], alpha=2)
    return torch.add(h[..., :-2, :], h[..., 2:, :]).add_(h[..., 1:-1, :], alpha=2).sub_(u, alpha=4)


def _linear_imputation(x: Tensor, mask: Tensor, tol: float, max_iter: int | None) -> Tensor:
    """Noise-free ROAD imputation: batched conjugate gradients on the sparse system, every channel separately.

    Unknowns live on the full grid (zero at known pixels); ``A u = m * (wsum * u - conv(u))`` with ``m`` the
    unknown mask, ``wsum`` the weight of a pixel's in-image neighbours and ``conv`` the neighbour-weighted sum,
    ``b = m * conv(known)``. ``A`` is symmetric positive definite on the unknowns whenever a pixel is known.
    Converged systems leave the working set every 8 iterations."""
    n, c, h, w = x.shape
    dt = torch.float32 if x.device.type == "mps" else torch.float64
    um = mask.to(dt)[:, None].expand(n, c, h, w).reshape(n * c, h, w)  # 1 = unknown
    xs = x.to(dt).reshape(n * c, h, w)
    wsum12 = _stencil(torch.ones(1, h, w, dtype=dt, device=x.device))  # 12 x the in-image neighbour weight

    def apply_a(v: Tensor, m12: Tensor) -> Tensor:  # m12 = unknown mask / 12
        return (wsum12 * v).sub_(_stencil(v)).mul_(m12)

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return torch.linalg.vecdot(a.flatten(1), b.flatten(1))

    known = xs * (1 - um)
    rhs = um * _stencil(known) / 12.0
    n_known = (1 - um).sum((1, 2), keepdim=True)
    u = um * (known.sum((1, 2), keepdim=True) / n_known.clamp_min(1))  # start: mean of the known pixels
    m = um / 12.0
    r = rhs - apply_a(u, m)
    p = r.clone()
    rr = dot(r, r)
    thresh = (tol * dot(rhs, rhs).sqrt()) ** 2 + 1e-300
    limit = max_iter if max_iter is not None else 50 * (h + w) + 100
    solved = u.clone()
    idx = torch.arange(n * c, device=x.device)  # systems still iterating
    for it in range(limit):
        if it % 8 == 0:
            act = rr > thresh
            if not bool(act.all()):
                solved[idx[~act]] = u[~act]
                idx, u, r, p, rr, m, thresh = idx[act], u[act], r[act], p[act], rr[act], m[act], thresh[act]
                if not idx.numel():
                    break
        ap = apply_a(p, m)
        # p = 0 exactly when r = 0 (A is positive definite on the unknowns), so the clamps only turn 0 / 0 into 0
        alpha = (rr / dot(p, ap).clamp_min(1e-300))[:, None, None]
        u.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        rr_new = dot(r, r)
        p.mul_((rr_new / rr.clamp_min(1e-300))[:, None, None]).add_(r)
        rr = rr_new
    if idx.numel():
        solved[idx] = u
        if bool((rr > thresh).any()):
            warnings.warn(
                f"noisy_linear_imputation: conjugate gradients did not reach tol={tol:g} in {limit} iterations",
                RuntimeWarning,
                stacklevel=3,
            )
    out = torch.where(um.bool(), solved, xs).reshape(n, c, h, w)
    return out.to(x.dtype)


def noisy_linear_imputation(
    x: Tensor,
    mask: Tensor,
    *,
    noise: float = 0.01,
    generator: Any = None,
    tol: float = 1e-8,
    max_iter: int | None = None,
) -> Tensor:
    """The noisy linear imputation of ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods"): every removed pixel (``mask`` True) is the weighted mean of its in-image 8 neighbours
    (weight 1/6 direct, 1/12 diagonal; known pixels fixed), a sparse symmetric positive definite linear system
    per channel, solved for the whole batch at once by conjugate gradients in float64 to a relative residual
    ``tol``; then ``noise * N(0, 1)`` is added to the removed pixels (drawn as ``randn((N, C, H, W))`` with the
    seeding convention, so a list of per-image generators draws ``randn((C, H, W))`` per image). An image with
    every pixel removed has no solution and is imputed as 0 (plus noise).

    Args:
        x: images ``(N, C, H, W)`` (any finite values); mask: ``(N, H, W)`` bool, True = removed.
        noise: standard deviation of the added noise (``>= 0``); generator: seeding convention.
        tol: relative residual of the solve (the default 1e-8 leaves errors of about 5e-8 on 32 x 32 images, below
            float32 resolution); max_iter: CG iteration cap (``None``: ``50 (H + W) + 100``).

    >>> x = torch.zeros(1, 1, 3, 3); x[0, 0, :, 0] = 1.0  # left column white
    >>> m = torch.zeros(1, 3, 3, dtype=torch.bool); m[0, 1, 1] = True
    >>> round(noisy_linear_imputation(x, m, noise=0.0)[0, 0, 1, 1].item(), 6)  # (1/6 + 2/12) / 1
    0.333333
    """
    check_images(x, "x", unit_range=False)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"`mask` must be a bool torch.Tensor (N, H, W), got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"`mask` must have shape (N, H, W) = {(x.shape[0], *x.shape[2:])}, got {tuple(mask.shape)}")
    noise = check_nonneg_float(noise, "noise")
    tol = check_nonneg_float(tol, "tol")
    if max_iter is not None:
        check_int_in_range(max_iter, "max_iter", 1)
    gen = _check_generator(generator, x)
    mask = mask.to(x.device)
    out = _linear_imputation(x, mask, tol, max_iter)
    if noise > 0:
        out = out + noise * randn(x.shape, gen, device=x.device, dtype=x.dtype) * mask[:, None].to(x.dtype)
    return out


def road(
    model: Any,
    x: Tensor,
    y: Tensor,
    maps: Tensor,
    *,
    percentages: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    order: str = "morf",
    noise: float = 0.01,
    score: str = "accuracy",
    generator: Any = None,
    chunk_size: int | None = None,
    tol: float = 1e-8,
    max_iter: int | None = None,
    return_curve: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """ROAD, RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient
    Evaluation Strategy for Attribution Methods"): for every percentage ``p`` the ``int(H * W * p / 100)`` most
    (``order="morf"``) or least (``"lerf"``) relevant pixels are removed and filled by
    :func:`noisy_linear_imputation`; the curve is the accuracy (``score="accuracy"``: argmax equals ``y``) or
    the softmax probability of ``y`` (``"probability"``) per image and percentage; the score its mean over the
    percentages. MoRF: lower is better; LeRF: higher is better.

    Randomness (the seeding convention): image ``b`` draws its tie-breaking keys (see the module docstring) and
    then one ``randn((C, H, W))`` noise image per percentage, in the order of ``percentages``.

    Relation to Quantus 0.6 ``ROAD`` (MoRF only, accuracy only, the same imputation via
    ``quantus.functions.perturb_func.noisy_linear_imputation`` and the same ``int(H * W * p / 100)``): equal on
    single-channel images. On colour images Quantus indexes the ``C * H * W`` broadcast attribution with an
    ``H * W`` pixel mask and fails with an ``IndexError``; here all channels of a removed pixel are imputed.

    Args:
        percentages: removal percentages, each in ``[0, 100)``; order: ``"morf"`` or ``"lerf"``.
        noise: standard deviation of the imputation noise (pixel units); score: ``"accuracy"`` or
            ``"probability"``; tol / max_iter: of the imputation solve; chunk_size: images per forward (and per
            batched solve); return_curve: also return the ``(B, len(percentages))`` curve.

    >>> import torch
    >>> from fragdefense.models import create_model
    >>> model = create_model("small_cnn", width=4).eval()
    >>> road(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.rand(2, 8, 8), percentages=(20, 50),
    ...      generator=[0, 1]).shape
    torch.Size([2])
    """
    x, y, a, gen, chunk = _prepare(model, x, y, maps, generator, chunk_size)
    b, c, h, w = x.shape
    d = h * w
    if isinstance(percentages, (str, bytes)) or not isinstance(percentages, Sequence) or len(percentages) == 0:
        raise TypeError(f"`percentages` must be a non-empty sequence of numbers in [0, 100), got {percentages!r}")
    for p in percentages:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p < 100):
            raise ValueError(f"`percentages` must hold numbers in [0, 100), got {p!r}")
    if order not in _ROAD_ORDERS:
        raise ValueError(f"`order` must be one of {_ROAD_ORDERS}, got {order!r}")
    if score not in _ROAD_SCORES:
        raise ValueError(f"`score` must be one of {_ROAD_SCORES}, got {score!r}")
    noise = check_nonneg_float(noise, "noise")
    tol = check_nonneg_float(tol, "tol")
    if max_iter is not None:
        check_int_in_range(max_iter, "max_iter", 1)
    if not isinstance(return_curve, bool):
        raise TypeError(f"`return_curve` must be a bool, got {return_curve!r}")
    chunk = chunk or _default_chunk(x, 2**19, 16)

    rank = _ranks(a.reshape(b, d), gen, descending=(order == "morf"))
    n_p = len(percentages)
    ks = torch.tensor([int(d * p / 100) for p in percentages], device=x.device)

    def build(start: int, stop: int) -> Tensor:
        r = torch.arange(start, stop, device=x.device)
        bi, pi = r // n_p, r % n_p
        removed = (rank[bi] < ks[pi, None]).view(-1, h, w)
        out = _linear_imputation(x[bi], removed, tol, max_iter)
        if noise > 0:
            g = [gen[i] for i in bi.tolist()] if isinstance(gen, list) else gen
            out = out + noise * randn(out.shape, g, device=x.device, dtype=x.dtype) * removed[:, None].to(x.dtype)
        return out

    curve = _row_scores(model, b * n_p, build, y.repeat_interleave(n_p), chunk, score).view(b, n_p)
    mean = curve.mean(1)
    return (mean, curve) if return_curve else mean


# ----------------------------------------------------------------------------------------------------------
# faithfulness correlation
# ----------------------------------------------------------------------------------------------------------
def faithfulness_correlation(
    model: Any,
    x: Tensor,
    y: Tensor,
    maps: Tensor,
    *,
    subset_size: int | None = None,
    n_runs: int | None = None,
    baseline: str | float | Tensor = "zeros",
    output: str = "logit",
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    generator: Any = None,
    subsets: Tensor | None = None,
    chunk_size: int | None = None,
    return_runs: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Faithfulness correlation (Bhatt, Weller & Moura, "Evaluating and Aggregating Feature-based Model
    Explanations"): higher is better, in ``[-1, 1]``.

    In each of ``n_runs`` runs a random subset of ``subset_size`` pixels (all channels) is set to the baseline;
    the score is the Pearson correlation over the runs between the attribution sum of the subset and the drop
    ``f_y(x) - f_y(x_subset)`` of the logit (``output="logit"``, Quantus's default ``softmax=False``) or the
    softmax probability (``"probability"``). **Degenerate input:** when either has zero variance over the runs (a
    constant or all-zero map, a model whose output does not move) the score is 0, not NaN.

    Args:
        subset_size: pixels per subset, ``1 .. H * W`` (``None``: ``max(1, H * W // 20)``); n_runs: ``>= 2``
            (``None``: 100, Quantus's default).
        baseline: as in :func:`deletion_auc` (Quantus's ``perturb_baseline="black"`` is the per-image minimum
            ``x.amin((1, 2, 3), keepdim=True)``).
        generator: draws the subsets (image ``b``: ``rand((n_runs, H * W))`` with its generator, each row's
            ``subset_size`` smallest keys); per-image list for batch independence.
        subsets: ``(B, n_runs, subset_size)`` flat pixel indices (``i * W + j``) to use instead of random draws,
            e.g. to score several explainers on the same subsets (then ``subset_size`` / ``n_runs`` may be
            omitted).
        return_runs: also return the ``(B, n_runs)`` attribution sums and output drops.

    Relation to Quantus 0.6 ``FaithfulnessCorrelation``: identical on single-channel images for the same subsets
    (``normalise=False``, ``abs=False``; Quantus returns NaN for degenerate input). On colour images Quantus draws
    channel elements instead of pixels.

    >>> import torch
    >>> from fragdefense.models import create_model
    >>> model = create_model("small_cnn", width=4).eval()
    >>> faithfulness_correlation(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.zeros(2, 8, 8),
    ...                          subset_size=4, n_runs=5, generator=0)
    tensor([0., 0.])
    """
    x, y, a, gen, chunk = _prepare(model, x, y, maps, generator, chunk_size)
    b, c, h, w = x.shape
    d = h * w
    if subsets is not None:
        if not isinstance(subsets, Tensor) or subsets.is_floating_point() or subsets.dtype == torch.bool:
            raise TypeError("`subsets` must be an integer torch.Tensor (B, n_runs, subset_size) of pixel indices")
        if subsets.ndim != 3 or subsets.shape[0] != b:
            raise ValueError(f"`subsets` must have shape (B, n_runs, subset_size), got {tuple(subsets.shape)}")
        subset_size = subsets.shape[2] if subset_size is None else subset_size
        n_runs = subsets.shape[1] if n_runs is None else n_runs
    s = max(1, d // 20) if subset_size is None else check_int_in_range(subset_size, "subset_size", 1, d)
    r = 100 if n_runs is None else check_int_in_range(n_runs, "n_runs", 2)
    if subsets is not None:
        if tuple(subsets.shape) != (b, r, s):
            raise ValueError(f"`subsets` must have shape (B, n_runs, subset_size) = {(b, r, s)}")
        subsets = subsets.to(device=x.device, dtype=torch.long)
        if subsets.numel() and (int(subsets.min()) < 0 or int(subsets.max()) >= d):
            raise ValueError(f"`subsets` must hold flat pixel indices in [0, H * W) = [0, {d})")
        srt = subsets.sort(-1).values
        if s > 1 and bool((srt[..., 1:] == srt[..., :-1]).any()):
            raise ValueError("`subsets` must not repeat a pixel within a run")
    base_spec = _check_baseline(baseline, x, blur_kernel_size, blur_sigma)
    if output not in _OUTPUTS:
        raise ValueError(f"`output` must be one of {_OUTPUTS}, got {output!r}")
    if not isinstance(return_runs, bool):
        raise TypeError(f"`return_runs` must be a bool, got {return_runs!r}")
    chunk = chunk or _default_chunk(x)

    if subsets is None:
        kdt = torch.float32 if x.device.type == "mps" else torch.float64
        subsets = rand((b, r, d), gen, device=x.device, dtype=kdt).argsort(dim=-1, stable=True)[..., :s]
    base = _baseline_images(base_spec, x, blur_kernel_size, blur_sigma)
    n_rows = r + 1  # row 0: the image itself

    def build(start: int, stop: int) -> Tensor:
        rows = torch.arange(start, stop, device=x.device)
        bi, ri = rows // n_rows, rows % n_rows
        m = torch.zeros(stop - start, d, dtype=torch.bool, device=x.device)
        pert = ri > 0
        if bool(pert.any()):
            m[pert] = m[pert].scatter(1, subsets[bi[pert], ri[pert] - 1], True)
        return torch.where(m.view(-1, 1, h, w), base[bi], x[bi])

    out = _row_scores(model, b * n_rows, build, y.repeat_interleave(n_rows), chunk, output).view(b, n_rows)
    drops = (out[:, :1] - out[:, 1:]).to(torch.float64)
    sums = a.reshape(b, d).to(torch.float64).gather(1, subsets.reshape(b, r * s)).view(b, r, s).sum(-1)
    sc, dc = sums - sums.mean(1, keepdim=True), drops - drops.mean(1, keepdim=True)
    den = (sc.square().sum(1) * dc.square().sum(1)).sqrt()
    corr = torch.where(den > 0, (sc * dc).sum(1) / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(den))
    corr = corr.clamp(-1.0, 1.0).to(out.dtype)
    return (corr, sums.to(out.dtype), drops.to(out.dtype)) if return_runs else corr


# ----------------------------------------------------------------------------------------------------------
# registration: explanation scores fn(model, x, y, maps, explain, opts)
# ----------------------------------------------------------------------------------------------------------
def _kwargs(opts: dict[str, Any], fn: Any, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of a score from its ``opts`` (the score's own settings, flat, as keyword arguments of its
    functional form, plus ``generator``); ``None`` values mean the default. An option the function does not take
    is an error naming it (nothing is silently dropped)."""
    import inspect

    params = inspect.signature(fn).parameters
    kw = {k: v for k, v in opts.items() if v is not None}
    bad = sorted(k for k in kw if k not in params or k in ("model", "x", "y", "maps"))
    if bad:
        takes = [k for k in params if k not in ("model", "x", "y", "maps", "return_curve", "return_runs")]
        raise ValueError(f"{fn.__name__}: unknown option(s) {bad}; it takes {takes}")
    return {**kw, **(fixed or {})}


register_metric(
    "deletion_auc",
    lambda model, x, y, maps, explain, opts: deletion_auc(model, x, y, maps, **_kwargs(opts, deletion_auc)),
    kind="explanation",
    label="deletion AUC",
    similarity=False,
    report=False,
)
register_metric(
    "insertion_auc",
    lambda model, x, y, maps, explain, opts: insertion_auc(model, x, y, maps, **_kwargs(opts, insertion_auc)),
    kind="explanation",
    label="insertion AUC",
    similarity=True,
    report=False,
)
register_metric(
    "road_morf",
    lambda model, x, y, maps, explain, opts: road(
        model, x, y, maps, **_kwargs({k: v for k, v in opts.items() if k != "order"}, road, {"order": "morf"})
    ),
    kind="explanation",
    label="ROAD MoRF",
    similarity=False,
    report=False,
)
register_metric(
    "road_lerf",
    lambda model, x, y, maps, explain, opts: road(
        model, x, y, maps, **_kwargs({k: v for k, v in opts.items() if k != "order"}, road, {"order": "lerf"})
    ),
    kind="explanation",
    label="ROAD LeRF",
    similarity=True,
    report=False,
)
register_metric(
    "faithfulness_correlation",
    lambda model, x, y, maps, explain, opts: faithfulness_correlation(
        model, x, y, maps, **_kwargs(opts, faithfulness_correlation)
    ),
    kind="explanation",
    label="faithfulness correlation",
    similarity=True,
    report=False,
)
