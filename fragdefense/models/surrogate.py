"""Softplus surrogate of *any* ReLU network, applied at the function level.

A ReLU network's saliency map is piecewise constant in the input, so its input gradient is zero almost
everywhere (Ghorbani, Abid & Zou, "Interpretation of Neural Networks is Fragile"). Attacks and curvature probes
therefore differentiate a surrogate whose ReLUs are ``softplus(beta * z) / beta``.

:func:`softplus_surrogate` wraps a model without copying or editing it: while the wrapper's ``forward`` runs, a
:class:`torch.overrides.TorchFunctionMode` maps every ReLU *call* — ``nn.ReLU`` modules, ``F.relu``,
``torch.relu``, ``Tensor.relu`` and their in-place variants — to the softplus. Models that call ``F.relu`` inside
``forward`` (many hand-written models, torchvision's Inception v3 and DenseNet) are therefore smoothed as well as
models built from ``nn.ReLU`` modules; module surgery (:func:`fragdefense.models.to_softplus`) only sees modules.
The wrapped model is a submodule of the wrapper, so parameters and buffers are the model's own (no copy).

In the same mode, eval-mode batch norm is computed as its per-channel affine map (one ``addcmul``; same values
up to rounding), whose double backward is one multiplication where ATen's evaluates the training-mode formula.

In-place ReLU calls (``F.relu(x, inplace=True)``) return the softplus out of place: the in-place form would
overwrite the input that the softplus derivative needs. Code that relies on the side effect of an in-place ReLU
(using ``x`` after ``F.relu_(x)`` without taking the result) is not covered. ``clamp(min=0)`` written by hand
is not recognised as a ReLU.

Every forward records which activation functions the model called (:attr:`SoftplusSurrogate.found`), so a
caller can say which activations it saw when there was no ReLU to smooth.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fragdefense.models.softplus import _SoftplusFn

__all__ = ["SoftplusSurrogate", "softplus_surrogate", "ACTIVATION_FUNCTIONS"]

_THRESHOLD = 20.0

_RELU_FUNCS: frozenset[Any] = frozenset(
    {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
)

#: activation functions reported by :attr:`SoftplusSurrogate.found` (name -> function); ReLU calls are smoothed,
#: the others are left as they are (they are already smooth, or piecewise linear but not a ReLU).
ACTIVATION_FUNCTIONS: dict[str, Any] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "hardtanh": F.hardtanh,
    "leaky_relu": F.leaky_relu,
    "prelu": F.prelu,
    "rrelu": F.rrelu,
    "elu": F.elu,
    "selu": F.selu,
    "celu": F.celu,
    "gelu": F.gelu,
    "silu": F.silu,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "threshold": F.threshold,
}
_ACT_NAME: dict[Any, str] = {fn: name for name, fn in ACTIVATION_FUNCTIONS.items()}
_ACT_NAME.update({f: "relu" for f in _RELU_FUNCS})
_ACT_NAME.update({F.sigmoid: "sigmoid", F.tanh: "tanh", torch.Tensor.sigmoid: "sigmoid", torch.Tensor.tanh: "tanh"})


def _softplus(z: Tensor, beta: float) -> Tensor:
    """``softplus(beta z) / beta`` with the cheap exact second derivative of
    :class:`fragdefense.models.softplus._SoftplusFn` when a backward through it will be taken."""
    if (
        not (torch.is_grad_enabled() and z.requires_grad)
        or torch._C._are_functorch_transforms_active()
        or torch.jit.is_tracing()
    ):
        return F.softplus(z, beta, _THRESHOLD)
    return _SoftplusFn.apply(z, beta, _THRESHOLD)


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _eval_batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """Eval-mode ``F.batch_norm`` as ``input * scale + shift``; ``None`` when the call is not eval-mode with
    running statistics (then the stock function runs)."""
    a = dict(_BN_DEFAULTS)
    a.update(zip(_BN_ARGS, args))
    a.update(kwargs)
    x, rm, rv = a["input"], a["running_mean"], a["running_var"]
    if a["training"] or rm is None or rv is None or not isinstance(x, Tensor) or x.ndim < 2:
        return None
    scale = torch.rsqrt(rv + a["eps"])
    if a["weight"] is not None:
        scale = a["weight"] * scale
    shift = -rm * scale
    if a["bias"] is not None:
        shift = shift + a["bias"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


class _SoftplusMode(TorchFunctionMode):
    """While active: ReLU calls -> ``softplus(beta z) / beta``; eval batch norm -> affine map; activation calls
    counted in ``found``."""

    def __init__(self, beta: float, found: Counter) -> None:
        super().__init__()
        self.beta = beta
        self.found = found

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _ACT_NAME.get(func)
        if name is not None:
            self.found[name] += 1
            if name == "relu":
                return _softplus(args[0] if args else kwargs["input"], self.beta)
        elif func is F.batch_norm:
            out = _eval_batch_norm(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class SoftplusSurrogate(nn.Module):
    """``model`` with every ReLU call evaluated as ``softplus(beta * z) / beta`` (see the module docstring).

    Attributes:
        model: the wrapped network (a submodule: its parameters and buffers are shared, never copied).
        beta: softplus sharpness, ``> 0``; may be changed between calls (growing-beta schedules).
        found: activation calls seen by the last forward, ``{name: count}`` (``"relu"`` are the smoothed ones).
    """

    def __init__(self, model: nn.Module, beta: float = 1.0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.beta = _check_beta(beta)
        self.found: Counter = Counter()

    @property
    def n_relu_calls(self) -> int:
        """ReLU calls smoothed by the last forward."""
        return int(self.found.get("relu", 0))

    def describe_activations(self) -> str:
        """The activations the last forward called, e.g. ``"gelu x12, softplus x2"`` (``"none"``)."""
        return ", ".join(f"{k} x{v}" for k, v in sorted(self.found.items())) or "none"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.found = Counter()
        with _SoftplusMode(float(self.beta), self.found):
            return self.model(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


def _check_beta(beta: Any) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise TypeError(f"`beta` must be a number > 0, got {beta!r}") from None
    if not (b > 0.0) or b == float("inf"):
        raise ValueError(f"`beta` must be a finite number > 0, got {beta!r}")
    return b


def softplus_surrogate(model: nn.Module, beta: float = 1.0) -> SoftplusSurrogate:
    """Wrap ``model`` so that every ReLU call is ``softplus(beta * z) / beta`` (parameters shared).

    Works for any ``nn.Module``: ``nn.ReLU`` modules, ``F.relu`` / ``torch.relu`` calls in ``forward`` and the
    in-place variants are all smoothed. Wrapping an existing surrogate re-wraps its model (no nesting).

    Args:
        model: any network (images -> logits).
        beta: softplus sharpness ``> 0``; ``softplus_beta -> relu`` as ``beta -> inf``.

    Example:
        >>> import torch
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 3)
        ...     def forward(self, x):
        ...         return torch.relu(self.fc(x)).sum(1)  # a functional ReLU, invisible to module surgery
        >>> net = Net()
        >>> soft = softplus_surrogate(net, beta=10.0)
        >>> soft.model is net, soft.model.fc.weight is net.fc.weight
        (True, True)
        >>> x = torch.randn(2, 4)
        >>> bool(torch.allclose(soft(x), (torch.nn.functional.softplus(net.fc(x), 10.0) ).sum(1)))
        True
        >>> soft.n_relu_calls
        1
    """
    if isinstance(model, SoftplusSurrogate):
        model = model.model
    return SoftplusSurrogate(model, beta)
