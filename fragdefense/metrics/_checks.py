"""Validators specific to the similarity metrics (private).

The generic checks (shape, floating dtype, integer ranges) live in :mod:`fragdefense.utils.checks`; these add
the metric-specific ones: finite values, non-negative weights, spatial ``(B, H, W)`` layout, binary masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fragdefense.utils.checks import check_maps, check_pair

__all__ = [
    "check_finite",
    "check_nonneg",
    "check_spatial",
    "check_nonempty",
    "check_mask",
    "check_one_map",
    "check_two_maps",
]


def check_finite(a: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` naming ``name`` if ``a`` holds NaN or Inf.

    A finite sum proves every element finite (NaN and Inf propagate through a sum) with one reduction and no
    bool tensor; only a non-finite sum (non-finite input, or an overflowing sum) takes the elementwise test.
    """
    if a.numel() and bool(torch.isfinite(a.detach().sum())):
        return a
    if not bool(torch.isfinite(a).all()):
        bad = "NaN" if bool(torch.isnan(a).any()) else "Inf"
        raise ValueError(f"`{name}` contains {bad} values; maps must be finite")
    return a


def check_nonneg(a: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` naming ``name`` if ``a`` has a negative entry (weights must be >= 0)."""
    if a.numel() and float(a.detach().min()) < 0.0:
        raise ValueError(
            f"`{name}` must be non-negative (it is used as weights/mass); got min={float(a.min()):.4g}. "
            f"Pass `{name}.abs()` (or clamp it) for signed attributions"
        )
    return a


def check_spatial(a: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` naming ``name`` unless ``a`` has shape ``(B, H, W)``."""
    if a.ndim != 3:
        raise ValueError(f"`{name}` must have shape (B, H, W) for this metric, got shape {tuple(a.shape)}")
    return a


def check_nonempty(a: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` naming ``name`` if a map has no element (``D == 0``)."""
    if a.shape[1:].numel() == 0:  # D == 0 (an empty batch, B == 0, is fine)
        raise ValueError(f"`{name}` must have at least one element per map, got shape {tuple(a.shape)}")
    return a


def check_one_map(a: Tensor, name: str = "a", *, spatial: bool = False, finite: bool = True) -> Tensor:
    """Full check of a single map batch: type/ndim/dtype, optional ``(B, H, W)``, non-empty, finite."""
    check_maps(a, name)
    if spatial:
        check_spatial(a, name)
    check_nonempty(a, name)
    if finite:
        check_finite(a, name)
    return a


def check_two_maps(
    a: Tensor, b: Tensor, names: tuple[str, str] = ("a", "b"), *, spatial: bool = False, finite: bool = True
) -> None:
    """Full check of a pair of map batches: :func:`check_pair` plus :func:`check_one_map` on each.

    ``finite=False`` skips the NaN/Inf scan (for callers that scan a combined tensor themselves).
    """
    check_pair(a, b, names)
    check_one_map(a, names[0], spatial=spatial, finite=finite)
    check_one_map(b, names[1], spatial=spatial, finite=finite)


def check_mask(mask: Tensor, like: Tensor, name: str = "mask", like_name: str = "a") -> Tensor:
    """Check a binary mask with the shape of ``like``; return it as ``torch.bool``.

    Accepts ``torch.bool`` or a numeric dtype whose values are all 0 or 1.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(
            f"`{name}` must have the same shape as `{like_name}`, got {tuple(mask.shape)} for `{name}` and "
            f"{tuple(like.shape)} for `{like_name}`"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"`{name}` must be boolean or hold only 0/1 values, got dtype {mask.dtype}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"`{name}` must be binary (bool or values in {{0, 1}})")
    return mask != 0
