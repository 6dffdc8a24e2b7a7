"""Per-channel attributions ``(B, C, H, W)`` -> saliency maps ``(B, H, W)``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["to_map", "REDUCTIONS"]

Reduce = Literal["abs_sum", "abs_mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("abs_sum", "abs_mean", "sum")


def to_map(attr: Tensor, reduce: Reduce = "abs_sum", normalize: bool = True) -> Tensor:
    """Reduce the channels of an attribution and optionally normalise each map to sum 1.

    * ``"abs_sum"`` (default, Ghorbani et al. / Dombrowski et al.): ``S = sum_c |a_c|``
    * ``"abs_mean"`` (ART's evaluation): ``S = mean_c |a_c|``
    * ``"sum"``: ``S = sum_c a_c`` (signed)

    ``normalize=True`` divides each map by the sum of its absolute values, ``S / sum_ij |S_ij|``: a
    non-negative map then sums to 1 (a signed ``"sum"`` map has absolute values summing to 1).
    An all-zero map has no mass to normalise and **stays all zero** (never NaN, zero gradient).
    Differentiable (``|.|`` has subgradient 0 at 0). float16/bfloat16 attributions are reduced and normalised
    in float32 (a half-precision total mass overflows to ``inf`` already at 224 x 224) and returned in their
    own dtype. Non-finite attributions (NaN, Inf) give that image a non-finite map (NaN where the input was
    not finite); the metrics in :mod:`fragdefense.metrics` reject such maps with a ``ValueError``.

    Args:
        attr: attribution ``(B, C, H, W)`` (e.g. from :func:`~fragdefense.attributions.saliency`).
        reduce: channel reduction, one of ``"abs_sum"``, ``"abs_mean"``, ``"sum"``.
        normalize: normalise each map to unit mass.

    Returns:
        maps ``(B, H, W)``.

    Example:
        >>> a = torch.tensor([[[[1.0, -3.0]], [[1.0, 1.0]]]])  # (1, 2, 1, 2)
        >>> to_map(a, normalize=False)
        tensor([[[2., 4.]]])
        >>> to_map(a)
        tensor([[[0.3333, 0.6667]]])
        >>> to_map(torch.zeros(1, 3, 2, 2)).sum().item()
        0.0
    """
    if not isinstance(attr, Tensor):
        raise TypeError(f"`attr` must be a torch.Tensor of shape (B, C, H, W), got {type(attr).__name__}")
    if attr.ndim != 4:
        raise ValueError(f"`attr` must have shape (B, C, H, W), got shape {tuple(attr.shape)}")
    if not attr.is_floating_point():
        raise TypeError(f"`attr` must have a floating dtype, got {attr.dtype}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"`reduce` must be one of {REDUCTIONS}, got {reduce!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"`normalize` must be True or False, got {normalize!r}")
    low = attr.dtype in (torch.float16, torch.bfloat16)
    x = attr.float() if low else attr
    if reduce == "abs_sum":
        m = x.abs().sum(dim=1)
    elif reduce == "abs_mean":
        m = x.abs().mean(dim=1)
    else:
        m = x.sum(dim=1)
    if normalize:
        mass = m.abs().sum(dim=(1, 2), keepdim=True)
        m = m / torch.where(mass > 0, mass, torch.ones_like(mass))
    return m.to(attr.dtype) if low else m
