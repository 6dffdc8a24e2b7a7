"""Explanation-side defenses: attribution methods that are harder to manipulate, with no retraining.

=================  =============  ==============================================================================
method             create_graph   definition
=================  =============  ==============================================================================
``beta_smooth``    yes (exact)    ``d s_c / dx`` of the softplus(beta) copy of the model (Dombrowski et al. 2019)
``uniform_grad``   yes            mean of ``d s_c / dx`` at ``x + u_i``, ``u_i`` uniform in an L-inf or L2 ball
                                  (Wang et al. 2020 "uniform gradient"; L2 ball as Wang & Kong 2024)
``local_smooth``   yes (unrolled) mask ``m in [0, 1]`` learned over noisy copies with an L1 penalty (Lim, Lee &
                                  Kim 2021, "RelEx"); the graph runs through the optimisation steps
=================  =============  ==============================================================================

All three have the registry's call shape ``method(model, x, target=None, *, create_graph=False, **opts)``
and return ``(B, C, H, W)``; with ``create_graph=False`` the result is detached, the model's mode and
parameters are untouched. ``target=None`` is the class predicted on the clean ``x``.

>>> import torch
>>> from fragdefense.attributions import attribute
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
>>> x = torch.rand(2, 3, 4, 4)
>>> attribute("local_smooth", net, x, n_samples=2, iters=3, generator=0).shape
torch.Size([2, 3, 4, 4])
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attributions._common import (
    OutputType,
    TargetType,
    check_chunk_size,
    check_model,
    check_output,
    check_target_form,
    check_x,
    chunk_rows,
    grad_input,
    input_gradient,
    make_baseline,
    predicted_target,
)
from fragdefense.attributions.smoothgrad import _make_generator, smoothgrad
from fragdefense.models.surrogate import softplus_surrogate
from fragdefense.utils.checks import check_int_in_range, check_nonneg_float
from fragdefense.utils.conventions import make_generator

__all__ = [
    "beta_smooth",
    "uniform_grad",
    "local_smooth",
    "local_smooth_objective",
    "uniform_ball_noise",
    "BALLS",
    "ROBUST_CREATE_GRAPH_METHODS",
]

Ball = Literal["linf", "l2"]
BALLS: tuple[str, ...] = ("linf", "l2")

#: the explanation-side defenses that return a differentiable map with ``create_graph=True``
ROBUST_CREATE_GRAPH_METHODS: tuple[str, ...] = ("beta_smooth", "local_smooth", "uniform_grad")


def _check_pos_float(v: float, name: str) -> float:
    v = check_nonneg_float(v, name)
    if v <= 0:
        raise ValueError(f"`{name}` must be a number > 0, got {v!r}")
    return v


# ----------------------------------------------------------------------------------------- beta_smooth
def beta_smooth(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    beta: float = 3.0,
    abs: bool = False,
    output: OutputType = "logit",
) -> Tensor:
    """beta-smoothed simple gradient (Dombrowski et al. 2019): ``d s_c(x) / dx`` of ``model`` with every ReLU
    call evaluated as ``softplus(beta z) / beta`` (:func:`fragdefense.models.softplus_surrogate`: ``nn.ReLU``
    modules and ``F.relu`` / ``torch.relu`` calls alike, parameters shared).

    The gradient of a softplus(beta) network approximates SmoothGrad of the ReLU network with a noise whose
    scale shrinks as ``1 / beta``; ``beta -> inf`` recovers :func:`~fragdefense.attributions.saliency`
    (away from the ReLU kinks). If ``model`` is itself a softplus surrogate (e.g. an attack's), its model is
    re-wrapped with *this* ``beta``, so an attack differentiates exactly the map that is explained. Softplus
    layers a model was *trained* with are part of the model and keep their own beta.

    Args:
        model, x, target, output, abs: as in :func:`~fragdefense.attributions.saliency`.
        create_graph: supported (exact: the map is smooth in ``x``, its gradient is the true one).
        beta: softplus sharpness ``> 0`` (default 3: noticeable smoothing of BatchNorm CNNs whose
            pre-activations are O(1); Dombrowski et al. tune beta per network).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2)).double()
        >>> x = torch.rand(3, 3, 2, 2, dtype=torch.float64)
        >>> from fragdefense.attributions import saliency
        >>> err = [float((beta_smooth(net, x, 0, beta=b) - saliency(net, x, 0)).abs().max()) for b in (1, 1e4)]
        >>> err[1] < err[0]
        True
    """
    check_model(model)
    check_x(x)
    check_output(output)
    beta = _check_pos_float(beta, "beta")
    form = check_target_form(target, x.shape[0])
    soft = softplus_surrogate(model, beta)
    inp = grad_input(x, create_graph)
    g, _ = input_gradient(soft, inp, form, output, create_graph)
    if soft.n_relu_calls == 0:
        warnings.warn(
            "beta_smooth: `model` calls no ReLU (activations found: "
            f"{soft.describe_activations()}); the result equals saliency",
            stacklevel=2,
        )
    if abs:
        g = g.abs()
    return g if create_graph else g.detach()


# ---------------------------------------------------------------------------------------- uniform_grad
def uniform_ball_noise(
    n: int,
    shape: torch.Size | tuple[int, ...],
    ball: Ball = "linf",
    *,
    generator: torch.Generator | int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` independent draws per image, uniform in the *unit* ball: shape ``(n, *shape)``.

    ``"linf"``: ``U[-1, 1]`` per coordinate. ``"l2"``: uniform in the unit L2 ball of each image
    (``C * H * W`` dimensions): a Gaussian direction normalised to norm 1, times ``U^(1/d)``.
    Drawn sample by sample (``i = 0..n-1``), so a prefix of the draws does not depend on ``n``. ``generator``:
    ``None`` (global RNG), an ``int`` seed or a ``torch.Generator`` on ``device``.

    >>> u = uniform_ball_noise(3, (2, 3, 4, 4), "l2", generator=torch.Generator().manual_seed(0))
    >>> u.shape, bool((u.flatten(2).norm(dim=2) <= 1).all())
    (torch.Size([3, 2, 3, 4, 4]), True)
    """
    if ball not in BALLS:
        raise ValueError(f"`ball` must be one of {BALLS}, got {ball!r}")
    check_int_in_range(n, "n_samples", 1)
    generator = make_generator(generator, device)
    shape = tuple(shape)
    out = []
    for _ in range(n):
        if ball == "linf":
            out.append(torch.rand(shape, generator=generator, dtype=dtype, device=device) * 2 - 1)
        else:
            d = math.prod(shape[1:])
            z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
            r = torch.rand(shape[0], generator=generator, dtype=dtype, device=device) ** (1.0 / d)
            norm = z.flatten(1).norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
            out.append(z * (r / norm).view(-1, *([1] * (len(shape) - 1))))
    return torch.stack(out)


def uniform_grad(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    n_samples: int = 50,
    radius: float | None = None,
    ball: Ball = "linf",
    generator: torch.Generator | int | None = None,
    seed: int | None = None,
    noise: Tensor | None = None,
    output: OutputType = "logit",
    internal_batch_size: int | None = 128,
) -> Tensor:
    """Uniform gradient: ``mean_i d s_c(x + r u_i) / dx`` with ``u_i`` uniform in the unit ball of ``ball``.

    ``ball="linf"`` (default): ``u_i ~ U[-1, 1]^d`` per coordinate, the "uniform gradient" of Wang et al.
    (2020, *Smoothed geometry for robust attribution*). ``ball="l2"``: uniform in the L2 ball of each image
    (Wang & Kong 2024, certified L2 attribution robustness). Noisy copies are not clipped to ``[0, 1]``.

    **radius** ``r`` in pixel units of ``[0, 1]`` images. ``None`` matches the per-coordinate standard
    deviation of SmoothGrad's default ``sigma = 0.15``: ``r = 0.15 sqrt(3)`` for L-inf,
    ``r = 0.15 sqrt(d + 2)`` (``d = C H W``) for L2.

    Computed by :func:`~fragdefense.attributions.smoothgrad` with the uniform draws as its noise (same
    batching: ``B * n_samples`` rows in chunks of ``internal_batch_size``, sample-major).

    Args:
        model, x, target, output: as in :func:`~fragdefense.attributions.saliency`.
        create_graph: supported (the noise is a constant).
        n_samples: number of noisy copies ``>= 1``.
        radius: ball radius ``>= 0`` or ``None`` (see above); ``ball``: ``"linf"`` or ``"l2"``.
        generator: RNG of the draws (:func:`uniform_ball_noise`): ``None`` (torch's global RNG), an ``int`` seed
            or a ``torch.Generator``; ``seed``: deprecated alias of an int ``generator``.
        noise: explicit unit-ball draws ``(n_samples, B, C, H, W)`` (scaled by ``radius``).
        internal_batch_size: rows per chunk, or ``None``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
        >>> a = uniform_grad(net, torch.rand(2, 3, 4, 4), target=1, n_samples=3, generator=0, ball="l2")
        >>> torch.allclose(a, net[1].weight[1].view(1, 3, 4, 4).expand(2, -1, -1, -1))  # linear model
        True
    """
    check_model(model)
    check_x(x)
    if ball not in BALLS:
        raise ValueError(f"`ball` must be one of {BALLS}, got {ball!r}")
    check_int_in_range(n_samples, "n_samples", 1)
    d = math.prod(x.shape[1:])
    if radius is None:
        radius = 0.15 * math.sqrt(3.0) if ball == "linf" else 0.15 * math.sqrt(d + 2.0)
    radius = check_nonneg_float(radius, "radius")
    if noise is None:
        gen = _make_generator(generator, seed, x)
        noise = uniform_ball_noise(n_samples, x.shape, ball, generator=gen, dtype=x.dtype, device=x.device)
    elif not isinstance(noise, Tensor) or noise.shape != (n_samples, *x.shape):
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(
            f"`noise` must be a tensor of shape (n_samples, B, C, H, W) = {(n_samples, *x.shape)}, got {shape}"
        )
    return smoothgrad(
        model,
        x,
        target,
        create_graph=create_graph,
        n_samples=n_samples,
        sigma=radius,
        noise=noise,
        output=output,
        internal_batch_size=internal_batch_size,
    )


# ---------------------------------------------------------------------------------------- local_smooth
def _noise_std(xs: Tensor, noise_level: float) -> Tensor:
    """Per-image noise std ``noise_level * (max - min)`` of the image (the paper's ``x_std``), ``(B, 1, 1, 1)``."""
    flat = xs.flatten(1)
    return (noise_level * (flat.amax(1) - flat.amin(1))).view(-1, 1, 1, 1)


def _mask_losses(
    model: nn.Module,
    xs: Tensor,
    mask: Tensor,
    eps: Tensor,
    std: Tensor,
    base: Tensor,
    t: Tensor,
    k: Tensor,
    b: Tensor,
    lambda2: float,
) -> Tensor:
    """Per-row data terms ``-log p_c(x_i m) - lambda2 log(1 - p_c(x_i (1 - m)) + 1e-7)`` for rows ``(k, b)``."""
    xi = xs[b] + std[b] * eps[k, b]
    d = xi - base[b]
    fg = base[b] + mask[b] * d
    bg = base[b] + (1 - mask[b]) * d
    logits = model(torch.cat([fg, bg]))
    n = b.numel()
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != 2 * n:
        raise ValueError(f"`model` must return logits of shape (B, K), got {getattr(logits, 'shape', logits)}")
    logp = F.log_softmax(logits, dim=1).gather(1, t[b].repeat(2)[:, None])[:, 0]
    p_bg = logp[n:].exp()
    return -logp[:n] - lambda2 * torch.log(1 - p_bg + 1e-7)


def local_smooth_objective(
    model: nn.Module,
    x: Tensor,
    mask: Tensor,
    target: Tensor,
    noise: Tensor,
    *,
    lambda1: float = 1e-4,
    lambda2: float = 1.0,
    noise_level: float = 0.1,
    baseline: float | Tensor | None = None,
) -> Tensor:
    """The per-image objective that :func:`local_smooth` minimises over ``mask``, shape ``(B,)``:

    ``mean_i [ -log p_c(x_i * m) - lambda2 log(1 - p_c(x_i * (1 - m)) + 1e-7) ] + lambda1 ||m||_1``

    with ``x_i = x + noise_level (max(x) - min(x)) noise_i`` (``noise``: standard-normal ``(N, B, C, H, W)``),
    ``p_c`` the softmax probability of class ``target`` and ``x * m`` meaning ``base + m (x - base)``
    (``baseline=None``: ``base = 0``, the literal product). Differentiable in ``x``, ``mask`` and the parameters.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 3))
    >>> x = torch.rand(2, 3, 2, 2)
    >>> local_smooth_objective(net, x, torch.ones_like(x), torch.tensor([0, 1]), torch.randn(4, 2, 3, 2, 2)).shape
    torch.Size([2])
    """
    n = noise.shape[0]
    b_size = x.shape[0]
    rows = torch.arange(n * b_size, device=x.device)
    k, b = rows // b_size, rows % b_size
    base = make_baseline(baseline, x)
    data = _mask_losses(model, x, mask, noise, _noise_std(x, noise_level), base, target, k, b, float(lambda2))
    per_image = torch.zeros(b_size, dtype=data.dtype, device=x.device).index_add(0, b, data) / n
    return per_image + lambda1 * mask.abs().flatten(1).sum(1)


def local_smooth(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    n_samples: int = 50,
    iters: int = 50,
    lambda1: float = 1e-4,
    lambda2: float = 1.0,
    noise_level: float = 0.1,
    lr: float = 0.1,
    momentum: float = 0.99,
    baseline: float | Tensor | None = None,
    mask_init: float | Tensor | None = None,
    generator: torch.Generator | int | None = None,
    seed: int | None = None,
    noise: Tensor | None = None,
    unroll: int | None = None,
    internal_batch_size: int | None = 256,
) -> Tensor:
    """Locally smoothed saliency (RelEx: Lim, Lee & Kim, "Building Reliable Explanations of
    Unreliable Neural Networks: Locally Smoothing Perspective of Model Interpretation", CVPR 2021): a per-image mask
    ``m in [0, 1]^(C x H x W)`` minimising :func:`local_smooth_objective` over noisy copies of ``x``.

    Algorithm (defaults = the authors' code, JBNU-VL/RelEx): ``m_0 ~ U(0, 0.01)``; at each of ``iters``
    steps draw ``N = n_samples`` fresh copies ``x_i = x + sigma eps_i`` (``sigma = noise_level * (max - min)``
    of the image, not clipped), take the gradient ``g`` of the mean loss w.r.t. ``m``, normalise it to unit
    L2 norm per image, and take an SGD step with momentum (``v <- momentum v + g``, ``m <- clip(m - lr v, 0, 1)``).
    The loss keeps the class probability with ``x_i * m`` (``-log p_c``), removes it with ``x_i * (1 - m)``
    (``-lambda2 log(1 - p_c)``), and penalises ``lambda1 ||m||_1``. All ``B`` images are optimised together
    (the ``2 B N`` masked copies of one step are forwarded in chunks of ``internal_batch_size`` rows); per-image
    normalisation keeps the images independent.

    Difference to the authors' code: their network takes *normalised* inputs, so their ``x * m`` masks
    toward the dataset mean; our models take ``[0, 1]`` pixels, and ``x * m`` masks toward black.
    ``baseline`` (``base + m (x - base)``) gives the authors' behaviour with ``baseline=<mean (1, C, 1, 1)>``.

    Cost: ``iters * 2 * n_samples`` forward+backward passes per image (defaults: 5000), see the
    ``robust_explanations`` docs for measured seconds.

    Args:
        model, x, target: as in :func:`~fragdefense.attributions.saliency` (class scores are softmax
            probabilities, as in the paper); ``target=None``: the class predicted on the clean ``x``.
        create_graph: supported by **unrolling**: the returned mask is differentiable w.r.t. ``x`` and the
            parameters through the last ``unroll`` optimisation steps (``None``: all of them; the noise and
            the earlier steps are constants). Memory grows with ``unroll * 2 * N * B`` activations.
        n_samples: noisy copies per step ``N >= 1`` (50). ``iters``: optimisation steps ``>= 1`` (50).
        lambda1: L1 weight (1e-4); ``lambda2``: weight of the background term (1).
        noise_level: noise std as a fraction of each image's value range (0.1).
        lr, momentum: SGD step size (0.1) and momentum (0.99) on the normalised gradient.
        baseline: masking reference (``None``: 0), a number or a tensor broadcastable to ``x`` (constant).
        mask_init: ``None`` (``U(0, 0.01)`` from the generator, the paper), a number, or a tensor
            broadcastable to ``x``, values in ``[0, 1]``.
        generator: RNG for the initial mask and the noise (``mask_init`` first, then the noise of step 0, 1,
            ... as ``randn(N, B, C, H, W)``): ``None`` (torch's global RNG), an ``int`` seed or a
            ``torch.Generator``. Deterministic under a seed (for a given batch; use ``noise`` for
            batch-independent draws). ``seed``: deprecated alias of an int ``generator``.
        noise: explicit standard-normal draws ``(iters, N, B, C, H, W)``.
        unroll: with ``create_graph=True``, the number of final steps kept in the graph (truncated
            back-propagation; ``None`` = ``iters``). Ignored without ``create_graph``.
        internal_batch_size: rows (masked copies) per forward chunk, or ``None``.

    Returns:
        the mask ``(B, C, H, W)`` with values in ``[0, 1]``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
        >>> x = torch.rand(2, 3, 4, 4)
        >>> m = local_smooth(net, x, n_samples=4, iters=5, generator=0)
        >>> again = local_smooth(net, x, n_samples=4, iters=5, generator=0)
        >>> m.shape, bool(((m >= 0) & (m <= 1)).all()), torch.equal(m, again)
        (torch.Size([2, 3, 4, 4]), True, True)
    """
    check_model(model)
    check_x(x)
    n = check_int_in_range(n_samples, "n_samples", 1)
    iters = check_int_in_range(iters, "iters", 1)
    lambda1 = check_nonneg_float(lambda1, "lambda1")
    lambda2 = check_nonneg_float(lambda2, "lambda2")
    noise_level = check_nonneg_float(noise_level, "noise_level")
    lr = _check_pos_float(lr, "lr")
    momentum = check_nonneg_float(momentum, "momentum")
    if momentum >= 1:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum}")
    chunk = check_chunk_size(internal_batch_size)
    if unroll is not None:
        unroll = check_int_in_range(unroll, "unroll", 1)
    n_track = (iters if unroll is None else min(unroll, iters)) if create_graph else 0
    gen = _make_generator(generator, seed, x)
    if noise is not None:
        if not isinstance(noise, Tensor) or noise.shape != (iters, n, *x.shape):
            shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(
                f"`noise` must be a tensor of shape (iters, n_samples, B, C, H, W) = {(iters, n, *x.shape)}, "
                f"got {shape}"
            )
        noise = noise.detach().to(device=x.device, dtype=x.dtype)
    t = predicted_target(model, x, target)
    base = make_baseline(baseline, x)
    if mask_init is None:
        m = torch.rand(x.shape, generator=gen, dtype=x.dtype, device=x.device) / 100
    else:
        m = make_baseline(mask_init, x, "mask_init").clone()
        if float(m.min()) < 0 or float(m.max()) > 1:
            raise ValueError("`mask_init` values must lie in [0, 1]")
    xs = x if create_graph else x.detach()
    b_size = x.shape[0]
    v = torch.zeros_like(m)
    tiny = torch.finfo(x.dtype).tiny
    with torch.enable_grad():
        for it in range(iters):
            track = it >= iters - n_track
            if noise is not None:
                eps = noise[it]
            else:
                eps = torch.randn((n, *x.shape), generator=gen, dtype=x.dtype, device=x.device)
            if not track:
                m, v = m.detach(), v.detach()
            xi = xs if track else xs.detach()
            if not m.requires_grad:
                m.requires_grad_(True)
            std = _noise_std(xi, noise_level)
            grad_m = torch.zeros_like(m)
            for rows in chunk_rows(n * b_size, chunk, x.device):
                k, b = rows // b_size, rows % b_size
                loss = _mask_losses(model, xi, m, eps, std, base, t, k, b, lambda2).sum() / n
                (g,) = torch.autograd.grad(loss, m, create_graph=track)
                grad_m = grad_m + g
            grad_m = grad_m + lambda1 * torch.sign(m)  # d|m|/dm (m >= 0: 1, and 0 at 0 as torch.abs)
            if not track:
                grad_m = grad_m.detach()
            norm = grad_m.flatten(1).norm(dim=1).clamp_min(tiny).view(-1, 1, 1, 1)
            v = momentum * v + grad_m / norm
            m = (m - lr * v).clamp(0.0, 1.0)
    return m if create_graph else m.detach()
