"""Threat models as small step / project classes (MadryLab ``robustness`` style).

An attack iterate moves by ``step(x, g, alpha)`` and is mapped back into the feasible set by
``project(x, x0)`` = the eps-ball around the original ``x0`` intersected with the pixel range ``[0, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fragdefense.utils.checks import check_nonneg_float
from fragdefense.utils.conventions import rand, randn

__all__ = ["ThreatModel", "LinfThreat", "L2Threat", "make_threat"]


class ThreatModel:
    """Base class. ``eps`` is in pixel units of ``[0, 1]`` images."""

    name = "base"

    def __init__(self, eps: float) -> None:
        self.eps = check_nonneg_float(eps, "eps")

    def step(self, x: Tensor, grad: Tensor, alpha: float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def project(self, x: Tensor, x0: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def random_start(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def random_direction(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random ascent direction for random-walk baselines (Gaussian)."""
        return randn(x0.shape, generator, x0.device, x0.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:g})"


class LinfThreat(ThreatModel):
    """``||x - x0||_inf <= eps``: signed-gradient steps, clipping projection.

    >>> t = LinfThreat(0.1)
    >>> x0 = torch.full((1, 1, 2, 2), 0.5)
    >>> t.project(t.step(x0, torch.ones_like(x0), 0.3), x0).max().item()
    0.6000000238418579
    """

    name = "linf"

    def step(self, x: Tensor, grad: Tensor, alpha: float) -> Tensor:
        return x + alpha * grad.sign()

    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(x, x0 - self.eps), x0 + self.eps).clamp(0.0, 1.0)

    def random_start(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        u = rand(x0.shape, generator, x0.device, x0.dtype)
        return self.project(x0 + (2 * u - 1) * self.eps, x0)

    def random_direction(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return super().random_direction(x0, generator).sign()


class L2Threat(ThreatModel):
    """``||x - x0||_2 <= eps`` per image: normalised-gradient steps, radial projection (then ``[0, 1]``).

    >>> t = L2Threat(1.0)
    >>> x0 = torch.full((2, 3, 4, 4), 0.5)
    >>> d = t.project(x0 + torch.randn(2, 3, 4, 4), x0) - x0
    >>> bool((d.flatten(1).norm(dim=1) <= 1.0 + 1e-6).all())
    True
    """

    name = "l2"

    @staticmethod
    def _norm(v: Tensor) -> Tensor:
        return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.ndim - 1)))

    def step(self, x: Tensor, grad: Tensor, alpha: float) -> Tensor:
        return x + alpha * grad / self._norm(grad)

    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        d = x - x0
        d = d * torch.clamp(self.eps / self._norm(d), max=1.0)
        return (x0 + d).clamp(0.0, 1.0)

    def random_start(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        d = randn(x0.shape, generator, x0.device, x0.dtype)
        r = rand((x0.shape[0],), generator, x0.device, x0.dtype)
        d = d / self._norm(d) * (self.eps * r).view(-1, *([1] * (x0.ndim - 1)))
        return self.project(x0 + d, x0)


_THREATS = {"linf": LinfThreat, "l2": L2Threat}


def make_threat(name: str, eps: float) -> ThreatModel:
    """Threat model by name (``"linf"`` or ``"l2"``)."""
    if name not in _THREATS:
        raise ValueError(f"unknown `threat`={name!r}; expected one of {sorted(_THREATS)}")
    return _THREATS[name](eps)
