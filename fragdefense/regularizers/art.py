"""Attributional robustness training (ART, Singh et al.) and softplus(beta) training (Dombrowski et al.)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attacks.pgd import pgd_attack
from fragdefense.models.softplus import relu_to_softplus_
from fragdefense.models.surrogate import softplus_surrogate
from fragdefense.regularizers.base import Regularizer, RegularizerOutput, check_attack_mode, check_steps, eval_mode
from fragdefense.utils.checks import check_int_in_range
from fragdefense.utils.conventions import parse_budget, resolve_step_size

__all__ = ["ART", "SoftplusBeta", "alignment_triplet"]


def alignment_triplet(model: nn.Module, x: Tensor, y: Tensor, k: int | None = 1000) -> Tensor:
    r"""ART's per-sample attributional triplet loss :math:`\mathrm{softplus}(d_{ap} - d_{an})`, with
    :math:`d_{ap} = 1 - \cos(x, \nabla_x z_y)` (true class) and :math:`d_{an} = 1 - \cos(x, \nabla_x z_n)`
    (the top wrong class ``n``), the cosines over the ``k`` features with the largest
    :math:`|\nabla_x z_y|` (all features when ``k`` is ``None`` or exceeds the dimension). Differentiable
    w.r.t. ``x`` and the parameters (double back-propagation); use a smooth (softplus) model.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 8), nn.Softplus(), nn.Linear(8, 3))
    >>> alignment_triplet(net, torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]), k=None).shape
    torch.Size([4])
    """
    xg = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        wrong = logits.detach().scatter(1, y.view(-1, 1), float("-inf")).argmax(1)
        sel = torch.stack([y, wrong], 0)  # (2, B)
        outs = F.one_hot(sel, logits.shape[1]).to(logits.dtype)  # (2, B, K)
        (grads,) = torch.autograd.grad(logits, xg, grad_outputs=outs, is_grads_batched=True, create_graph=True)
    g_y, g_n = grads[0].flatten(1), grads[1].flatten(1)
    xf = xg.flatten(1)
    if k is not None and k < xf.shape[1]:
        idx = g_y.detach().abs().topk(k, dim=1).indices
        xf, g_y, g_n = xf.gather(1, idx), g_y.gather(1, idx), g_n.gather(1, idx)
    d_ap = 1 - F.cosine_similarity(xf, g_y, dim=1, eps=1e-12)
    d_an = 1 - F.cosine_similarity(xf, g_n, dim=1, eps=1e-12)
    return F.softplus(d_ap - d_an)


class ART(Regularizer):
    r"""Attributional robustness training (Singh, Kumari, Mangla, Sinha, Balasubramanian & Krishnamurthy,
    ECCV 2020, "Attributional robustness training using input-gradient spatial alignment").

    Objective: :math:`\mathrm{CE}(x_a) + w \cdot \mathrm{softplus}(d_{ap}(x_a) - d_{an}(x_a))`
    (:func:`alignment_triplet`, gradients of a softplus(``beta``) copy of the model, ``beta = 50``;
    ``w = 0.5`` in the paper), with :math:`x_a` the maximiser of that loss in the eps-ball found by
    ``steps`` (3) signed-gradient steps from a random start (:func:`~fragdefense.attacks.pgd_attack` with
    this loss as its ``objective``; step size ``2.5 * eps / steps`` by default), the cosines over the top-``k``
    (1000) gradient features. Cost: ~5-8x a plain step.

    ``attack_steps`` is the deprecated name of ``steps`` (still accepted, with a ``DeprecationWarning``).

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x = torch.rand(2, 3, 4, 4); y = torch.tensor([0, 1])
    >>> reg = ART(steps=1, k=None)
    >>> xa = reg.training_input(net, x, y)
    >>> bool(reg.penalty(net, x, xa, y, net(xa)).penalty > 0)
    True
    """

    name = "art"
    second_order = True

    def __init__(
        self,
        weight: float = 0.5,
        warmup_epochs: float = 0.0,
        beta: float = 50.0,
        eps: float | str = 8 / 255,
        steps: int = 3,
        step_size: float | str | None = None,
        k: int | None = 1000,
        attack_mode: str = "eval",
        *,
        attack_steps: int | None = None,
    ) -> None:
        super().__init__(weight, warmup_epochs)
        if not float(beta) > 0:
            raise ValueError(f"`beta` must be a number > 0, got {beta!r}")
        self.beta = float(beta)
        self.eps = parse_budget(eps, "eps")
        self.steps = check_steps(steps, attack_steps, 3, "ART")
        self.step_size = resolve_step_size(step_size, self.eps, self.steps)
        self.k = None if k is None else check_int_in_range(k, "k", 1)
        self.attack_mode = check_attack_mode(attack_mode)

    def surrogate(self, model: nn.Module) -> nn.Module:
        """The softplus(beta) surrogate of ``model`` (:func:`fragdefense.models.softplus_surrogate`: every ReLU
        call smoothed, modules and train/eval flags are the model's own)."""
        return softplus_surrogate(model, self.beta)

    @property
    def attack_steps(self) -> int:
        """Deprecated name of :attr:`steps`."""
        return self.steps

    def objective(self, soft: nn.Module):
        """ART's inner objective for :func:`~fragdefense.attacks.pgd_attack`: per image
        ``CE(model(x'), y) + weight * softplus(d_ap - d_an)`` on the surrogate ``soft``."""

        def art_loss(model: nn.Module, xa: Tensor, x0: Tensor, y: Tensor) -> Tensor:
            ce = F.cross_entropy(model(xa), y, reduction="none")
            return ce + self.weight * alignment_triplet(soft, xa, y, self.k)

        return art_loss

    def training_input(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(model) if self.attack_mode == "eval" else contextlib.nullcontext():
            soft = self.surrogate(model)
            kw = dict(eps=self.eps, step_size=self.step_size, steps=self.steps, random_start=True)
            return pgd_attack(model, x.detach(), y, objective=self.objective(soft), **kw)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight:g}, beta={self.beta:g}, eps={self.eps:.5g}, steps={self.steps}, "
            f"step_size={self.step_size:.5g}, k={self.k}"
        )

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        return RegularizerOutput(alignment_triplet(self.surrogate(model), x_train.detach(), y, self.k).mean())


class SoftplusBeta(Regularizer):
    r"""Train (and explain) with softplus(beta) activations (Dombrowski et al., NeurIPS 2019, "Explanations
    can be manipulated and geometry is to blame"): every ``nn.ReLU`` of the model is replaced, before
    training, by :math:`\mathrm{softplus}(\beta z)/\beta`, which bounds the input-Hessian curvature by
    ``beta``. No penalty, no extra cost. The checkpoint records ``softplus_beta`` in its ``model_config``
    so :func:`~fragdefense.models.load_checkpoint_model` rebuilds the same network.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> isinstance(SoftplusBeta(beta=5.0).prepare_model(net)[1], nn.Softplus)
    True
    """

    name = "softplus_beta"

    def __init__(self, beta: float = 10.0) -> None:
        super().__init__(weight=0.0)
        if not float(beta) > 0:
            raise ValueError(f"`beta` must be a number > 0, got {beta!r}")
        self.beta = float(beta)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if relu_to_softplus_(model, self.beta) == 0:
            raise ValueError("`model` has no nn.ReLU module to replace; softplus_beta needs a ReLU network")
        return model

    def model_config_update(self) -> dict:
        return {"softplus_beta": self.beta}

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"
