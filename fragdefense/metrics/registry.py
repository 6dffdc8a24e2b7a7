"""Registry of metrics: the one list that attacks, monitors, evaluation and tables report.

Two kinds share the registry. A *comparison* metric (``kind="comparison"``, the default) compares the
attacked map ``adv`` with the clean map ``clean`` (both ``(B, H, W)``, normalised) and returns one value per
image. ``opts`` carries what some metrics need: ``k`` (top-k size), ``window`` (LENS
window), ``target_mask`` / ``target_map`` (targeted attacks). A metric whose ``requires`` are missing from
``opts`` is skipped. Plain torch: the torchmetrics class is named, not imported, so the functional core stays
free of torchmetrics.

An *explanation* score (``kind="explanation"``: robustness and faithfulness of an explanation function) is
``fn(model, x, y, maps, explain, opts) -> (B,)``: ``model`` takes images in [0, 1], ``x`` is ``(B, C, H, W)``,
``y`` the ``(B,)`` explained classes, ``maps`` the ``(B, H, W)`` clean maps ``explain(x, y)``, and ``explain`` a
callable ``explain(x, y) -> (B, H, W)`` that re-explains perturbed inputs. :func:`compute_explanation_scores`
runs them; :func:`list_metrics` and :func:`compute_metrics` list and run comparison metrics unless ``kind`` says
otherwise.

>>> import torch
>>> from fragdefense.metrics.registry import register_metric, compute_metrics, unregister_metric
>>> @register_metric("l1_map_distance", label="L1 map distance", similarity=False)
... def l1_map_distance(adv, clean, opts):
...     return (adv - clean).abs().flatten(1).sum(1)
>>> a = torch.rand(2, 4, 4)
>>> sorted(compute_metrics(a, a, {"k": 3, "window": 1}))[:3]
['center_shift', 'kendall', 'l1_map_distance']
>>> unregister_metric("l1_map_distance")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fragdefense.metrics import functional as MF

__all__ = [
    "MetricSpec",
    "METRICS",
    "register_metric",
    "unregister_metric",
    "get_metric",
    "list_metrics",
    "compute_metrics",
    "compute_explanation_scores",
    "metric_label",
    "KINDS",
]

#: the kinds of registered metrics
KINDS = ("comparison", "explanation")

MetricFn = Callable[[Tensor, Tensor, dict[str, Any]], Tensor]


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric.

    Attributes:
        name: key in results, records, W&B and tables.
        fn: ``fn(adv, clean, opts) -> (B,)``.
        label: human-readable name for plots and tables.
        similarity: ``True`` when a higher value means the maps are more alike (robust); ``False`` for a
            distance; ``None`` when neither (e.g. target mass, read per attack).
        cls: name of the torchmetrics class in :mod:`fragdefense.metrics` (``None``: none).
        cls_opts: keys of ``opts`` passed to the class's constructor (e.g. ``("k",)``).
        requires: keys of ``opts`` that must be present (and not ``None``) for the metric to apply.
        report: reported by attacks, monitors and tables by default.
        cls_swap: the class is updated as ``update(clean, adv)`` instead of ``update(adv, clean)``.
        kind: ``"comparison"`` (``fn(adv, clean, opts)``) or ``"explanation"``
            (``fn(model, x, y, maps, explain, opts)``); for explanation scores ``similarity`` means "higher is
            better".
    """

    name: str
    fn: MetricFn
    label: str
    similarity: bool | None = True
    cls: str | None = None
    cls_opts: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    report: bool = True
    cls_swap: bool = False
    kind: str = "comparison"

    def update_class(self, metric: Any, adv: Tensor, clean: Tensor) -> None:
        """``metric.update`` in the order the class expects."""
        metric.update(clean, adv) if self.cls_swap else metric.update(adv, clean)

    def applies(self, opts: dict[str, Any]) -> bool:
        return all(opts.get(r) is not None for r in self.requires)

    def make_class(self, opts: dict[str, Any], **kwargs: Any) -> Any:
        """Instantiate the torchmetrics class with ``cls_opts`` from ``opts`` (imports torchmetrics)."""
        if self.cls is None:
            raise ValueError(f"metric {self.name!r} has no torchmetrics class")
        import fragdefense.metrics as M

        return getattr(M, self.cls)(*[opts[o] for o in self.cls_opts], **kwargs)


#: name -> :class:`MetricSpec` (registration order)
METRICS: dict[str, MetricSpec] = {}


def register_metric(
    name: str,
    fn: MetricFn | None = None,
    *,
    label: str | None = None,
    similarity: bool | None = True,
    cls: str | None = None,
    cls_opts: tuple[str, ...] = (),
    requires: tuple[str, ...] = (),
    report: bool = True,
    cls_swap: bool = False,
    kind: str = "comparison",
) -> Any:
    """Register a metric (usable as a decorator); see :class:`MetricSpec` for the arguments."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")

    def deco(f: MetricFn) -> MetricFn:
        if not callable(f):
            raise TypeError(f"metric {name!r} must be callable, got {type(f).__name__}")
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        METRICS[name] = MetricSpec(
            name, f, label or name.replace("_", " "), similarity, cls, cls_opts, requires, report, cls_swap, kind
        )
        return f

    return deco if fn is None else deco(fn)


def unregister_metric(name: str) -> None:
    """Remove a registered metric (for tests and notebooks)."""
    METRICS.pop(name, None)


def get_metric(name: str) -> MetricSpec:
    """The spec registered as ``name``."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; registered: {', '.join(METRICS)}")
    return METRICS[name]


def list_metrics(
    report: bool | None = None, opts: dict[str, Any] | None = None, kind: str | None = "comparison"
) -> list[str]:
    """Registered metric names (registration order) of ``kind`` (``None``: every kind); ``report`` filters the
    default-reported ones; ``opts`` keeps only the metrics that apply (their ``requires`` present).

    >>> list_metrics(report=True, opts={"k": 10, "window": 1})
    ['topk_intersection', 'spearman', 'kendall', 'center_shift', 'lens_recall']
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS} or None, got {kind!r}")
    return [
        n
        for n, s in METRICS.items()
        if (kind is None or s.kind == kind)
        and (report is None or s.report == report)
        and (opts is None or s.applies(opts))
    ]


def compute_metrics(
    adv: Tensor, clean: Tensor, opts: dict[str, Any], names: list[str] | None = None
) -> dict[str, Tensor]:
    """Every applicable metric (or those in ``names``) of ``adv`` vs ``clean``, one ``(B,)`` tensor each."""
    out: dict[str, Tensor] = {}
    for n in names if names is not None else list_metrics(report=True):
        spec = get_metric(n)
        if spec.kind != "comparison":
            raise ValueError(f"metric {n!r} is an explanation score; run it with compute_explanation_scores")
        if spec.applies(opts):
            out[n] = spec.fn(adv, clean, opts)
    return out


def compute_explanation_scores(
    model: Any,
    x: Tensor,
    y: Tensor,
    maps: Tensor,
    explain: Callable[[Tensor, Tensor], Tensor],
    names: list[str],
    opts: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """The explanation scores ``names`` of ``explain`` on ``(x, y)``, one ``(B,)`` tensor each (``opts`` holds
    their settings; a score whose ``requires`` are missing from ``opts`` raises)."""
    opts = dict(opts or {})
    out: dict[str, Tensor] = {}
    for n in names:
        spec = get_metric(n)
        if spec.kind != "explanation":
            raise ValueError(f"metric {n!r} compares two maps; it is not an explanation score")
        missing = [r for r in spec.requires if opts.get(r) is None]
        if missing:
            raise ValueError(f"explanation score {n!r} needs {missing} in its options")
        out[n] = spec.fn(model, x, y, maps, explain, opts)
    return out


def metric_label(name: str) -> str:
    """Human-readable label of a metric (the name itself when it is not registered).

    >>> metric_label("spearman")
    'Spearman rank correlation'
    """
    spec = METRICS.get(name)
    return spec.label if spec is not None else name


register_metric(
    "topk_intersection",
    lambda a, c, o: MF.topk_intersection(a, c, o["k"]),
    label="top-k intersection",
    cls="TopKIntersection",
    cls_opts=("k",),
    requires=("k",),
)
register_metric("spearman", lambda a, c, o: MF.spearman(a, c), label="Spearman rank correlation", cls="SpearmanRank")
register_metric("kendall", lambda a, c, o: MF.kendall_tau(a, c), label="Kendall tau-b", cls="KendallTau")
register_metric(
    "center_shift",
    lambda a, c, o: MF.center_shift(a, c),
    label="centre-of-mass shift (pixels)",
    similarity=False,
    cls="CenterShift",
)
register_metric(
    "lens_recall",
    lambda a, c, o: MF.lens_topk(c, a, o["k"], o.get("window", 1), mode="recall"),
    label="LENS recall",
    cls="LensTopK",
    cls_opts=("k", "window"),
    requires=("k",),
    cls_swap=True,
)
register_metric(
    "target_mass",
    lambda a, c, o: (a * o["target_mask"]).sum((1, 2)),
    label="map mass in the target region",
    similarity=None,
    requires=("target_mask",),
)
register_metric(
    "target_mse",
    lambda a, c, o: ((a - o["target_map"]) ** 2).flatten(1).mean(1),
    label="MSE to the target map",
    similarity=None,
    requires=("target_map",),
)
