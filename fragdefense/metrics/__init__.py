"""Similarity metrics between attribution (saliency) maps, per sample.

* :mod:`fragdefense.metrics.functional` — the functional core (plain torch, batched, device-agnostic):
  ``topk_intersection``, ``spearman``, ``kendall_tau``, ``center_of_mass``, ``center_shift``,
  ``lens_topk``, ``topk_div``, ``mask_mass``, ``pointing_game`` (also re-exported here).
* torchmetrics classes: :class:`TopKIntersection`, :class:`SpearmanRank`, :class:`KendallTau`,
  :class:`CenterShift`, :class:`LensTopK`, :class:`MaskMass`, :class:`PointingGame`. They are imported lazily,
  so ``import fragdefense.metrics.functional`` never imports torchmetrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fragdefense.metrics import functional
from fragdefense.metrics.functional import (
    center_of_mass,
    center_shift,
    kendall_tau,
    lens_topk,
    mask_mass,
    pointing_game,
    spearman,
    topk_div,
    topk_intersection,
)

if TYPE_CHECKING:  # pragma: no cover
    from fragdefense.metrics._classes import (
        CenterShift,
        KendallTau,
        LensTopK,
        MaskMass,
        PointingGame,
        SpearmanRank,
        TopKIntersection,
    )

_CLASSES = (
    "TopKIntersection",
    "SpearmanRank",
    "KendallTau",
    "CenterShift",
    "LensTopK",
    "MaskMass",
    "PointingGame",
)

__all__ = [
    "TopKIntersection",
    "SpearmanRank",
    "KendallTau",
    "CenterShift",
    "LensTopK",
    "MaskMass",
    "PointingGame",
    "functional",
    "topk_intersection",
    "spearman",
    "kendall_tau",
    "center_of_mass",
    "center_shift",
    "lens_topk",
    "topk_div",
    "mask_mass",
    "pointing_game",
]


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        from fragdefense.metrics import _classes

        return getattr(_classes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
