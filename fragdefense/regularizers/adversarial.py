"""Adversarial-training regularizers: PGD adversarial training (Madry et al.) and TRADES."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attacks.pgd import pgd_attack
from fragdefense.attacks.threat import make_threat
from fragdefense.regularizers.base import Regularizer, RegularizerOutput, check_attack_mode, eval_mode, same_input
from fragdefense.utils.checks import check_int_in_range
from fragdefense.utils.conventions import parse_budget, resolve_step_size

__all__ = ["PGDAdversarialTraining", "TRADES"]


class PGDAdversarialTraining(Regularizer):
    r"""PGD adversarial training (Madry et al., ICLR 2018, "Towards deep learning models resistant to
    adversarial attacks").

    Objective: :math:`\min_\theta \mathbb{E}\, \max_{\lVert \delta \rVert \le \epsilon,\ x+\delta \in [0,1]}
    \mathrm{CE}(f_\theta(x + \delta), y)`; the inner max by ``steps`` of PGD with a random start. The
    training input is replaced by the adversarial example; no penalty term. CIFAR-10 setting of the paper:
    eps 8/255, 7 steps of 2/255, random start. Cost: ``steps + 1`` forward/backward passes.

    Args:
        eps, step_size: budget and step in pixel units (numbers or strings such as ``"8/255"``); the paper's
            2/255 is the default, ``None`` gives the shared rule ``2.5 * eps / steps``.
        steps: PGD iterations. threat: ``"linf"`` or ``"l2"``.
        random_start: uniform start in the ball.
        attack_mode: ``"eval"`` (default, as MadryLab ``robustness``: BatchNorm statistics are frozen while
            attacking) or ``"train"``.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    >>> x = torch.rand(4, 3, 4, 4); y = torch.tensor([0, 1, 2, 0])
    >>> xa = PGDAdversarialTraining(eps="8/255", steps=2).training_input(net, x, y)
    >>> bool((xa - x).abs().max() <= 8 / 255 + 1e-6)
    True
    """

    name = "pgd_at"

    def __init__(
        self,
        eps: float | str = 8 / 255,
        step_size: float | str | None = 2 / 255,
        steps: int = 7,
        threat: str = "linf",
        random_start: bool = True,
        attack_mode: str = "eval",
        weight: float = 1.0,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__(weight, warmup_epochs)
        self.eps = parse_budget(eps, "eps")
        self.steps = check_int_in_range(steps, "steps", 0)
        # the paper's 2/255 stays the explicit default (the 2.5 * eps / steps rule only when step_size=None)
        self.step_size = resolve_step_size(step_size, self.eps, self.steps)
        make_threat(threat, self.eps)
        self.threat = threat
        self.random_start = bool(random_start)
        self.attack_mode = check_attack_mode(attack_mode)

    def training_input(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        kw: dict[str, Any] = dict(
            eps=self.eps, step_size=self.step_size, steps=self.steps, threat=self.threat, random_start=self.random_start
        )
        if self.attack_mode == "eval":
            with eval_mode(model):
                return pgd_attack(model, x, y, **kw)
        return pgd_attack(model, x, y, **kw)

    def extra_repr(self) -> str:
        return f"eps={self.eps:.5g}, step_size={self.step_size:.5g}, steps={self.steps}, threat={self.threat}"


class TRADES(Regularizer):
    r"""TRADES (Zhang et al., ICML 2019, "Theoretically principled trade-off between robustness and
    accuracy").

    Objective: :math:`\mathrm{CE}(f(x), y) + \beta \cdot \frac1B \sum_b \mathrm{KL}(p(x_b) \,\Vert\, p(x'_b))`,
    :math:`x' = \arg\max_{x' \in \text{ball}} \mathrm{KL}(p(x) \Vert p(x'))` by ``steps`` signed-gradient
    steps from :math:`x + 0.001\,\mathcal N(0, I)` (the paper's code). ``weight`` is beta (the paper: 6);
    CIFAR-10: eps 8/255 (0.031), 10 steps of 2/255 (0.007). Cost: ~``steps + 2`` passes.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    >>> x = torch.rand(4, 3, 4, 4); y = torch.tensor([0, 1, 2, 0])
    >>> bool(TRADES(steps=2).penalty(net, x, x, y, net(x)).penalty >= 0)
    True
    """

    name = "trades"

    def __init__(
        self,
        weight: float = 6.0,
        warmup_epochs: float = 0.0,
        eps: float | str = 8 / 255,
        step_size: float | str | None = 2 / 255,
        steps: int = 10,
        threat: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        super().__init__(weight, warmup_epochs)
        self.eps = parse_budget(eps, "eps")
        self.steps = check_int_in_range(steps, "steps", 0)
        # the paper's 2/255 (0.007) stays the explicit default (the 2.5 * eps / steps rule only when None)
        self.step_size = resolve_step_size(step_size, self.eps, self.steps)
        self.threat_obj = make_threat(threat, self.eps)
        self.threat = threat
        self.attack_mode = check_attack_mode(attack_mode)

    def adversary(self, model: nn.Module, x: Tensor) -> Tensor:
        """The KL-maximising ``x'`` (detached): :func:`~fragdefense.attacks.pgd_attack` with the per-image
        ``KL(p(x) || p(x'))`` as its ``objective``, started at ``x + 0.001 N(0, I)`` (global RNG)."""
        x0 = x.detach()
        with torch.no_grad():
            p_clean = F.softmax(model(x0), dim=1)

        def kl_to_clean(m: nn.Module, xa: Tensor, x0: Tensor, y: Tensor | None) -> Tensor:
            return F.kl_div(F.log_softmax(m(xa), dim=1), p_clean, reduction="none").flatten(1).sum(1)

        return pgd_attack(
            model,
            x0,
            None,
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
            threat=self.threat_obj,
            objective=kl_to_clean,
            init=x0 + 0.001 * torch.randn_like(x0),
        )

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        if self.attack_mode == "eval":
            with eval_mode(model):
                xa = self.adversary(model, x)
        else:
            xa = self.adversary(model, x)
        clean_logits = logits if same_input(x_train, x) else model(x)
        kl = F.kl_div(F.log_softmax(model(xa), dim=1), F.softmax(clean_logits, dim=1), reduction="batchmean")
        return RegularizerOutput(kl)
