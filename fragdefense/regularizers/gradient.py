"""Input-gradient regularizers: Ross & Doshi-Velez's gradient norm and CURE's curvature penalty."""

from __future__ import annotations

from torch import Tensor, nn

from fragdefense.regularizers.base import Regularizer, RegularizerOutput, per_sample_ce_input_grad
from fragdefense.utils.conventions import parse_budget

__all__ = ["InputGradient", "CURE"]


def _grad_at_train_input(
    model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor
) -> tuple[Tensor, Tensor]:
    """``(x_g, d CE / d x_g)`` with graph, reusing the task forward when ``x_train`` requires grad."""
    if x_train.requires_grad and logits.requires_grad:
        return x_train, per_sample_ce_input_grad(logits, x_train, y, create_graph=True)
    xg = x_train.detach().requires_grad_(True)
    return xg, per_sample_ce_input_grad(model(xg), xg, y, create_graph=True)


class InputGradient(Regularizer):
    r"""Input-gradient regularization (Ross & Doshi-Velez, AAAI 2018, "Improving the adversarial robustness
    and interpretability of deep neural networks by regularizing their input gradients").

    Objective: :math:`\mathrm{CE}(x) + \lambda \cdot \frac1B \sum_b \lVert \nabla_{x_b} \mathrm{CE}(f(x_b), y_b)
    \rVert_2^2`, gradients in pixel units of ``[0, 1]`` images. Cost: one double back-propagation (the task
    forward pass is reused), about 2-3x a plain step.

    Args:
        weight: lambda.
        warmup_epochs: linear warm-up of lambda.
        norm: ``"l2sq"`` (squared L2, the paper) or ``"l1"``.

    >>> import torch
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    >>> x = torch.rand(2, 3, 4, 4, requires_grad=True); y = torch.tensor([0, 1])
    >>> out = InputGradient(weight=1.0).penalty(net, x, x, y, net(x))
    >>> out.penalty.ndim, bool(out.penalty > 0)
    (0, True)
    """

    name = "input_grad"
    needs_input_grad = True
    second_order = True

    def __init__(self, weight: float = 1.0, warmup_epochs: float = 0.0, norm: str = "l2sq") -> None:
        super().__init__(weight, warmup_epochs)
        if norm not in ("l2sq", "l1"):
            raise ValueError(f"`norm` must be 'l2sq' or 'l1', got {norm!r}")
        self.norm = norm

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        _, g = _grad_at_train_input(model, x, x_train, y, logits)
        g = g.flatten(1)
        per = g.pow(2).sum(1) if self.norm == "l2sq" else g.abs().sum(1)
        return RegularizerOutput(per.mean())


class CURE(Regularizer):
    r"""Curvature regularization (Moosavi-Dezfooli et al., CVPR 2019, "Robustness via curvature
    regularization, and vice versa").

    Objective: :math:`\ell(x) + \lambda \cdot \frac1B \sum_b \lVert \nabla \ell(x_b + h z_b) - \nabla \ell(x_b)
    \rVert_2^2` with :math:`z = \mathrm{sign}(\nabla \ell(x)) / \lVert \mathrm{sign}(\nabla \ell(x)) \rVert_2`
    (a finite difference of the input gradient along the gradient sign, i.e. :math:`\approx h^2 \lVert Hz
    \rVert^2`). Cost: two forward and two double-backward passes, about 3-4x.

    Args:
        weight: lambda (the paper ramps it to 4).
        h: step length (L2, pixel units of ``[0, 1]``). The paper's ``h = 1.5`` is in normalised-input
            units (std ~ 0.25), i.e. about 0.375 here, which is the default. A number or a budget string.

    >>> import torch
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.Softplus(), nn.Linear(8, 3))
    >>> x = torch.rand(2, 3, 4, 4, requires_grad=True); y = torch.tensor([0, 1])
    >>> bool(CURE(h=0.1).penalty(net, x, x, y, net(x)).penalty >= 0)
    True
    """

    name = "cure"
    needs_input_grad = True
    second_order = True

    def __init__(self, weight: float = 4.0, warmup_epochs: float = 0.0, h: float | str = 0.375) -> None:
        super().__init__(weight, warmup_epochs)
        self.h = parse_budget(h, "h")  # a length in pixel units: a number or a string such as "96/255"
        if not self.h > 0:
            raise ValueError(f"`h` must be a number > 0, got {h!r}")

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        xg, g0 = _grad_at_train_input(model, x, x_train, y, logits)
        z = g0.detach().sign()
        norm = z.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (z.ndim - 1)))
        xz = (xg.detach() + self.h * z / norm).requires_grad_(True)
        g1 = per_sample_ce_input_grad(model(xz), xz, y, create_graph=True)
        per = (g1 - g0).flatten(1).pow(2).sum(1)
        return RegularizerOutput(per.mean())
