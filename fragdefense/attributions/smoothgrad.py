"""SmoothGrad, SmoothGrad-squared and VarGrad (Smilkov et al. 2017; Adebayo et al. 2018)."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from fragdefense.attributions._common import (
    OutputType,
    TargetType,
    check_chunk_size,
    check_model,
    check_output,
    check_x,
    chunk_rows,
    input_gradient,
    predicted_target,
    resolve_target,
)
from fragdefense.utils.checks import check_int_in_range, check_nonneg_float
from fragdefense.utils.conventions import make_generator

__all__ = ["smoothgrad", "SMOOTHGRAD_VARIANTS"]

Variant = Literal["smoothgrad", "smoothgrad_sq", "vargrad"]
SMOOTHGRAD_VARIANTS: tuple[str, ...] = ("smoothgrad", "smoothgrad_sq", "vargrad")


class _SampleNoise:
    """Standard-normal noise of sample ``i`` (shape of ``x``), drawn lazily in sample order so the
    noise does not depend on the chunk size; or slices of a user-supplied ``(n, B, C, H, W)`` tensor."""

    def __init__(self, x: Tensor, n: int, generator: torch.Generator | None, noise: Tensor | None) -> None:
        self.x, self.n, self.generator, self.noise = x, n, generator, noise
        self._i = -1
        self._cur: Tensor | None = None

    def rows(self, k: Tensor, b: Tensor) -> Tensor:
        if self.noise is not None:
            return self.noise[k, b]
        parts = []
        k_lo, k_hi = int(k[0]), int(k[-1])
        for i in range(k_lo, k_hi + 1):  # at most ceil(chunk / B) + 1 samples per chunk
            if i != self._i:
                if i != self._i + 1:
                    raise RuntimeError("noise samples must be requested in increasing order")
                self._cur = torch.randn(
                    self.x.shape, generator=self.generator, dtype=self.x.dtype, device=self.x.device
                )
                self._i = i
            assert self._cur is not None
            parts.append(self._cur[b[k == i]])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _make_generator(generator: torch.Generator | int | None, seed: int | None, x: Tensor) -> torch.Generator | None:
    """The seeding convention (:func:`~fragdefense.utils.conventions.make_generator`): ``generator`` is ``None``,
    an ``int`` seed or a ``torch.Generator`` on ``x``'s device; ``seed`` is its deprecated alias."""
    if generator is not None and seed is not None:
        raise ValueError("pass either `generator` or `seed`, not both")
    if seed is not None:
        warnings.warn(
            "`seed=` is deprecated, use `generator=` (it takes an int seed too)", DeprecationWarning, stacklevel=3
        )
        generator = check_int_in_range(seed, "seed", 0)
    return make_generator(generator, x.device)


def smoothgrad(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    n_samples: int = 50,
    sigma: float = 0.15,
    variant: Variant = "smoothgrad",
    generator: torch.Generator | int | None = None,
    seed: int | None = None,
    noise: Tensor | None = None,
    output: OutputType = "logit",
    internal_batch_size: int | None = 128,
) -> Tensor:
    """SmoothGrad of the simple gradient over ``n`` noisy copies ``x + sigma * eps_i``, eps ~ N(0, I):

    * ``"smoothgrad"``: ``mean_i g(x + sigma eps_i)``
    * ``"smoothgrad_sq"``: ``mean_i g(x + sigma eps_i)^2``
    * ``"vargrad"``: ``mean_i g^2 - (mean_i g)^2`` (clamped at 0 against rounding)

    as captum's ``NoiseTunnel(Saliency(abs=False))`` with ``stdevs=sigma``. ``g`` is the gradient of
    the target logit (``output="prob"``: softmax probability). Shape ``(B, C, H, W)``.

    **sigma** is an absolute standard deviation in pixel units of ``[0, 1]`` images, i.e. a fraction of
    the valid input range (the SmoothGrad paper uses a fraction of each image's max - min; for ``[0, 1]``
    images 0.1-0.2 corresponds to the paper's recommended 10-20 %). Noisy copies are not clipped.

    **Noise**: sample ``i`` of all ``B`` images is one ``torch.randn(x.shape, generator=...)`` draw,
    drawn in order ``i = 0..n-1`` (in ``x``'s dtype/device), so results are reproducible for a given
    ``generator`` seed / state and independent of ``internal_batch_size``. ``noise`` overrides the
    draws with a given standard-normal tensor of shape ``(n_samples, B, C, H, W)``.

    All ``B * n_samples`` noisy images are processed in batched chunks of ``internal_batch_size`` rows
    (sample-major: row ``r`` = sample ``r // B`` of image ``r % B``).

    Args:
        model, x, target: as in :func:`~fragdefense.attributions.saliency`; ``target=None`` is the
            predicted class of the *clean* ``x`` (argmax of ``model(x)`` without grad).
        create_graph: supported (differentiable w.r.t. ``x`` and the parameters; the noise is constant).
        n_samples: number of noisy copies, ``>= 1``.
        sigma: noise standard deviation (pixel units), ``>= 0``.
        variant: ``"smoothgrad"``, ``"smoothgrad_sq"`` or ``"vargrad"``.
        generator: ``None`` (torch's global RNG), an ``int`` seed or a ``torch.Generator`` on ``x``'s device
            type. ``seed``: deprecated alias of an int ``generator``.
        noise: optional explicit standard-normal draws ``(n_samples, B, C, H, W)``.
        output: ``"logit"`` or ``"prob"``.
        internal_batch_size: rows per chunk, or ``None`` for one chunk.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
        >>> x = torch.rand(2, 3, 4, 4)
        >>> a = smoothgrad(net, x, target=1, n_samples=4, sigma=0.1, generator=0)
        >>> b = smoothgrad(net, x, target=1, n_samples=4, sigma=0.1, generator=0, internal_batch_size=3)
        >>> torch.equal(a, b)
        True
        >>> torch.allclose(a, net[1].weight[1].view(1, 3, 4, 4).expand(2, -1, -1, -1))  # linear model
        True
    """
    check_model(model)
    check_x(x)
    check_output(output)
    check_int_in_range(n_samples, "n_samples", 1)
    sigma = check_nonneg_float(sigma, "sigma")
    if variant not in SMOOTHGRAD_VARIANTS:
        raise ValueError(f"`variant` must be one of {SMOOTHGRAD_VARIANTS}, got {variant!r}")
    chunk = check_chunk_size(internal_batch_size)
    gen = _make_generator(generator, seed, x)
    if noise is not None:
        if not isinstance(noise, Tensor) or noise.shape != (n_samples, *x.shape):
            shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(
                f"`noise` must be a tensor of shape (n_samples, B, C, H, W) = {(n_samples, *x.shape)}, got {shape}"
            )
        noise = noise.detach().to(device=x.device, dtype=x.dtype)
    t = predicted_target(model, x, target, check_range=False)
    xs = x if create_graph else x.detach()
    b_size = x.shape[0]
    draws = _SampleNoise(x, n_samples, gen, noise)
    need_sq = variant != "smoothgrad"
    total = torch.zeros_like(x)
    total_sq = torch.zeros_like(x) if need_sq else None
    first = True
    for rows in chunk_rows(b_size * n_samples, chunk, x.device):
        k, b = rows // b_size, rows % b_size
        z = xs[b] + sigma * draws.rows(k, b)
        if not z.requires_grad:
            z.requires_grad_(True)
        check = None if (target is None or not first) else partial(resolve_target, t, b_size, device=x.device)
        first = False
        g, _ = input_gradient(model, z, t[b], output, create_graph, resolved=True, on_num_classes=check)
        total = total.index_add(0, b, g)
        if total_sq is not None:
            total_sq = total_sq.index_add(0, b, g * g)
    mean = total / n_samples
    if variant == "smoothgrad":
        out = mean
    elif variant == "smoothgrad_sq":
        out = total_sq / n_samples  # type: ignore[operator]
    else:
        out = (total_sq / n_samples - mean * mean).clamp_min(0.0)  # type: ignore[operator]
    return out if create_graph else out.detach()
