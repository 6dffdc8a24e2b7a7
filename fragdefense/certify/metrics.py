"""Metrics of certified attributions reported by Anani, Lorenz, Fritz & Schiele, "Pixel-level Certified
Explanations via Randomized Smoothing": the certified rate against the radius, certified localization and
certified deletion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fragdefense.certify.smoothing import CertifiedAttribution
from fragdefense.utils.checks import check_images
from fragdefense.utils.conventions import eval_mode, make_generator, rand

__all__ = ["certified_rate_curve", "certified_localization", "DeletionResult", "certified_deletion"]


def _check_result(result: Any) -> CertifiedAttribution:
    if not isinstance(result, CertifiedAttribution):
        raise TypeError(f"`result` must be a CertifiedAttribution, got {type(result).__name__}")
    return result


def certified_rate_curve(result: CertifiedAttribution, radii: float | Sequence[float] | Tensor) -> Tensor:
    """``(B, len(radii))``: share of pixels certified with radius ``>= r``
    (:meth:`CertifiedAttribution.certified_rate_at`).

    >>> from fragdefense.certify import certify_attribution
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    >>> res = certify_attribution(net, torch.rand(1, 3, 4, 4), "saliency", n=50, generator=0)
    >>> certified_rate_curve(res, [0.0, 10.0]).tolist()
    [[1.0, 0.0]]
    """
    return _check_result(result).certified_rate_at(radii)


def certified_localization(result: CertifiedAttribution, mask: Tensor) -> Tensor:
    """``(B,)``: share of the certified-important pixels that lie inside the object mask ``(B, H, W)`` (bool, e.g.
    the masks of :func:`fragdefense.data.synthetic.generate_synthetic`); NaN for an image without any
    certified-important pixel.

    >>> from fragdefense.certify import certify_attribution
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    >>> res = certify_attribution(net, torch.rand(1, 3, 4, 4), "saliency", n=50, generator=0)
    >>> certified_localization(res, torch.ones(1, 4, 4, dtype=torch.bool)).tolist()
    [1.0]
    """
    imp = _check_result(result).certified_important
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(imp.shape):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"`mask` must be a tensor of shape (B, H, W) = {tuple(imp.shape)}, got {shape}")
    inside = (imp & mask.to(device=imp.device).bool()).flatten(1).sum(1).to(torch.float64)
    total = imp.flatten(1).sum(1).to(torch.float64)
    return torch.where(total > 0, inside / total.clamp_min(1.0), torch.full_like(total, float("nan")))


@dataclass
class DeletionResult:
    """Target-class probabilities ``(B,)`` of :func:`certified_deletion` and their drops from the clean image."""

    p_clean: Tensor
    p_certified: Tensor
    p_random: Tensor
    n_deleted: Tensor

    @property
    def drop_certified(self) -> Tensor:
        """``p_clean - p_certified``."""
        return self.p_clean - self.p_certified

    @property
    def drop_random(self) -> Tensor:
        """``p_clean - p_random``."""
        return self.p_clean - self.p_random


def certified_deletion(
    model: nn.Module,
    x: Tensor,
    result: CertifiedAttribution,
    *,
    baseline: float = 0.0,
    generator: Any = None,
) -> DeletionResult:
    """Certified deletion: the target-class softmax probability after the certified-important pixels are deleted (all
    channels set to ``baseline``, default 0) vs after the same number of uniformly random pixels are deleted.

    >>> from fragdefense.certify import certify_attribution
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    >>> x = torch.rand(2, 3, 4, 4)
    >>> res = certify_attribution(net, x, "saliency", n=50, generator=0)
    >>> d = certified_deletion(net, x, res, generator=0)
    >>> d.n_deleted.tolist(), d.drop_certified.shape
    ([4, 4], torch.Size([2]))
    """
    _check_result(result)
    check_images(x, "x")
    imp = result.certified_important.to(x.device)
    if tuple(imp.shape) != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"`result` holds maps of shape {tuple(imp.shape)}, which does not match `x` {tuple(x.shape)}")
    gen = make_generator(generator, x.device)
    flat = imp.flatten(1)
    n_del = flat.sum(1)
    scores = rand(flat.shape, gen, device=x.device, dtype=torch.float32)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    rnd = (ranks < n_del[:, None]).view_as(imp)
    t = result.target.to(x.device)
    with torch.no_grad(), eval_mode(model):
        xs = torch.cat([x, x.masked_fill(imp[:, None], baseline), x.masked_fill(rnd[:, None], baseline)])
        p = torch.softmax(model(xs.detach()), dim=1).gather(1, t.repeat(3)[:, None])[:, 0]
    b = x.shape[0]
    return DeletionResult(p_clean=p[:b], p_certified=p[b : 2 * b], p_random=p[2 * b :], n_deleted=n_del)
