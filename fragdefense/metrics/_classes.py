"""torchmetrics wrappers around :mod:`fragdefense.metrics.functional` (imported lazily by the package).

Every class computes per-sample values with the functional core in ``update`` and keeps two states,
``sum`` (float64) and ``count`` (int64), both reduced with ``"sum"`` across processes, so the mean is exact
under DDP whatever the per-rank batch sizes. With ``per_sample=True`` it also keeps the list state
``values`` (reduced with ``"cat"``), read back with :meth:`compute_per_sample`; the values are kept in the
metric's dtype (``metric.dtype``: float32 unless ``metric.set_dtype(torch.float64)``), so every process gathers
the same dtype, including a process that saw no sample.

MPS has no float64: call ``metric.set_dtype(torch.float32)`` after moving a metric there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from fragdefense.metrics import functional as MF
from fragdefense.utils.checks import check_int_in_range

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
]


class _PerSampleMean(Metric):
    """Mean over samples of a per-sample score ``fn(a, b) -> (B,)``; optional per-sample record."""

    is_differentiable = False
    higher_is_better: bool | None = True
    full_state_update = False
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = 1.0

    sum: Tensor
    count: Tensor
    values: list[Tensor]

    def __init__(self, per_sample: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(per_sample, bool):
            raise TypeError(f"`per_sample` must be a bool, got {type(per_sample).__name__}")
        self.per_sample = per_sample
        self.add_state("sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if per_sample:
            self.add_state("values", default=[], dist_reduce_fx="cat")

    def _score(self, a: Tensor, b: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, a: Tensor, b: Tensor) -> None:
        """Score a batch (``(B,)`` values from the functional core) and accumulate it."""
        self._accumulate(self._score(a, b))

    def _accumulate(self, v: Tensor) -> None:
        v = v.detach()
        self.sum += v.sum(dtype=self.sum.dtype)
        self.count += v.numel()
        if self.per_sample:
            # stored in the metric's dtype (float32 unless ``set_dtype``): under DDP a process that saw no
            # sample contributes torchmetrics' empty stand-in of that dtype, and every process must gather one
            # dtype (float64 or float16 values next to the float32 stand-in abort gloo's all-gather)
            self.values.append(v.to(self.dtype))

    def compute(self) -> Tensor:
        """Mean score over every sample seen since the last :meth:`reset` (all processes under DDP)."""
        if int(self.count) == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called with no samples; call update() first")
        return (self.sum / self.count).to(torch.get_default_dtype())

    def compute_per_sample(self) -> Tensor:
        """``(N,)`` per-sample scores since the last reset; needs ``per_sample=True``.

        In update order on one process; under DDP the processes' lists are gathered (synced like
        :meth:`compute`), so the order across processes follows torchmetrics' gather.
        """
        if not self.per_sample:
            raise RuntimeError(f"{type(self).__name__} was created with per_sample=False; pass per_sample=True")
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            values = self.values
            if isinstance(values, Tensor):
                out = values
            elif len(values) == 0:
                out = torch.empty(0, dtype=self.dtype, device=self.sum.device)
            else:
                out = dim_zero_cat(values)
            return out.clone()


class TopKIntersection(_PerSampleMean):
    """Mean top-k intersection :math:`|T_k(a) \\cap T_k(b)| / k` (see :func:`~.functional.topk_intersection`).

    >>> m = TopKIntersection(k=2)
    >>> m.update(torch.tensor([[4., 3., 2., 1.]]), torch.tensor([[4., 1., 2., 3.]]))
    >>> m.compute()
    tensor(0.5000)
    """

    def __init__(self, k: int, per_sample: bool = False, **kwargs: Any) -> None:
        super().__init__(per_sample=per_sample, **kwargs)
        self.k = check_int_in_range(k, "k", 1)

    def _score(self, a: Tensor, b: Tensor) -> Tensor:
        return MF.topk_intersection(a, b, self.k)


class SpearmanRank(_PerSampleMean):
    """Mean per-map Spearman rank correlation (see :func:`~.functional.spearman`).

    >>> m = SpearmanRank(per_sample=True)
    >>> m.update(torch.tensor([[1., 2., 3.]]), torch.tensor([[3., 2., 1.]]))
    >>> m.update(torch.tensor([[1., 2., 3.]]), torch.tensor([[1., 2., 3.]]))
    >>> m.compute(), m.compute_per_sample()
    (tensor(0.), tensor([-1.,  1.]))
    """

    plot_lower_bound = -1.0

    def _score(self, a: Tensor, b: Tensor) -> Tensor:
        return MF.spearman(a, b)


class KendallTau(_PerSampleMean):
    """Mean per-map Kendall tau-b (see :func:`~.functional.kendall_tau`).

    >>> m = KendallTau()
    >>> m.update(torch.tensor([[1., 2., 3., 4.]]), torch.tensor([[1., 3., 2., 4.]]))
    >>> m.compute()
    tensor(0.6667)
    """

    plot_lower_bound = -1.0

    def _score(self, a: Tensor, b: Tensor) -> Tensor:
        return MF.kendall_tau(a, b)


class CenterShift(_PerSampleMean):
    """Mean centre-of-mass shift in pixels (lower is better; see :func:`~.functional.center_shift`).

    >>> a = torch.zeros(1, 5, 5); a[0, 0, 0] = 1.0
    >>> b = torch.zeros(1, 5, 5); b[0, 3, 4] = 1.0
    >>> m = CenterShift()
    >>> m.update(a, b)
    >>> m.compute()
    tensor(5.)
    """

    higher_is_better = False
    plot_upper_bound = None

    def _score(self, a: Tensor, b: Tensor) -> Tensor:
        return MF.center_shift(a, b)


class LensTopK(_PerSampleMean):
    """Mean LENS recall/precision@k with window ``w``, optionally on top-k-div sets (see
    :func:`~.functional.lens_topk`).

    >>> a = torch.zeros(1, 4, 4); a[0, 0, 0] = 1.0
    >>> b = torch.zeros(1, 4, 4); b[0, 1, 1] = 1.0
    >>> m = LensTopK(k=1, window=1, mode="precision")
    >>> m.update(a, b)
    >>> m.compute()
    tensor(1.)
    """

    def __init__(
        self,
        k: int,
        window: int,
        mode: str = "recall",
        diverse: bool = False,
        per_sample: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(per_sample=per_sample, **kwargs)
        self.k = check_int_in_range(k, "k", 1)
        self.window = check_int_in_range(window, "window", 0)
        if mode not in ("recall", "precision"):
            raise ValueError(f"`mode` must be one of ('recall', 'precision'), got {mode!r}")
        if not isinstance(diverse, bool):
            raise TypeError(f"`diverse` must be a bool, got {type(diverse).__name__}")
        self.mode = mode
        self.diverse = diverse

    def _score(self, a: Tensor, b: Tensor) -> Tensor:
        return MF.lens_topk(a, b, self.k, self.window, mode=self.mode, diverse=self.diverse)


class MaskMass(_PerSampleMean):
    """Mean fraction of a non-negative map's mass inside a ground-truth mask; ``update(a, mask)`` (see
    :func:`~.functional.mask_mass`).

    >>> m = MaskMass()
    >>> m.update(torch.tensor([[1., 3., 0., 0.]]), torch.tensor([[False, True, True, False]]))
    >>> m.compute()
    tensor(0.7500)
    """

    def update(self, a: Tensor, mask: Tensor) -> None:  # type: ignore[override]
        """Score a batch of maps against binary masks and accumulate it."""
        super().update(a, mask)

    def _score(self, a: Tensor, b: Tensor) -> Tensor:
        return MF.mask_mass(a, b)


class PointingGame(_PerSampleMean):
    """Pointing-game hit rate: fraction of maps whose maximum lies inside the mask; ``update(a, mask)`` (see
    :func:`~.functional.pointing_game`).

    >>> m = PointingGame()
    >>> m.update(torch.tensor([[0., 5., 1.], [2., 2., 2.]]), torch.tensor([[0, 1, 0], [1, 1, 1]]))
    >>> m.compute()
    tensor(0.5000)
    """

    def update(self, a: Tensor, mask: Tensor) -> None:  # type: ignore[override]
        """Score a batch of maps against binary masks and accumulate it."""
        super().update(a, mask)

    def _score(self, a: Tensor, b: Tensor) -> Tensor:
        return MF.pointing_game(a, b)


class ExplanationScore(_PerSampleMean):
    """Mean of a registered explanation score (robustness or faithfulness of an attribution method) over images;
    ``update(model, x, y)`` explains ``x`` for the classes ``y`` with ``method`` and scores the maps (see
    :mod:`fragdefense.metrics.robustness` and :mod:`fragdefense.metrics.faithfulness`). The model is passed to
    each ``update`` rather than held, so a monitor scores the current weights and the metric's state holds
    numbers only (sum and count, reduced with ``"sum"`` under DDP).

    Args:
        score: a registered explanation score (``list_metrics(kind="explanation")``).
        method: attribution method (registry name, callable or captum object).
        method_opts: options of the method.
        per_sample: also keep the per-image values.
        **opts: the score's settings (e.g. ``n_samples``, ``radius``, ``baseline``); a ``seed`` makes the random
            draws reproducible (per image: image ``i`` of the ``n``-th update uses ``seed + n * 1_000_003 + i``).

    >>> from fragdefense.models import create_model
    >>> _ = torch.manual_seed(0)
    >>> net = create_model("small_cnn", num_classes=3, width=4).eval()
    >>> m = ExplanationScore("deletion_auc", "saliency", steps=8)
    >>> m.update(net, torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))
    >>> 0.0 <= float(m.compute()) <= 1.0
    True
    """

    plot_lower_bound = None
    plot_upper_bound = None

    def __init__(
        self,
        score: str,
        method: Any = "saliency",
        method_opts: dict[str, Any] | None = None,
        per_sample: bool = False,
        seed: int | None = None,
        **opts: Any,
    ) -> None:
        from fragdefense.attributions.registry import resolve_attribution
        from fragdefense.metrics.registry import get_metric

        spec = get_metric(score)
        if spec.kind != "explanation":
            raise ValueError(f"`score`={score!r} compares two maps; use its own class ({spec.cls}) instead")
        resolve_attribution(method, "method")
        super().__init__(per_sample=per_sample)
        self.score = score
        self.method = method
        self.method_opts = dict(method_opts or {})
        self.opts = dict(opts)
        self.seed = seed
        self._n_updates = 0
        #: whether a higher value is better (from the registry; ``higher_is_better`` is a class constant)
        self.score_higher_is_better = spec.similarity

    def update(self, model: Any, x: Tensor, y: Tensor, maps: Tensor | None = None) -> None:  # type: ignore[override]
        """Explain ``x`` for ``y`` with the metric's method (or take the given ``maps``), score and accumulate."""
        from fragdefense.metrics.registry import compute_explanation_scores
        from fragdefense.metrics.robustness import make_explain
        from fragdefense.utils.conventions import make_generator

        explain = make_explain(model, self.method, **self.method_opts)
        if maps is None:
            maps = explain(x, y)
        opts = dict(self.opts)
        if self.seed is not None:
            base = int(self.seed) + self._n_updates * 1_000_003
            opts["generator"] = make_generator([base + i for i in range(x.shape[0])], x.device)
        self._n_updates += 1
        self._accumulate(compute_explanation_scores(model, x, y, maps, explain, [self.score], opts)[self.score])


def _score_class(cls_name: str, score: str, summary: str, higher: bool) -> type[ExplanationScore]:
    def __init__(
        self: ExplanationScore,
        method: Any = "saliency",
        method_opts: dict[str, Any] | None = None,
        per_sample: bool = False,
        seed: int | None = None,
        **opts: Any,
    ) -> None:
        ExplanationScore.__init__(self, score, method, method_opts, per_sample, seed, **opts)

    doc = (
        f"{summary} (``ExplanationScore({score!r}, ...)``): ``update(model, x, y)``; options as in the functional form."
    )
    ns = {"__init__": __init__, "__doc__": doc, "__module__": __name__, "higher_is_better": higher}
    return type(cls_name, (ExplanationScore,), ns)


MaxSensitivity = _score_class("MaxSensitivity", "max_sensitivity", "Mean max-sensitivity (Yeh et al. 2019)", False)
AvgSensitivity = _score_class("AvgSensitivity", "avg_sensitivity", "Mean avg-sensitivity (Yeh et al. 2019)", False)
LocalLipschitzEstimate = _score_class(
    "LocalLipschitzEstimate",
    "local_lipschitz_estimate",
    "Mean local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018)",
    False,
)
RelativeInputStability = _score_class(
    "RelativeInputStability", "relative_input_stability", "Mean relative input stability (Agarwal et al. 2022)", False
)
RelativeOutputStability = _score_class(
    "RelativeOutputStability",
    "relative_output_stability",
    "Mean relative output stability (Agarwal et al. 2022)",
    False,
)
RelativeRepresentationStability = _score_class(
    "RelativeRepresentationStability",
    "relative_representation_stability",
    "Mean relative representation stability (Agarwal et al. 2022)",
    False,
)
DeletionAUC = _score_class("DeletionAUC", "deletion_auc", "Mean deletion AUC (Petsiuk et al. 2018)", False)
InsertionAUC = _score_class("InsertionAUC", "insertion_auc", "Mean insertion AUC (Petsiuk et al. 2018)", True)


class ROAD(ExplanationScore):
    """Mean ROAD score (Rong et al. 2022) in the ``order`` ``"morf"`` (most relevant first: lower is better) or
    ``"lerf"`` (least relevant first: higher is better): ``update(model, x, y)``; options as in
    :func:`~fragdefense.metrics.faithfulness.road`."""

    def __init__(
        self,
        method: Any = "saliency",
        method_opts: dict[str, Any] | None = None,
        per_sample: bool = False,
        seed: int | None = None,
        order: str = "morf",
        **opts: Any,
    ) -> None:
        if order not in ("morf", "lerf"):
            raise ValueError(f"`order` must be 'morf' or 'lerf', got {order!r}")
        super().__init__(f"road_{order}", method, method_opts, per_sample, seed, **opts)
        self.order = order


FaithfulnessCorrelation = _score_class(
    "FaithfulnessCorrelation", "faithfulness_correlation", "Mean faithfulness correlation (Bhatt et al. 2020)", True
)
