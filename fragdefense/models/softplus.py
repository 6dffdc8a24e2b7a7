"""Softplus surrogate of a ReLU network (REFERENCE.md section 2).

A ReLU network's saliency map is piecewise constant in the input, so its input gradient is zero almost
everywhere. Attacks differentiate a copy whose ReLUs are ``softplus(beta * z) / beta``; the copy *shares*
every parameter and buffer with the original, so training the original moves the surrogate with it.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

__all__ = ["to_softplus", "relu_to_softplus_", "set_softplus_beta", "count_relus"]


class _Softplus(nn.Softplus):
    """``nn.Softplus`` whose ``beta`` may be changed in place (for growing-beta schedules)."""

    def __init__(self, beta: float) -> None:
        # threshold scales with beta so the linear regime starts at the same z for every beta
        super().__init__(beta=float(beta), threshold=20.0)


def count_relus(model: nn.Module) -> int:
    """Number of ``nn.ReLU`` modules in ``model``."""
    return sum(isinstance(m, nn.ReLU) for m in model.modules())


def to_softplus(model: nn.Module, beta: float = 1.0) -> nn.Module:
    """Return a copy of ``model`` with every ``nn.ReLU`` replaced by ``softplus(beta * z) / beta``.

    The copy shares parameters and buffers with ``model`` (no memory is duplicated and updates to one are
    seen by the other). Only ``nn.ReLU`` *modules* are replaced: ``F.relu`` calls inside ``forward`` are
    not visible to module surgery; every model in :mod:`fragdefense.models` uses modules.

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
    """Set ``beta`` of every softplus created by :func:`to_softplus` in place; returns how many changed.

    >>> soft = to_softplus(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), beta=1.0)
    >>> set_softplus_beta(soft, 50.0)
    1
    """
    if not (float(beta) > 0.0):
        raise ValueError(f"`beta` must be a number > 0, got {beta!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, _Softplus):
            m.beta = float(beta)
            n += 1
    return n
