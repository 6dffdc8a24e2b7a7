"""Softplus surrogate of a ReLU network by module surgery, and the softplus with a cheap second derivative.

A ReLU network's saliency map is piecewise constant in the input, so its input gradient is zero almost
everywhere. Attacks differentiate a copy whose ReLUs are ``softplus(beta * z) / beta``; the copy *shares*
every parameter and buffer with the original, so training the original moves the surrogate with it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.models.batchnorm import _SWAP as _DOUBLE_BACKWARD_BN
from fragdefense.models.batchnorm import swap_classes_

__all__ = ["to_softplus", "relu_to_softplus_", "set_softplus_beta", "count_relus"]


class _SoftplusFn(torch.autograd.Function):
    """``F.softplus`` with a second derivative that costs three multiplications per product.

    PyTorch's double backward of ``softplus`` recomputes ``sigmoid(beta z)``, the threshold mask and their
    products on every backward pass through the first-order graph; input-Hessian products, attacks on saliency
    maps and curvature regularizers do that pass many times over one graph. Here the first-order backward is
    ``grad * s(z)`` with ``s = softplus'`` computed once by :class:`_SoftplusGrad`, which saves
    ``softplus''``; later passes only multiply by saved tensors. Values and derivatives equal ``F.softplus``'s
    at every order (tests: ``gradgradcheck`` and third derivatives in float64). When no graph of the gradient
    is being built the backward is ATen's fused ``softplus_backward``, so first-order use costs the same as
    ``nn.Softplus``.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, beta: float, threshold: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.beta, ctx.threshold = beta, threshold
        return F.softplus(z, beta, threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (z,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # first order only
            return torch.ops.aten.softplus_backward(grad, z, ctx.beta, ctx.threshold), None, None
        return grad * _SoftplusGrad.apply(z, ctx.beta, ctx.threshold), None, None


class _SoftplusGrad(torch.autograd.Function):
    """``softplus'(z) = sigmoid(beta z)`` (1 where ``beta z > threshold``). Its backward multiplies by
    ``softplus''(z) = beta s (1 - s)`` (0 in the linear regime), saved in the forward pass; when a graph of
    that backward is being built (third derivatives, ``torch.autograd.functional.hvp``'s double-backward trick)
    it is recomputed from ``z`` with differentiable operations instead, so every order stays exact."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, beta: float, threshold: float) -> Tensor:
        bz = z * beta
        s = torch.sigmoid(bz)
        linear = bz > threshold
        ctx.save_for_backward(z, (beta * s * (1.0 - s)).masked_fill_(linear, 0.0))
        ctx.beta, ctx.threshold = beta, threshold
        return s.masked_fill_(linear, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        z, s2 = ctx.saved_tensors
        if torch.is_grad_enabled():  # higher order: differentiable in z and in grad
            bz = z * ctx.beta
            s = torch.sigmoid(bz)
            s2 = (ctx.beta * s * (1.0 - s)).masked_fill(bz > ctx.threshold, 0.0)
        return grad * s2, None, None


class _EvalAffine:
    """Mixin for BatchNorm layers of a :func:`to_softplus` copy: in eval mode the layer is the per-channel
    affine map ``x * scale + shift`` (``scale = weight / sqrt(running_var + eps)``), computed as one
    ``addcmul``. Same values as ``F.batch_norm`` up to rounding, but its backward is one multiplication, where
    ATen's eval-mode batch-norm double backward evaluates the general training-mode formula on every pass.
    Training mode is unchanged."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.BatchNorm's signature
        bn: Any = self
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return super().forward(input)  # type: ignore[misc]
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = bn.weight * scale
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        shape = (1, -1) + (1,) * (input.ndim - 2)
        return torch.addcmul(shift.view(shape), input, scale.view(shape))


class _EvalAffineBatchNorm1d(_EvalAffine, nn.BatchNorm1d):
    pass


class _EvalAffineBatchNorm2d(_EvalAffine, nn.BatchNorm2d):
    pass


class _EvalAffineBatchNorm3d(_EvalAffine, nn.BatchNorm3d):
    pass


_EVAL_AFFINE: dict[type, type] = {
    nn.BatchNorm1d: _EvalAffineBatchNorm1d,
    nn.BatchNorm2d: _EvalAffineBatchNorm2d,
    nn.BatchNorm3d: _EvalAffineBatchNorm3d,
}
# layers of a model being trained by a second-order regularizer (fragdefense.models.batchnorm) too
_EVAL_AFFINE.update({fast: _EVAL_AFFINE[stock] for stock, fast in _DOUBLE_BACKWARD_BN.items()})


class _Softplus(nn.Softplus):
    """``nn.Softplus`` whose ``beta`` may be changed in place (for growing-beta schedules), with a cheap
    second derivative (:class:`_SoftplusFn`)."""

    def __init__(self, beta: float) -> None:
        # threshold scales with beta so the linear regime starts at the same z for every beta
        super().__init__(beta=float(beta), threshold=20.0)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Softplus's signature
        if (
            not (torch.is_grad_enabled() and input.requires_grad)  # no backward through this call
            or torch._C._are_functorch_transforms_active()  # torch.func (vmap, grad, jvp)
            or torch.jit.is_tracing()  # export
        ):
            return F.softplus(input, float(self.beta), float(self.threshold))
        return _SoftplusFn.apply(input, float(self.beta), float(self.threshold))


def count_relus(model: nn.Module) -> int:
    """Number of ``nn.ReLU`` modules in ``model``."""
    return sum(isinstance(m, nn.ReLU) for m in model.modules())


def to_softplus(model: nn.Module, beta: float = 1.0) -> nn.Module:
    """Return a copy of ``model`` with every ``nn.ReLU`` replaced by ``softplus(beta * z) / beta``.

    The copy shares parameters and buffers with ``model`` (no memory is duplicated and updates to one are
    seen by the other). It is built for repeated second-order use (attacks on saliency maps, input-Hessian
    products): its softplus has a cheap second derivative (:class:`_SoftplusFn`) and its BatchNorm layers
    compute their eval-mode affine map directly (:class:`_EvalAffine`); values are unchanged.

    Only ``nn.ReLU`` *modules* are replaced: ``F.relu`` calls inside ``forward`` are not visible to module
    surgery. Attacks, probes and explanation defenses use :func:`fragdefense.models.softplus_surrogate`, which
    smooths every ReLU *call* of any model; this module-swap form is kept for models built from modules and
    as the baseline of ``benchmarks/bench_attacks.py``.

    Args:
        model: a network built from ``nn.ReLU`` modules.
        beta: softplus sharpness, ``> 0``; ``softplus_beta -> relu`` as ``beta -> inf``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> soft = to_softplus(net, beta=10.0)
        >>> soft[0].weight is net[0].weight
        True
        >>> isinstance(soft[1], nn.Softplus)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not (float(beta) > 0.0):
        raise ValueError(f"`beta` must be a number > 0, got {beta!r}")
    memo: dict[int, object] = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    clone = copy.deepcopy(model, memo)
    n = _replace(clone, float(beta))
    swap_classes_(clone, _EVAL_AFFINE)  # cheaper eval-mode BatchNorm in the copy (same values, see _EvalAffine)
    if n == 0:
        warnings.warn(
            "to_softplus: `model` contains no nn.ReLU module; the copy is identical to the model",
            stacklevel=2,
        )
    return clone


def relu_to_softplus_(model: nn.Module, beta: float) -> int:
    """Replace every ``nn.ReLU`` module of ``model`` *in place* by ``softplus(beta * z) / beta``; returns how
    many were replaced (for training a softplus network; :func:`to_softplus` makes a sharing copy instead).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> relu_to_softplus_(net, 10.0), type(net[1]).__name__
    (1, '_Softplus')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not (float(beta) > 0.0):
        raise ValueError(f"`beta` must be a number > 0, got {beta!r}")
    return _replace(model, float(beta))


def _replace(module: nn.Module, beta: float) -> int:
    n = 0
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, _Softplus(beta))
            n += 1
        else:
            n += _replace(child, beta)
    return n


def set_softplus_beta(model: nn.Module, beta: float) -> int:
    """Set ``beta`` of every softplus created by :func:`to_softplus` in place (or the ``beta`` of a
    :class:`~fragdefense.models.surrogate.SoftplusSurrogate`, leaving its model untouched); returns how many
    changed.

    >>> soft = to_softplus(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), beta=1.0)
    >>> set_softplus_beta(soft, 50.0)
    1
    """
    if not (float(beta) > 0.0):
        raise ValueError(f"`beta` must be a number > 0, got {beta!r}")
    from fragdefense.models.surrogate import SoftplusSurrogate

    if isinstance(model, SoftplusSurrogate):  # the function-level surrogate: its own beta only
        model.beta = float(beta)
        return 1
    n = 0
    for m in model.modules():
        if isinstance(m, _Softplus):
            m.beta = float(beta)
            n += 1
    return n
