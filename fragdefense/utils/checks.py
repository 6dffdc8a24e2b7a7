"""Input validation shared by the functional core.

Every public function validates its arguments with these helpers so that bad input fails with an error
that names the argument and the expected form (shape, dtype, range) instead of being silently clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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
    "check_labels",
    "check_batch",
    "check_positive_int",
    "check_finite_float",
    "check_probability",
    "check_choice",
    "check_budget_list",
    "check_bool",
    "check_names",
    "check_file",
    "check_device",
    "optional",
    "validate_config",
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


def check_batch(x: Tensor, name: str = "x", *, unit_range: bool = True) -> Tensor:
    """Check a non-empty batch of inputs ``(B, ...)`` (``B >= 1``, at least 2-D) with a floating dtype and finite
    values; images ``(B, C, H, W)`` also get the ``[0, 1]`` range check of :func:`check_images` (unless
    ``unit_range=False``).

    >>> check_batch(torch.rand(3, 5)).shape
    torch.Size([3, 5])
    """
    if isinstance(x, Tensor) and x.ndim == 4:
        return check_images(x, name, unit_range=unit_range)
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"`{name}` must be a batch (B, ...) such as images (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must have a floating dtype, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty batch (B, ...), got B = 0")
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or Inf values")
    return x


def check_labels(y: Any, batch: int, n_classes: int | None = None, name: str = "y") -> Tensor:
    """Check class labels: an integer tensor of shape ``(batch,)`` with values in ``[0, n_classes - 1]`` (range
    not checked when ``n_classes`` is ``None``).

    >>> check_labels(torch.tensor([0, 2]), 2, 3).tolist()
    [0, 2]
    >>> check_labels(torch.tensor([0, 3]), 2, 3)
    Traceback (most recent call last):
    ...
    ValueError: `y` must hold class labels in [0, 2], got min 0, max 3
    """
    if not isinstance(y, Tensor) or y.shape != (batch,):
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"`{name}` must be a LongTensor of shape ({batch},) (one class label per image), got {got}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer class labels, got dtype {y.dtype}")
    if n_classes is not None and batch:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"`{name}` must hold class labels in [0, {n_classes - 1}], got min {lo}, max {hi}")
    return y


def check_positive_int(v: Any, name: str) -> int:
    """Check an int ``>= 1`` (a count or a size).

    >>> check_positive_int(4, "n_images")
    4
    """
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise (TypeError if not isinstance(v, int) or isinstance(v, bool) else ValueError)(
            f"`{name}` must be an int >= 1, got {v!r}"
        )
    return v


def check_finite_float(
    v: Any, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
) -> float:
    """Check a finite real number, optionally ``>= lo`` (``> lo`` with ``lo_open``) and ``<= hi``.

    >>> check_finite_float(1e-3, "tol", 0.0, lo_open=True)
    0.001
    """
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not (isinstance(v, Tensor) and v.numel() == 1):
        raise TypeError(f"`{name}` must be a number, got {v!r}")
    f = float(v)
    bound = ""
    if lo is not None:
        bound = f" {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        bound += f"{' and' if bound else ''} <= {hi:g}"
    bad = not math.isfinite(f) or (lo is not None and (f <= lo if lo_open else f < lo)) or (hi is not None and f > hi)
    if bad:
        raise ValueError(f"`{name}` must be a finite number{bound}, got {v!r}")
    return f


def check_probability(v: Any, name: str) -> float:
    """Check a number in ``[0, 1]``.

    >>> check_probability(0.25, "rate")
    0.25
    """
    return check_finite_float(v, name, 0.0, 1.0)


def check_choice(v: Any, name: str, choices: Sequence[Any]) -> Any:
    """Check that ``v`` is one of ``choices`` (e.g. the names of a registry).

    >>> check_choice("cg", "solver", ("exact", "cg"))
    'cg'
    """
    if v not in tuple(choices):
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {v!r}")
    return v


def check_budget_list(v: Any, name: str) -> list[float]:
    """A non-empty list of budgets (numbers or fraction strings such as ``"8/255"``) as floats.

    >>> check_budget_list(["1/255", 0.5], "eps")[1]
    0.5
    """
    from fragdefense.utils.conventions import parse_budget

    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, Sequence) or isinstance(v, str) or not len(v):
        raise ValueError(f"`{name}` must be a non-empty list of budgets such as ['4/255', '8/255'], got {v!r}")
    return [parse_budget(e, name) for e in v]


def check_bool(v: Any, name: str) -> bool:
    """Check ``True`` / ``False`` (not a string such as ``"no"``, which is truthy).

    >>> check_bool(False, "figures")
    False
    """
    if not isinstance(v, bool):
        raise TypeError(f"`{name}` must be true or false, got {v!r}")
    return v


def check_names(v: Any, name: str, choices: Sequence[str] | None = None, *, allow_empty: bool = False) -> list[str]:
    """Check a list of names (a single string is a list of one), without duplicates, each one of ``choices`` when
    given (e.g. a registry's names).

    >>> check_names(["topk", "random_sign"], "attacks", ["topk", "random_sign", "mass_center"])
    ['topk', 'random_sign']
    """
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, Sequence) or not all(isinstance(e, str) for e in v):
        raise TypeError(f"`{name}` must be a list of names, got {v!r}")
    v = list(v)
    if not v and not allow_empty:
        raise ValueError(f"`{name}` is empty; give at least one" + (f" of {', '.join(choices)}" if choices else ""))
    if len(set(v)) != len(v):
        raise ValueError(f"`{name}` has duplicates: {v}")
    for e in v:
        if choices is not None and e not in choices:
            raise ValueError(f"`{name}` entry {e!r} is not registered; expected any of {', '.join(choices)}")
    return v


def check_file(v: Any, name: str) -> str:
    """Check the path of an existing file.

    >>> check_file(__file__, "checkpoint") == __file__
    True
    """
    from pathlib import Path

    if not isinstance(v, (str, Path)) or not str(v):
        raise TypeError(f"`{name}` must be a file path, got {v!r}")
    if not Path(v).is_file():
        raise FileNotFoundError(f"`{name}` {str(v)!r} does not exist or is not a file")
    return str(v)


def check_device(v: Any, name: str = "device") -> str:
    """Check a device string: ``"auto"`` or anything ``torch.device`` reads (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    >>> check_device("cuda:1")
    'cuda:1'
    """
    if not isinstance(v, str):
        raise TypeError(f"`{name}` must be 'auto' or a torch device string such as 'cpu' or 'cuda:0', got {v!r}")
    if v != "auto":
        try:
            torch.device(v)
        except (RuntimeError, ValueError):
            raise ValueError(
                f"`{name}`={v!r} is not a device; expected 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1'"
            ) from None
    return v


def optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """``check`` that lets ``None`` through (for config keys whose ``null`` means "default").

    >>> optional(check_positive_int)(None, "n") is None, optional(check_positive_int)(2, "n")
    (True, 2)
    """

    def f(v: Any, name: str) -> Any:
        return None if v is None else check(v, name)

    return f


_MISSING = object()


def _lookup(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if node is None or not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def validate_config(cfg: Mapping[str, Any], spec: Mapping[str, Callable[[Any, str], Any]]) -> dict[str, Any]:
    """Check a command's config before any work: ``spec`` maps a (dotted) key to ``check(value, key)``, which
    raises an error naming the key or returns the parsed value. Keys absent from ``cfg`` are skipped. Returns the
    parsed values by key.

    >>> validate_config({"n_images": 8, "attack": {"eps": "8/255"}},
    ...                 {"n_images": check_positive_int, "attack.eps": check_budget_list})["attack.eps"]
    [0.03137254901960784]
    >>> validate_config({"n_images": 0}, {"n_images": check_positive_int})
    Traceback (most recent call last):
    ...
    ValueError: `n_images` must be an int >= 1, got 0
    """
    out: dict[str, Any] = {}
    for key, check in spec.items():
        v = _lookup(cfg, key)
        if v is _MISSING:
            continue
        out[key] = check(v, key)
    return out
