"""Input validation shared by the functional core.

Every public function validates its arguments with these helpers so that bad input fails with an error
that names the argument and the expected form (shape, dtype, range) instead of being silently clipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "as_model_dtype",
    "check_images",
    "check_maps",
    "check_pair",
    "check_int_in_range",
    "check_nonneg_float",
    "parse_eps",
]


def check_images(x: Tensor, name: str = "x", *, unit_range: bool = True) -> Tensor:
    """Check a batch of images ``(B, C, H, W)``: floating dtype, finite, and (optionally) in ``[0, 1]``.

    >>> check_images(torch.rand(2, 3, 8, 8)).shape
    torch.Size([2, 3, 8, 8])
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"`{name}` must have shape (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must have a floating dtype (images in [0, 1]), got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty batch of images (B, C, H, W), got B = 0")
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or Inf values; images must be finite and in [0, 1]")
    if unit_range:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"`{name}` must hold pixel values in [0, 1] (models normalise internally), "
                f"got min={lo:.4g}, max={hi:.4g}"
            )
    return x


def as_model_dtype(x: Tensor, model: Any) -> Tensor:
    """``x`` in the floating dtype of ``model``'s parameters (float64 images on a float32 model are computed in
    float32 instead of failing inside the first layer); unchanged when the model has no floating parameter.

    >>> net = torch.nn.Linear(2, 2)
    >>> as_model_dtype(torch.zeros(1, 2, dtype=torch.float64), net).dtype
    torch.float32
    """
    p = next((q for q in getattr(model, "parameters", lambda: iter(()))() if q.is_floating_point()), None)
    if p is None or x.dtype == p.dtype or not x.is_floating_point():
        return x
    return x.to(p.dtype)


def check_maps(a: Tensor, name: str = "a") -> Tensor:
    """Check a batch of maps ``(B, H, W)`` or ``(B, D)`` with a floating dtype.

    >>> check_maps(torch.rand(4, 5, 5)).shape
    torch.Size([4, 5, 5])
    """
    if not isinstance(a, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (B, H, W) or (B, D), got {type(a).__name__}")
    if a.ndim not in (2, 3):
        raise ValueError(f"`{name}` must have shape (B, H, W) or (B, D), got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"`{name}` must have a floating dtype, got {a.dtype}")
    return a


def check_pair(a: Tensor, b: Tensor, names: tuple[str, str] = ("a", "b")) -> tuple[Tensor, Tensor]:
    """Check two map batches of identical shape."""
    check_maps(a, names[0])
    check_maps(b, names[1])
    if a.shape != b.shape:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a, b


def check_int_in_range(k: int, name: str, lo: int, hi: int | None = None) -> int:
    """Check an integer ``lo <= k <= hi`` (``hi=None``: no upper bound).

    >>> check_int_in_range(3, "k", 1, 10)
    3
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"`{name}` must be an int, got {type(k).__name__}")
    if k < lo or (hi is not None and k > hi):
        upper = "" if hi is None else f" and <= {hi}"
        raise ValueError(f"`{name}` must be >= {lo}{upper}, got {k}")
    return k


def check_nonneg_float(v: float, name: str) -> float:
    """Check a finite number ``>= 0`` (e.g. an attack budget ``eps``).

    >>> check_nonneg_float(0.03, "eps")
    0.03
    """
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number >= 0, got {v!r}") from None
    if not (f >= 0.0) or f == float("inf"):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {v!r}")
    return f


def parse_eps(v: Any) -> float:
    """A budget / step size in pixel units of ``[0, 1]`` images: a number, or a string ``"8/255"``, ``"0.03"``
    (:func:`fragdefense.utils.conventions.parse_budget`, the one parser of budgets).

    >>> parse_eps("8/255") == 8 / 255, parse_eps(0.5), parse_eps("1/2")
    (True, 0.5, 0.5)
    """
    from fragdefense.utils.conventions import parse_budget

    return parse_budget(v, "eps")
