"""Similarity metrics between attribution (saliency) maps, per sample.

* :mod:`fragdefense.metrics.functional` — the functional core (plain torch, batched, device-agnostic):
  ``topk_intersection``, ``spearman``, ``kendall_tau``, ``center_of_mass``, ``center_shift``,
  ``lens_topk``, ``topk_div``, ``mask_mass``, ``pointing_game`` (also re-exported here).
* :mod:`fragdefense.metrics.robustness` — robustness of an explanation function: ``max_sensitivity``,
  ``avg_sensitivity``, ``local_lipschitz_estimate``, ``relative_input_stability``, ``relative_output_stability``,
  ``relative_representation_stability``.
* :mod:`fragdefense.metrics.faithfulness` — faithfulness of maps: ``deletion_auc``, ``insertion_auc``, ``road``,
  ``faithfulness_correlation``.
* :mod:`fragdefense.metrics.registry` — the one list of metrics every consumer reads (map comparisons and
  explanation scores).
* torchmetrics classes: :class:`TopKIntersection`, :class:`SpearmanRank`, :class:`KendallTau`,
  :class:`CenterShift`, :class:`LensTopK`, :class:`MaskMass`, :class:`PointingGame`, and for the explanation
  scores :class:`ExplanationScore` with one named class per score (:class:`MaxSensitivity`, :class:`DeletionAUC`,
  :class:`ROAD`, ...; ``update(model, x, y)``). They are imported lazily,
  so ``import fragdefense.metrics.functional`` never imports torchmetrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fragdefense.metrics import faithfulness, functional, robustness
from fragdefense.metrics.faithfulness import deletion_auc, faithfulness_correlation, insertion_auc, road
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
from fragdefense.metrics.robustness import (
    avg_sensitivity,
    local_lipschitz_estimate,
    make_explain,
    max_sensitivity,
    relative_input_stability,
    relative_output_stability,
    relative_representation_stability,
)

if TYPE_CHECKING:  # pragma: no cover
    from fragdefense.metrics._classes import (  # noqa: F401
        ROAD,
        AvgSensitivity,
        CenterShift,
        DeletionAUC,
        ExplanationScore,
        FaithfulnessCorrelation,
        InsertionAUC,
        KendallTau,
        LensTopK,
        LocalLipschitzEstimate,
        MaskMass,
        MaxSensitivity,
        PointingGame,
        RelativeInputStability,
        RelativeOutputStability,
        RelativeRepresentationStability,
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
    "ExplanationScore",
    "MaxSensitivity",
    "AvgSensitivity",
    "LocalLipschitzEstimate",
    "RelativeInputStability",
    "RelativeOutputStability",
    "RelativeRepresentationStability",
    "DeletionAUC",
    "InsertionAUC",
    "ROAD",
    "FaithfulnessCorrelation",
)

__all__ = [
    "TopKIntersection",
    "SpearmanRank",
    "KendallTau",
    "CenterShift",
    "LensTopK",
    "MaskMass",
    "PointingGame",
    "ExplanationScore",
    "MaxSensitivity",
    "AvgSensitivity",
    "LocalLipschitzEstimate",
    "RelativeInputStability",
    "RelativeOutputStability",
    "RelativeRepresentationStability",
    "DeletionAUC",
    "InsertionAUC",
    "ROAD",
    "FaithfulnessCorrelation",
    "functional",
    "robustness",
    "faithfulness",
    "max_sensitivity",
    "avg_sensitivity",
    "local_lipschitz_estimate",
    "relative_input_stability",
    "relative_output_stability",
    "relative_representation_stability",
    "make_explain",
    "deletion_auc",
    "insertion_auc",
    "road",
    "faithfulness_correlation",
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
