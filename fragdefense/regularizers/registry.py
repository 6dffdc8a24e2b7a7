"""Name -> regularizer class registry (the ``regularizer=`` config group mirrors it)."""

from __future__ import annotations

from typing import Any

from fragdefense.regularizers.adversarial import TRADES, PGDAdversarialTraining
from fragdefense.regularizers.art import ART, SoftplusBeta
from fragdefense.regularizers.base import Compose, Regularizer
from fragdefense.regularizers.gradient import CURE, InputGradient
from fragdefense.regularizers.integrated import IGR, IGNorm, IGSumNorm
from fragdefense.regularizers.ssr import SSR

__all__ = ["REGULARIZERS", "create_regularizer", "list_regularizers", "register_regularizer"]

REGULARIZERS: dict[str, type[Regularizer]] = {
    c.name: c
    for c in (InputGradient, IGNorm, IGSumNorm, ART, SSR, IGR, PGDAdversarialTraining, TRADES, CURE, SoftplusBeta)
}


def register_regularizer(cls: type[Regularizer]) -> type[Regularizer]:
    """Class decorator registering a defense under its ``name`` attribute (training, tables and configs read this
    registry; in a config it is ``regularizer._target_=<module>.<Class>`` or ``create_regularizer(name)``).

    >>> from fragdefense.regularizers.base import Regularizer
    >>> @register_regularizer
    ... class NoOp(Regularizer):
    ...     name = "noop_example"
    >>> "noop_example" in list_regularizers()
    True
    >>> del REGULARIZERS["noop_example"]
    """
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise TypeError(f"register_regularizer takes a Regularizer subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == Regularizer.name:
        raise ValueError(f"{cls.__name__} needs its own class attribute `name` (a non-empty string)")
    if name in REGULARIZERS and REGULARIZERS[name] is not cls:
        raise ValueError(f"regularizer {name!r} is already registered")
    REGULARIZERS[name] = cls
    return cls


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
