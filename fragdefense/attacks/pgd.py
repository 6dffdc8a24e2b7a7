"""Projected gradient ascent in an eps-ball (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks"): the label attack for accuracy under attack, and - through the ``objective`` hook - the inner
maximisation of every adversarial training regularizer (TRADES' KL, ART's alignment loss, RAR's IG norm) and
of the attack on influence functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attacks.threat import ThreatModel, make_threat
from fragdefense.utils.checks import as_model_dtype, check_images, check_int_in_range
from fragdefense.utils.conventions import make_generator, parse_budget, resolve_step_size

__all__ = ["pgd_attack", "Objective"]

#: ``objective(model, x_adv, x0, y) -> (B,)``: the per-image value PGD maximises (``x0`` is the clean input).
Objective = Callable[[Any, Tensor, Tensor, Tensor | None], Tensor]
#: a start point ``(B, C, H, W)``, or ``init(x0, generator) -> (B, C, H, W)`` drawn at every restart.
Init = Tensor | Callable[[Tensor, torch.Generator | None], Tensor]


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    *,
    eps: float | str = 8 / 255,
    step_size: float | str | None = None,
    steps: int = 10,
    random_start: bool = True,
    restarts: int = 1,
    threat: str | ThreatModel = "linf",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    objective: Objective | None = None,
    init: Init | None = None,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """Maximise a per-image objective over the eps-ball around ``x`` intersected with ``[0, 1]``: ``steps``
    steps ``x <- project(x + step_size * direction(grad))`` (signed gradient for L-inf, normalised for L2).

    The value maximised is, per image,

    * ``loss_fn(model(x'), y)`` when ``loss_fn`` is given (``(B,)`` or a scalar; it sees only the logits);
    * ``objective(model, x', x0, y)`` when ``objective`` is given: a ``(B,)`` tensor computed from the model
      and the input itself (e.g. TRADES' KL to the clean output, ART's attributional loss, a loss along the
      path from the clean ``x0``); ``y`` may then be ``None``. It runs with grad enabled and may differentiate
      internally (double back-propagation);
    * the cross-entropy ``CE(model(x'), y)`` otherwise.

    Only ``torch.autograd.grad`` w.r.t. the input is used, so parameter gradients are untouched; the model's
    train/eval mode is the caller's choice (see :func:`~fragdefense.utils.conventions.eval_mode`). Images are
    independent (batched), the summed objective is differentiated once per step. With ``restarts > 1`` each
    image keeps the restart with the highest final objective.

    Args:
        model: classifier taking images in ``[0, 1]`` (with ``objective``: anything the objective calls).
        x: images ``(B, C, H, W)`` in ``[0, 1]``; ``y``: labels ``(B,)`` (``None`` only with ``objective``).
        eps: budget in pixel units of ``[0, 1]`` images, a number or a string such as ``"8/255"``.
        step_size: step (same units); default :func:`~fragdefense.utils.conventions.default_step_size`
            ``= 2.5 * eps / steps`` (Madry et al.; ``eps=8/255, steps=10`` gives 2/255).
        steps: iterations (``0``: the start point).
        random_start: uniform start in the ball (Madry et al.); otherwise the clean ``x``.
        restarts: independent runs; every image keeps its best.
        threat: ``"linf"``, ``"l2"`` or a :class:`~fragdefense.attacks.ThreatModel` (whose own ``eps`` is then
            the ball; ``eps`` still sets the default step size).
        loss_fn: ``loss_fn(logits, y)`` to maximise. At most one of ``loss_fn`` / ``objective``.
        objective: ``objective(model, x_adv, x0, y) -> (B,)`` to maximise.
        init: start point instead of the random / clean one: a tensor like ``x`` or ``init(x0, generator)``
            (called at every restart); it is projected onto the feasible set (e.g. TRADES'
            ``x + 0.001 * N(0, I)``).
        generator: ``None`` (global RNG), an ``int`` seed or a ``torch.Generator`` on ``x``'s device, for the
            random start (and ``init``).

    Returns:
        adversarial images ``(B, C, H, W)`` (detached).

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    >>> x = torch.rand(5, 3, 4, 4); y = torch.randint(0, 3, (5,))
    >>> xa = pgd_attack(net, x, y, eps="8/255", steps=3, generator=0)
    >>> bool(((xa - x).abs() <= 8 / 255 + 1e-7).all())
    True
    >>> torch.equal(xa, pgd_attack(net, x, y, eps=8 / 255, steps=3, generator=0))
    True

    An objective that sees the input: move away from the clean logits (no labels needed).

    >>> far = lambda m, xa, x0, y: (m(xa) - m(x0)).pow(2).sum(1)
    >>> xa = pgd_attack(net, x, None, eps=0.1, steps=5, objective=far, generator=0)
    >>> bool((far(net, xa, x, None) > 0).all())  # (from x itself the gradient would be zero)
    True
    """
    x = as_model_dtype(check_images(x, "x"), model)
    b = x.shape[0]
    if b == 0:
        raise ValueError("`x` must be a non-empty batch of images (B, C, H, W), got B = 0")
    if loss_fn is not None and objective is not None:
        raise ValueError("give at most one of `loss_fn` (on the logits) and `objective` (on the model and input)")
    if y is None and objective is None:
        raise ValueError(f"`y` must be a LongTensor of shape ({b},) (it may be None only with `objective`)")
    if y is not None and (not isinstance(y, Tensor) or y.shape != (b,)):
        raise ValueError(f"`y` must be a LongTensor of shape ({b},), got {getattr(y, 'shape', type(y))}")
    if y is not None and objective is None and loss_fn is None and (y.is_floating_point() or y.dtype == torch.bool):
        raise TypeError(f"`y` must hold integer class labels, got dtype {y.dtype}")
    eps = parse_budget(eps, "eps")
    steps = check_int_in_range(steps, "steps", 0)
    restarts = check_int_in_range(restarts, "restarts", 1)
    alpha = resolve_step_size(step_size, eps, steps)
    thr = threat if isinstance(threat, ThreatModel) else make_threat(threat, eps)
    generator = make_generator(generator, x.device)
    x0 = x.detach()

    if objective is None:
        lf = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, reduction="none"))
        checked = loss_fn is not None

        def value(xa: Tensor) -> Tensor:
            nonlocal checked
            logits = model(xa)
            if not checked:  # cross-entropy: class ids in [0, K), checked on the first forward (no extra pass)
                k = logits.shape[-1]
                if bool(((y < 0) | (y >= k)).any()):
                    raise ValueError(f"`y` must hold class labels in [0, {k - 1}], got {y.tolist()}")
                checked = True
            return lf(logits, y)

    else:

        def value(xa: Tensor) -> Tensor:
            v = objective(model, xa, x0, y)
            if not isinstance(v, Tensor) or v.shape != (b,):
                raise ValueError(f"`objective` must return a ({b},) tensor (one value per image), got {v!r:.80}")
            return v

    best, best_val = x0.clone(), None
    for _ in range(restarts):
        if init is not None:
            start = init(x0, generator) if callable(init) else init
            xi = thr.project(start.detach().to(dtype=x0.dtype, device=x0.device), x0)
        elif random_start:
            xi = thr.random_start(x0, generator)
        else:
            xi = x0.clone()
        for _ in range(steps):
            xg = xi.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(value(xg).sum(), xg)
            xi = thr.project(thr.step(xi.detach(), g, alpha), x0)
        if restarts == 1:
            return xi.detach()
        if objective is None:
            with torch.no_grad():
                vi = value(xi)
        else:
            with torch.enable_grad():
                vi = value(xi.detach()).detach()
        vi = vi if vi.ndim == 1 else vi.expand(b)
        if best_val is None:
            best, best_val = xi.detach().clone(), vi
        else:
            better = vi > best_val
            best[better], best_val = xi[better].detach(), torch.where(better, vi, best_val)
    return best
