"""Training-mode BatchNorm with a cheap, exact double backward (for second-order training objectives).

Penalties on input gradients (``input_grad``, CURE, RAR, IGR, ART, SSR) back-propagate through the graph of a
first backward pass. In a network with training-mode BatchNorm every such pass crosses ATen's
``batchnorm_double_backward``, a general formula of some forty elementwise passes that dominated the step on
CPU. :func:`double_backward_batchnorm_` switches a model's BatchNorm layers to an implementation whose forward
and first backward are ATen's own kernels and whose second backward is the closed form below (about a dozen
passes). Values, running statistics and derivatives of every order are those of ``nn.BatchNorm`` (tests:
``gradcheck``/``gradgradcheck`` and third derivatives in float64, and a whole network against stock layers).

Closed form (per channel, ``N`` elements, ``r = 1/sqrt(var + eps)``, ``x^ = (x - mean) r``, and
``P(v) = v - mean(v) - x^ mean(v x^)`` the projection off ``span{1, x^}``): the first backward is
``gx = gamma r P(gy)``, ``g_gamma = sum(gy x^)``, ``g_beta = sum(gy)``. Given upstream gradients ``u``
(of ``gx``), ``u_gamma``, ``u_beta``, the second backward is

* w.r.t. ``gy``: ``gamma r P(u) + u_gamma x^ + u_beta``;
* w.r.t. ``x``: ``-gamma r^2 [x^ mean(u P(gy)) + mean(gy x^) P(u) + mean(u x^) P(gy)] + u_gamma r P(gy)``;
* w.r.t. ``gamma``: ``r N mean(u P(gy))``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["double_backward_batchnorm_"]


def _under_vmap(t: Tensor) -> bool:
    """Whether ``t`` is batched by a vmap: ``torch.func`` transforms, or the legacy batching of
    ``autograd.grad(..., is_grads_batched=True)``. The closed-form path saves tensors for a later backward,
    which a batched tensor must not outlive, so these cases take ATen's differentiable formula."""
    f = torch._C._functorch
    return bool(
        torch._C._are_functorch_transforms_active()
        or getattr(f, "is_legacy_batchedtensor", lambda _t: False)(t)
        or getattr(f, "is_batchedtensor", lambda _t: False)(t)
    )


def _ch(t: Tensor, nd: int) -> Tensor:
    return t.view((1, -1) + (1,) * (nd - 2))


def _dims(nd: int) -> list[int]:
    return [0, *range(2, nd)]


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm (running statistics updated by ATen); first backward by ATen, or through
    :class:`_BatchNormBackward` when a graph of the gradient is being built."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        momentum: float,
        eps: float,
    ) -> Tensor:
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        if not torch.is_grad_enabled() or _under_vmap(gy):
            # first order only, or batched gradients: ATen's kernel (differentiable by ATen's own formula)
            mask = list(ctx.needs_input_grad[:3])
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                gy, x, weight, None, None, mean, invstd, True, ctx.eps, mask
            )
            return gx, gw, gb, None, None, None, None
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, gw, gb, None, None, None, None


class _BatchNormBackward(torch.autograd.Function):
    """``(gy, x, weight) -> (gx, g_gamma, g_beta)`` of training-mode batch norm, backward in closed form."""

    @staticmethod
    def forward(ctx: Any, gy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float) -> Any:
        ctx.set_materialize_grads(False)  # unused outputs give None, not zero tensors to multiply
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
        ctx.save_for_backward(gy, x, weight, mean, invstd)
        ctx.eps = eps
        return gx, gw, gb

    @staticmethod
    def backward(ctx: Any, ux: Tensor | None, uw: Tensor | None, ub: Tensor | None) -> tuple[Tensor | None, ...]:
        gy, x, weight, mean, invstd = ctx.saved_tensors
        nd = x.ndim
        dims = _dims(nd)
        if torch.is_grad_enabled():  # a graph of this backward (third order): mean, invstd as functions of x
            var, mean = torch.var_mean(x, dims, correction=0)
            invstd = torch.rsqrt(var + ctx.eps)
        r = _ch(invstd, nd)
        xhat = torch.addcmul(_ch(-mean * invstd, nd), x, r)
        m_gx = (gy * xhat).mean(dims, keepdim=True)
        pg = torch.addcmul(gy, xhat, -m_gx).sub_(gy.mean(dims, keepdim=True))  # P(gy)
        gr = _ch(weight, nd) * r
        g_gy = g_x = g_w = None
        if ux is not None:
            m_ux = (ux * xhat).mean(dims, keepdim=True)
            m_upg = (ux * pg).mean(dims, keepdim=True)
            pu = torch.addcmul(ux, xhat, -m_ux).sub_(ux.mean(dims, keepdim=True))  # P(u)
            g_gy = pu * gr
            c = -gr * r
            g_x = (xhat * (c * m_upg)).addcmul_(pu, c * m_gx).addcmul_(pg, c * m_ux)
            g_w = (r * m_upg).flatten() * (x.numel() // x.shape[1])
        if uw is not None:
            uwc = _ch(uw, nd)
            g_gy = uwc * xhat if g_gy is None else g_gy.addcmul_(xhat, uwc)
            g_x = pg * (uwc * r) if g_x is None else g_x.addcmul_(pg, uwc * r)
        if ub is not None:
            ubc = _ch(ub, nd)
            g_gy = ubc.expand_as(gy).clone() if g_gy is None else g_gy.add_(ubc)
        return g_gy, g_x, g_w, None, None, None


class _DoubleBackwardBatchNorm:
    """Mixin: training-mode forward through :class:`_BatchNormTrain` when the layer is affine and tracks running
    statistics with a momentum; every other case (eval mode, cumulative averages, no affine, vmap, autocast) is
    the stock layer."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.BatchNorm's signature
        bn: Any = self
        if (
            not (
                bn.training
                and bn.affine
                and bn.track_running_stats
                and bn.momentum is not None
                and bn.running_mean is not None
                and bn.num_batches_tracked is not None
            )
            or _under_vmap(input)
            or torch.is_autocast_enabled(input.device.type)
        ):  # mixed precision: stock layer
            return super().forward(input)  # type: ignore[misc]
        bn._check_input_dim(input)
        bn.num_batches_tracked.add_(1)
        return _BatchNormTrain.apply(
            input, bn.weight, bn.bias, bn.running_mean, bn.running_var, float(bn.momentum), float(bn.eps)
        )


class _DoubleBackwardBatchNorm1d(_DoubleBackwardBatchNorm, nn.BatchNorm1d):
    pass


class _DoubleBackwardBatchNorm2d(_DoubleBackwardBatchNorm, nn.BatchNorm2d):
    pass


class _DoubleBackwardBatchNorm3d(_DoubleBackwardBatchNorm, nn.BatchNorm3d):
    pass


_SWAP: dict[type, type] = {
    nn.BatchNorm1d: _DoubleBackwardBatchNorm1d,
    nn.BatchNorm2d: _DoubleBackwardBatchNorm2d,
    nn.BatchNorm3d: _DoubleBackwardBatchNorm3d,
}


def double_backward_batchnorm_(model: nn.Module) -> int:
    """Give every ``nn.BatchNorm1d/2d/3d`` of ``model`` (in place) a cheap exact double backward in training
    mode; returns how many layers were switched. Parameters, buffers, ``state_dict`` and ``isinstance`` checks
    are unchanged, so checkpoints load into stock layers. Regularizers whose objective differentiates an input
    gradient call this from ``prepare_model``.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> double_backward_batchnorm_(net), isinstance(net[1], nn.BatchNorm2d)
    (1, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    return swap_classes_(model, _SWAP)


def swap_classes_(model: nn.Module, mapping: dict[type, type]) -> int:
    """Set ``m.__class__ = mapping[type(m)]`` for every submodule whose exact type is a key (the new classes
    subclass the old ones and only override ``forward``, so state is untouched); returns how many changed."""
    n = 0
    for m in model.modules():
        new = mapping.get(type(m))
        if new is not None:
            m.__class__ = new
            n += 1
    return n
