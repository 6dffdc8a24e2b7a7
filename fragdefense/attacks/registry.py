"""Registries of the attacks on interpretations and of their best-iterate criteria (one source of truth).

An attack is a name plus an **objective** ``D(m, ctx) -> (B,)``: the dissimilarity that the attack ascends,
between the map ``m`` of the perturbed image (of the softplus surrogate while ascending, of the original
network when iterates are compared) and what :class:`AttackContext` holds about the clean image. Its default
**criterion** picks the best label-preserving iterate; ``needs_gradient=False`` marks gradient-free attacks
(random directions instead of ``grad D``), ``one_shot=True`` an attack that draws one random point per restart.
:func:`~fragdefense.attacks.attack_interpretation`, the monitors, the evaluation and the tables read these
registries, so adding an attack is one function plus one :func:`register_attack` call:

>>> import torch
>>> from fragdefense.attacks import register_attack, unregister_attack, list_attacks, get_attack
>>> @register_attack("bottom_mass", criterion="dissimilarity")
... def bottom_mass(m, ctx):  # push mass onto the pixels that are least important in the clean map
...     return (m * (1 - ctx.topk_mask)).sum((1, 2))
>>> "bottom_mass" in list_attacks(), get_attack("bottom_mass").needs_gradient
(True, True)
>>> unregister_attack("bottom_mass")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fragdefense.metrics import functional as MF

__all__ = [
    "AttackContext",
    "AttackSpec",
    "ATTACKS",
    "CRITERIA",
    "register_attack",
    "unregister_attack",
    "get_attack",
    "list_attacks",
    "register_criterion",
    "get_criterion",
    "list_criteria",
]


@dataclass
class AttackContext:
    """What an objective or criterion may use about the clean images of the attacked batch (all ``(n, ...)``
    over the attacked images, on their device).

    Attributes:
        clean_map: ``(n, H, W)`` normalised maps of the original network at the clean images.
        topk_mask: ``(n, H, W)`` 0/1 mask of the ``k`` largest clean-map entries (ties by lower index).
        clean_center: ``(n, 2)`` centre of mass of the clean maps.
        k: the top-k size.
        target_mask: ``(n, H, W)`` target region (``targeted``) or ``None``.
        target_map: ``(n, H, W)`` target map normalised to sum 1 (``manipulate``) or ``None``.
        clean_probs: ``(n, K)`` softmax of the clean logits when the attack ``uses_logits``, else ``None``.
        gamma: output-preservation weight of ``manipulate``.
        logits: logits at the current iterate (set by the attack when the spec ``uses_logits``; else ``None``).
        extra: free-form options of user attacks (``attack_opts`` of :func:`attack_interpretation`).
        objective: the attack's own objective (the ``"dissimilarity"`` criterion evaluates it).
    """

    clean_map: Tensor
    topk_mask: Tensor
    clean_center: Tensor
    k: int
    target_mask: Tensor | None = None
    target_map: Tensor | None = None
    clean_probs: Tensor | None = None
    gamma: float = 10.0
    logits: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    objective: Callable[[Tensor, AttackContext], Tensor] | None = None


Objective = Callable[[Tensor, AttackContext], Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack (see the module docstring)."""

    name: str
    objective: Objective
    criterion: str
    needs_gradient: bool = True
    one_shot: bool = False
    uses_logits: bool = False
    requires: tuple[str, ...] = ()
    description: str = ""


#: name -> :class:`AttackSpec` (iteration yields the names, registration order)
ATTACKS: dict[str, AttackSpec] = {}
#: name -> criterion ``score(m, ctx) -> (n,)`` to *maximise* over label-preserving iterates
CRITERIA: dict[str, Callable[[Tensor, AttackContext], Tensor]] = {}


def register_attack(
    name: str,
    objective: Objective | None = None,
    *,
    criterion: str = "dissimilarity",
    needs_gradient: bool = True,
    one_shot: bool = False,
    uses_logits: bool = False,
    requires: tuple[str, ...] = (),
    description: str = "",
) -> Any:
    """Register an attack on interpretations; usable as ``register_attack(name, fn, ...)`` or as a decorator.

    Args:
        name: the attack's name (``attack=`` of :func:`~fragdefense.attacks.attack_interpretation`, configs).
        objective: ``D(m, ctx) -> (B,)`` to ascend (see :class:`AttackContext`).
        criterion: default best-iterate criterion, a name of :func:`list_criteria` (``"dissimilarity"``: the
            objective itself evaluated on the original network's map).
        needs_gradient: ``False``: a gradient-free attack that steps along random directions.
        one_shot: with ``needs_gradient=False``: one random point ``x + eps * sign(N(0, I))`` per restart.
        uses_logits: the objective reads ``ctx.logits`` (and ``ctx.clean_probs``).
        requires: names of inputs the attack needs (``"target_mask"``, ``"target_map"``).
        description: one line for tables and ``--help``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")

    def deco(fn: Objective) -> Objective:
        if not callable(fn):
            raise TypeError(f"`objective` of attack {name!r} must be callable, got {type(fn).__name__}")
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is already registered")
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion`={criterion!r} of attack {name!r} is not registered: {list_criteria()}")
        bad = set(requires) - {"target_mask", "target_map"}
        if bad:
            raise ValueError(f"`requires` of attack {name!r} may hold 'target_mask', 'target_map'; got {sorted(bad)}")
        ATTACKS[name] = AttackSpec(
            name, fn, criterion, bool(needs_gradient), bool(one_shot), bool(uses_logits), tuple(requires), description
        )
        return fn

    return deco if objective is None else deco(objective)


def unregister_attack(name: str) -> None:
    """Remove a registered attack (for tests and notebooks)."""
    ATTACKS.pop(name, None)


def get_attack(name: str) -> AttackSpec:
    """The spec registered as ``name``; unknown names raise ``ValueError`` listing the registered ones."""
    if not isinstance(name, str) or name not in ATTACKS:
        raise ValueError(f"unknown `attack`={name!r}; registered attacks: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def list_attacks(needs_gradient: bool | None = None) -> list[str]:
    """Registered attack names (registration order); ``needs_gradient`` filters gradient / random attacks.

    >>> list_attacks(needs_gradient=False)
    ['random_walk', 'random_sign']
    """
    return [n for n, s in ATTACKS.items() if needs_gradient is None or s.needs_gradient == needs_gradient]


def register_criterion(name: str, fn: Callable[[Tensor, AttackContext], Tensor] | None = None) -> Any:
    """Register a best-iterate criterion ``score(m, ctx) -> (n,)`` (higher = a better attack)."""

    def deco(f: Callable[[Tensor, AttackContext], Tensor]) -> Callable[[Tensor, AttackContext], Tensor]:
        if name in CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        CRITERIA[name] = f
        return f

    return deco if fn is None else deco(fn)


def get_criterion(name: str) -> Callable[[Tensor, AttackContext], Tensor]:
    """The criterion registered as ``name``."""
    if not isinstance(name, str) or name not in CRITERIA:
        raise ValueError(f"unknown `criterion`={name!r}; expected 'auto' or one of {list_criteria()}")
    return CRITERIA[name]


def list_criteria() -> list[str]:
    """Registered criterion names.

    >>> list_criteria()[:3]
    ['topk', 'kendall', 'spearman']
    """
    return list(CRITERIA)


# ---- built-in criteria (computed on the original network's map) -------------------------------------------------


def _need(t: Tensor | None, what: str, crit: str) -> Tensor:
    if t is None:
        raise ValueError(f"criterion {crit!r} needs `{what}`")
    return t


register_criterion("topk", lambda m, ctx: -MF.topk_intersection(m, ctx.clean_map, ctx.k))
register_criterion("kendall", lambda m, ctx: -MF.kendall_tau(m, ctx.clean_map))
register_criterion("spearman", lambda m, ctx: -MF.spearman(m, ctx.clean_map))
register_criterion("center_shift", lambda m, ctx: MF.center_shift(m, ctx.clean_map))
register_criterion("target_mass", lambda m, ctx: (m * _need(ctx.target_mask, "target_mask", "target_mass")).sum((1, 2)))
register_criterion(
    "target_mse",
    lambda m, ctx: -((m - _need(ctx.target_map, "target_map", "target_mse")) ** 2).flatten(1).mean(1),
)


@register_criterion("dissimilarity")
def _dissimilarity(m: Tensor, ctx: AttackContext) -> Tensor:
    """The attack's own objective on the original network's map (without the logits term)."""
    if ctx.objective is None:
        raise ValueError("criterion 'dissimilarity' needs the attack's objective in the context")
    return ctx.objective(m, dataclasses.replace(ctx, logits=None))


# ---- built-in attacks (Ghorbani et al., Algorithm 1; Dombrowski et al.; random baselines) ----------------------


@register_attack("topk", criterion="topk", description="lower the clean map's top-k mass (Ghorbani et al.)")
def _topk(m: Tensor, ctx: AttackContext) -> Tensor:
    return -(m * ctx.topk_mask).sum((1, 2))


@register_attack("mass_center", criterion="center_shift", description="move the map's centre of mass")
def _mass_center(m: Tensor, ctx: AttackContext) -> Tensor:
    return (MF.center_of_mass(m) - ctx.clean_center).norm(dim=1)


@register_attack(
    "targeted", criterion="target_mass", requires=("target_mask",), description="move the map into a region"
)
def _targeted(m: Tensor, ctx: AttackContext) -> Tensor:
    assert ctx.target_mask is not None
    return (m * ctx.target_mask).sum((1, 2))


@register_attack(
    "manipulate",
    criterion="target_mse",
    uses_logits=True,
    requires=("target_map",),
    description="drive the map to a target map, output kept (Dombrowski et al.)",
)
def _manipulate(m: Tensor, ctx: AttackContext) -> Tensor:
    assert ctx.target_map is not None
    hw = float(m.shape[-1] * m.shape[-2])
    out = -((hw * m - hw * ctx.target_map) ** 2).flatten(1).mean(1)
    if ctx.logits is not None and ctx.clean_probs is not None:
        out = out - ctx.gamma * ((F.softmax(ctx.logits, 1) - ctx.clean_probs) ** 2).sum(1)
    return out


register_attack(
    "random_walk", _topk, criterion="topk", needs_gradient=False, description="random sign steps (baseline)"
)
register_attack(
    "random_sign",
    _topk,
    criterion="topk",
    needs_gradient=False,
    one_shot=True,
    description="one random corner of the ball (Ghorbani et al.'s baseline)",
)


def topk_mask_of(clean_map: Tensor, k: int) -> Tensor:
    """0/1 mask of the ``k`` largest entries of each map, ties broken by lower index (as the metric)."""
    flat = clean_map.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)[:, :k]
    return torch.zeros_like(flat).scatter_(1, order, 1.0).view_as(clean_map)
