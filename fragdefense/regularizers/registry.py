"""Name -> regularizer class registry (the ``regularizer=`` config group mirrors it)."""

from __future__ import annotations

from typing import Any

from fragdefense.regularizers.adversarial import TRADES, PGDAdversarialTraining
from fragdefense.regularizers.art import ART, SoftplusBeta
from fragdefense.regularizers.base import Compose, Regularizer
from fragdefense.regularizers.gradient import CURE, InputGradient
from fragdefense.regularizers.integrated import IGR, IGNorm, IGSumNorm
from fragdefense.regularizers.ssr import SSR

__all__ = ["REGULARIZERS", "create_regularizer", "list_regularizers"]

REGULARIZERS: dict[str, type[Regularizer]] = {
    c.name: c
    for c in (InputGradient, IGNorm, IGSumNorm, ART, SSR, IGR, PGDAdversarialTraining, TRADES, CURE, SoftplusBeta)
}


def list_regularizers() -> list[str]:
    """Registered names.

    >>> list_regularizers()[:3]
    ['art', 'cure', 'ig_norm']
    """
    return sorted(REGULARIZERS)


def create_regularizer(name: str | list[str], **kwargs: Any) -> Regularizer:
    """Build a regularizer by name (``kwargs`` go to its constructor); a list of names gives a
    :class:`Compose` of default-configured members (``kwargs`` then map each name to its options).

    >>> create_regularizer("input_grad", weight=0.5).weight
    0.5
    >>> type(create_regularizer(["pgd_at", "igr"], igr={"weight": 2.0})).__name__
    'Compose'
    """
    if isinstance(name, (list, tuple)):
        unknown = set(kwargs) - set(name)
        if unknown:
            raise ValueError(f"options given for {sorted(unknown)} which are not in the list {list(name)}")
        return Compose([create_regularizer(n, **dict(kwargs.get(n) or {})) for n in name])
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer `name`={name!r}; registered: {', '.join(list_regularizers())}")
    return REGULARIZERS[name](**kwargs)
