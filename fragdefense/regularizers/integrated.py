"""Integrated-gradients regularizers: RAR's IG-NORM and IG-SUM-NORM (Chen et al.) and IGR (Wang & Kong)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attacks.pgd import pgd_attack
from fragdefense.attacks.threat import make_threat
from fragdefense.attributions import integrated_gradients
from fragdefense.regularizers.base import (
    Regularizer,
    RegularizerOutput,
    check_attack_mode,
    check_max_samples,
    check_steps,
    eval_mode,
    same_input,
)
from fragdefense.utils.checks import check_int_in_range
from fragdefense.utils.conventions import parse_budget, resolve_step_size

__all__ = ["loss_path_ig", "IGNorm", "IGSumNorm", "IGR"]


def loss_path_ig(
    model: nn.Module,
    x: Tensor,
    x_end: Tensor,
    y: Tensor,
    steps: int = 5,
    *,
    create_graph: bool = True,
    internal_batch_size: int | None = None,
) -> Tensor:
    r"""Integrated gradients of the loss along the straight path from ``x`` to ``x_end`` (RAR's
    :math:`IG^\ell(x, x')`): :math:`(x' - x) \odot \frac1m \sum_{i=1}^m \nabla \ell(x + \tfrac im (x' - x))`,
    with :math:`\ell` the per-sample cross-entropy. Its sum over features approximates
    :math:`\ell(x') - \ell(x)` (completeness).

    Args:
        steps: quadrature points ``m`` (right Riemann rule).
        create_graph: keep the graph (w.r.t. ``x``, ``x_end`` and the parameters) for double back-propagation.
        internal_batch_size: path points per chunk (``None``: all ``steps`` at once). With
            ``create_graph=True`` the chunks' graphs are all kept, so only the transient activations shrink.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 3))
    >>> x = torch.rand(2, 3, 2, 2); xe = torch.rand(2, 3, 2, 2); y = torch.tensor([0, 2])
    >>> ig = loss_path_ig(net, x, xe, y, steps=200, create_graph=False)
    >>> ce = lambda z: F.cross_entropy(net(z), y, reduction="none")
    >>> torch.allclose(ig.sum((1, 2, 3)), ce(xe) - ce(x), atol=1e-2)  # completeness
    True
    """
    steps = check_int_in_range(steps, "steps", 1)
    chunk = steps if internal_batch_size is None else check_int_in_range(internal_batch_size, "internal_batch_size", 1)
    b = x.shape[0]
    d = x_end - x
    total = torch.zeros_like(x)
    alphas = torch.arange(1, steps + 1, device=x.device, dtype=x.dtype) / steps
    for start in range(0, steps, chunk):
        a = alphas[start : start + chunk]
        n = a.numel()
        xs = (x.unsqueeze(0) + a.view(n, *([1] * x.ndim)) * d.unsqueeze(0)).reshape(n * b, *x.shape[1:])
        if not create_graph:
            xs = xs.detach().requires_grad_(True)
        with torch.enable_grad():
            if not xs.requires_grad:
                xs = xs.requires_grad_(True)
            loss = F.cross_entropy(model(xs), y.repeat(n), reduction="sum")
            (g,) = torch.autograd.grad(loss, xs, create_graph=create_graph)
        total = total + g.view(n, b, *x.shape[1:]).sum(0)
    return d * total / steps


def _ig_l1(model: nn.Module, x: Tensor, x_end: Tensor, y: Tensor, steps: int, chunk: int | None) -> Tensor:
    """Per-sample ``||IG^l(x, x_end)||_1`` with graph."""
    return loss_path_ig(model, x, x_end, y, steps, create_graph=True, internal_batch_size=chunk).abs().flatten(1).sum(1)


class _RARBase(Regularizer):
    """Shared constructor and inner maximisation of IG-NORM and IG-SUM-NORM (same options, same defaults).

    ``steps`` is the inner attack's iteration count (``attack_steps``: its deprecated name)."""

    second_order = True

    def __init__(
        self,
        weight: float = 1.0,
        warmup_epochs: float = 0.0,
        eps: float | str = 8 / 255,
        steps: int = 3,
        step_size: float | str | None = None,
        ig_steps: int = 5,
        internal_batch_size: int | None = None,
        attack_mode: str = "eval",
        *,
        attack_steps: int | None = None,
    ) -> None:
        super().__init__(weight, warmup_epochs)
        self.eps = parse_budget(eps, "eps")
        self.steps = check_steps(steps, attack_steps, 3, type(self).__name__)
        self.step_size = resolve_step_size(step_size, self.eps, self.steps)
        self.ig_steps = check_int_in_range(ig_steps, "ig_steps", 1)
        self.internal_batch_size = internal_batch_size
        self.attack_mode = check_attack_mode(attack_mode)
        self.threat_obj = make_threat("linf", self.eps)

    @property
    def attack_steps(self) -> int:
        """Deprecated name of :attr:`steps`."""
        return self.steps

    def _maximise(self, model: nn.Module, x: Tensor, y: Tensor, ce_weight: float, ig_weight: float) -> Tensor:
        """``argmax_{x' in ball} ce_weight * CE(x') + ig_weight * ||IG^l(x, x')||_1``: :func:`pgd_attack` from a
        random start with that per-image objective (the IG path starts at the clean ``x0``)."""

        def rar_objective(m: nn.Module, xa: Tensor, x0: Tensor, yy: Tensor) -> Tensor:
            obj = ig_weight * _ig_l1(m, x0, xa, yy, self.ig_steps, self.internal_batch_size)
            if ce_weight:
                obj = obj + ce_weight * F.cross_entropy(m(xa), yy, reduction="none")
            return obj

        kw = dict(eps=self.eps, step_size=self.step_size, steps=self.steps, threat=self.threat_obj)
        with eval_mode(model) if self.attack_mode == "eval" else contextlib.nullcontext():
            return pgd_attack(model, x.detach(), y, objective=rar_objective, random_start=True, **kw)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight:g}, eps={self.eps:.5g}, steps={self.steps}, "
            f"step_size={self.step_size:.5g}, ig_steps={self.ig_steps}"
        )


class IGNorm(_RARBase):
    r"""IG-NORM (Chen, Wu, Rastogi, Liang & Jha, NeurIPS 2019, "Robust attribution regularization").

    Objective: :math:`\mathrm{CE}(x) + \lambda \cdot \frac1B \sum_b \lVert IG^\ell(x_b, x'_b) \rVert_1` with
    :math:`x' = \arg\max_{\lVert x' - x \rVert_\infty \le \epsilon} \lVert IG^\ell(x, x') \rVert_1` found by
    ``steps`` signed-gradient steps from a random start; :math:`IG^\ell` is :func:`loss_path_ig` with
    ``ig_steps`` points. Cost: ``steps * ig_steps + ig_steps`` double-backprop gradients.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.Softplus(), nn.Linear(8, 3))
    >>> x = torch.rand(2, 3, 4, 4); y = torch.tensor([0, 1])
    >>> bool(IGNorm(steps=1, ig_steps=2).penalty(net, x, x, y, net(x)).penalty > 0)
    True
    """

    name = "ig_norm"

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        xa = self._maximise(model, x, y, ce_weight=0.0, ig_weight=1.0)
        return RegularizerOutput(_ig_l1(model, x.detach(), xa, y, self.ig_steps, self.internal_batch_size).mean())


class IGSumNorm(_RARBase):
    r"""IG-SUM-NORM (Chen et al., NeurIPS 2019, "Robust attribution regularization").

    Objective: :math:`\max_{x' \in \text{ball}} \mathrm{CE}(x') + \beta \lVert IG^\ell(x, x') \rVert_1`; the
    maximiser ``x'`` replaces the training input and the penalty :math:`\lVert IG^\ell(x, x') \rVert_1` is
    added with weight ``beta`` (``weight``). With ``beta = 0`` this is PGD adversarial training.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.Softplus(), nn.Linear(8, 3))
    >>> x = torch.rand(2, 3, 4, 4); y = torch.tensor([0, 1])
    >>> reg = IGSumNorm(steps=1, ig_steps=2)
    >>> xa = reg.training_input(net, x, y)
    >>> bool(reg.penalty(net, x, xa, y, net(xa)).penalty > 0)
    True
    """

    name = "ig_sum_norm"

    def training_input(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self._maximise(model, x, y, ce_weight=1.0, ig_weight=self.weight)

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        xa = x_train.detach()
        return RegularizerOutput(_ig_l1(model, x.detach(), xa, y, self.ig_steps, self.internal_batch_size).mean())


class IGR(Regularizer):
    r"""Integrated-gradients regularizer (Wang & Kong, NeurIPS 2022, "Exploiting the relationship between
    Kendall's rank correlation and cosine similarity for attribution protection").

    Objective: base loss + :math:`\lambda \cdot \frac1B \sum_b \big(1 - \cos(IG(x_b), IG(x'_b))\big)` with
    :math:`IG` the integrated gradients of the true-class logit from the black baseline (``ig_steps``
    points, :func:`~fragdefense.attributions.integrated_gradients`, differentiated twice). ``x'`` is the
    training input when another regularizer replaced it (``Compose([PGDAdversarialTraining(), IGR()])``,
    the paper's setting: the base loss is adversarial training) and otherwise an own PGD example on the
    cross-entropy (``steps`` steps, ``attack_steps`` being their deprecated name; the task loss then stays on
    the clean ``x``).
    Cost: ``2 * ig_steps`` double-backprop gradients plus the attack. ``max_samples`` limits the penalty (and
    its own attack) to the first images of the batch, an unbiased estimate of the batch mean.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.Softplus(), nn.Linear(8, 3))
    >>> x = torch.rand(2, 3, 4, 4); y = torch.tensor([0, 1])
    >>> p = IGR(steps=1, ig_steps=2).penalty(net, x, x, y, net(x)).penalty
    >>> bool(0 <= p <= 2)
    True
    """

    name = "igr"
    second_order = True

    def __init__(
        self,
        weight: float = 1.0,
        warmup_epochs: float = 0.0,
        eps: float | str = 8 / 255,
        steps: int = 3,
        step_size: float | str | None = None,
        ig_steps: int = 8,
        internal_batch_size: int | None = None,
        attack_mode: str = "eval",
        max_samples: int | None = None,
        *,
        attack_steps: int | None = None,
    ) -> None:
        super().__init__(weight, warmup_epochs)
        self.max_samples = check_max_samples(max_samples)
        self.eps = parse_budget(eps, "eps")
        self.steps = check_steps(steps, attack_steps, 3, "IGR")
        self.step_size = resolve_step_size(step_size, self.eps, self.steps)
        self.ig_steps = check_int_in_range(ig_steps, "ig_steps", 1)
        self.internal_batch_size = internal_batch_size
        self.attack_mode = check_attack_mode(attack_mode)

    @property
    def attack_steps(self) -> int:
        """Deprecated name of :attr:`steps`."""
        return self.steps

    def _adversary(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        kw = dict(eps=self.eps, step_size=self.step_size, steps=self.steps, random_start=True)
        with eval_mode(model) if self.attack_mode == "eval" else contextlib.nullcontext():
            return pgd_attack(model, x.detach(), y, **kw)

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        n = self.max_samples
        x, x_train, y = x[:n], x_train[:n], y[:n]
        xa = self._adversary(model, x, y) if same_input(x_train, x) else x_train.detach()
        kw = dict(steps=self.ig_steps, create_graph=True, internal_batch_size=self.internal_batch_size)
        ig_x = integrated_gradients(model, x.detach(), y, **kw).flatten(1)
        ig_a = integrated_gradients(model, xa, y, **kw).flatten(1)
        cos = F.cosine_similarity(ig_x, ig_a, dim=1, eps=1e-12)
        return RegularizerOutput((1.0 - cos).mean(), {"igr_cos": cos.detach().mean()})

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, eps={self.eps:.5g}, steps={self.steps}, ig_steps={self.ig_steps}"
