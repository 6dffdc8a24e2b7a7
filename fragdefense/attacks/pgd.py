"""Projected gradient descent on the classification loss (Madry et al.), for adversarial training and
accuracy under attack."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attacks.threat import ThreatModel, make_threat
from fragdefense.utils.checks import check_images, check_int_in_range, check_nonneg_float

__all__ = ["pgd_attack"]


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    step_size: float | None = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    restarts: int = 1,
    threat: str | ThreatModel = "linf",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """Maximise ``loss_fn(model(x'), y)`` (default cross-entropy) over the eps-ball around ``x`` and ``[0, 1]``.

    Uses ``torch.autograd.grad`` w.r.t. the input only, so parameter gradients are untouched; the model's
    train/eval mode is the caller's choice. With ``restarts > 1`` each image keeps the restart with the
    highest loss.

    Args:
        model: classifier taking images in ``[0, 1]``.
        x: images ``(B, C, H, W)`` in ``[0, 1]``; ``y``: labels ``(B,)``.
        eps: budget (pixel units); ``step_size``: alpha (default ``eps / 4``); ``steps``: iterations.
        random_start: uniform start in the ball (Madry et al.).
        threat: ``"linf"``, ``"l2"`` or a :class:`~fragdefense.attacks.ThreatModel`.
        loss_fn: per-batch loss to maximise; ``loss_fn(logits, y)`` summed over the batch.
        generator: RNG (or seed) for the random start.

    Returns:
        adversarial images ``(B, C, H, W)`` (detached).

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    >>> x = torch.rand(5, 3, 4, 4); y = torch.randint(0, 3, (5,))
    >>> xa = pgd_attack(net, x, y, eps=0.03, steps=3)
    >>> bool(((xa - x).abs() <= 0.03 + 1e-7).all())
    True
    """
    x = check_images(x, "x")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"`y` must be a LongTensor of shape ({x.shape[0]},), got {getattr(y, 'shape', type(y))}")
    eps = check_nonneg_float(eps, "eps")
    steps = check_int_in_range(steps, "steps", 0)
    restarts = check_int_in_range(restarts, "restarts", 1)
    alpha = check_nonneg_float(eps / 4 if step_size is None else step_size, "step_size")
    thr = threat if isinstance(threat, ThreatModel) else make_threat(threat, eps)
    if isinstance(generator, int):
        generator = torch.Generator(device=x.device).manual_seed(generator)
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, reduction="none"))
    x0 = x.detach()
    best, best_loss = x0.clone(), None
    for _ in range(restarts):
        xi = thr.random_start(x0, generator) if random_start else x0.clone()
        for _ in range(steps):
            xg = xi.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(model(xg), y)
                (g,) = torch.autograd.grad(loss.sum(), xg)
            xi = thr.project(thr.step(xi.detach(), g, alpha), x0)
        if restarts == 1:
            return xi.detach()
        with torch.no_grad():
            li = loss_fn(model(xi), y)
            li = li if li.ndim == 1 else li.expand(x.shape[0])
        if best_loss is None:
            best, best_loss = xi.detach().clone(), li
        else:
            better = li > best_loss
            best[better], best_loss = xi[better].detach(), torch.where(better, li, best_loss)
    return best
