"""Explanation quality and label robustness as evaluation cells, streamed batch by batch (plain torch).

Beside the attack grid (:mod:`~fragdefense.evaluation.engine`), an evaluation can score each explainer's *clean*
maps with the registered explanation scores (robustness: max/avg-sensitivity, local Lipschitz estimate, relative
stabilities; faithfulness: deletion/insertion AUC, ROAD, faithfulness correlation) and measure the model's robust
accuracy under label attacks (the project's PGD, AutoAttack). A defense that makes maps stable by making them
meaningless shows up as a worse deletion/insertion AUC and ROAD next to its better top-k intersection.

Both run as :class:`~fragdefense.evaluation.engine.Cell` records (``kind="quality"`` per explainer,
``kind="robust"`` per label attack and budget), one row per image, seeded per image from
``(seed, explainer, score, image id)``, and go through the same resumable
:class:`~fragdefense.evaluation.store.CellStore` as the attack cells.

>>> import torch
>>> from fragdefense.models import create_model
>>> _ = torch.manual_seed(0)
>>> net = create_model("small_cnn", num_classes=3, width=4).eval()
>>> data = [(torch.rand(4, 3, 16, 16), torch.randint(0, 3, (4,)))]
>>> res = next(run_quality(net, data, explainers=["saliency"], scores=["deletion_auc"],
...                        score_opts={"deletion_auc": {"steps": 8}}, require_correct=False))
>>> res.cell.key, res.aggregate["n_images"], 0.0 <= res.aggregate["deletion_auc"] <= 1.0
('saliency__quality', 4, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fragdefense.evaluation.engine import (
    Cell,
    CellResult,
    ExplainerSpec,
    _device_of,
    aggregate_rows,
    explainer_specs,
    iter_batches,
)
from fragdefense.metrics.registry import compute_explanation_scores, get_metric, list_metrics
from fragdefense.utils.conventions import Budget, eval_mode, image_seed, make_generator

__all__ = [
    "check_scores",
    "run_quality_cell",
    "run_quality",
    "run_robust_cell",
    "run_robust_accuracy",
    "quality_cells",
    "robust_cells",
    "robust_aggregate",
    "score_higher_is_better",
]


def check_scores(scores: Sequence[str], score_opts: Mapping[str, Any] | None = None) -> list[str]:
    """Check explanation-score names (and that ``score_opts`` only names selected scores) before any work."""
    if isinstance(scores, str):
        scores = [scores]
    known = list_metrics(kind="explanation")
    out = []
    for s in scores:
        if s not in known:
            raise ValueError(f"unknown explanation score {s!r} in `scores`; registered: {', '.join(known)}")
        out.append(str(s))
    for k in score_opts or {}:
        if k not in out:
            raise ValueError(f"`score_opts` has options for {k!r}, which is not in `scores` {out}")
    return out


def quality_cells(explainers: Iterable[str]) -> list[Cell]:
    """One quality cell per explainer label."""
    return [Cell(str(e), "", Budget(0), "quality") for e in explainers]


def robust_cells(attacks: Iterable[str], eps: Iterable[Any]) -> list[Cell]:
    """One robust-accuracy cell per (label attack, budget)."""
    return [Cell("", str(a), Budget(e, "eps"), "robust") for a in attacks for e in eps]


def run_quality_cell(
    model: nn.Module,
    data: Iterable[Any],
    explainer: ExplainerSpec,
    scores: Sequence[str],
    *,
    score_opts: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    require_correct: bool = True,
    progress: Callable[[int], None] | None = None,
) -> CellResult:
    """Every score of ``scores`` on ``explainer``'s clean maps of each image of ``data`` (the true class is
    explained; with ``require_correct`` only correctly classified images are scored, as in the attack cells).

    Rows: ``{"image", "label", <score>: value, ...}``; the aggregate holds each score's mean over the images.
    """
    from fragdefense.metrics.robustness import make_explain

    scores = check_scores(scores, score_opts)
    dev = torch.device(device) if device is not None else _device_of(model)
    cell = quality_cells([explainer.label])[0]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    n_skipped = 0
    with eval_mode(model):
        explain = make_explain(model, explainer.method, **explainer.opts)
        for x, y, ids in iter_batches(data):
            xb, yb = x.to(dev), y.to(dev)
            if require_correct:
                with torch.no_grad():
                    keep = (model(xb).argmax(1) == yb).nonzero().flatten()
                n_skipped += int(xb.shape[0] - keep.numel())
                if keep.numel() == 0:
                    if progress is not None:
                        progress(int(x.shape[0]))
                    continue
                xb, yb = xb[keep], yb[keep]
                ids = [ids[int(i)] for i in keep.tolist()]
            maps = explain(xb, yb).detach()
            row_vals: dict[str, list[float]] = {}
            for s in scores:
                opts = dict((score_opts or {}).get(s) or {})
                opts["generator"] = make_generator([image_seed(seed, explainer.label, s, i) for i in ids], dev)
                v = compute_explanation_scores(model, xb, yb, maps, explain, [s], opts)[s]
                row_vals[s] = [float(t) for t in v.detach().cpu().tolist()]
            for j, i in enumerate(ids):
                rows.append({"image": i, "label": int(yb[j]), **{s: row_vals[s][j] for s in scores}})
            if progress is not None:
                progress(int(x.shape[0]))
    agg = aggregate_rows(rows, n_skipped)
    for s in scores:  # a score no image was scored on is None (not measured), never missing
        agg.setdefault(s, None)
    return CellResult(cell, rows, agg, None, False, time.perf_counter() - t0, [])


def run_quality(
    model: nn.Module,
    data: Iterable[Any],
    *,
    explainers: Any,
    scores: Sequence[str],
    score_opts: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    store: Any = None,
    require_correct: bool = True,
    progress: Callable[[Cell, int], None] | None = None,
) -> Iterator[CellResult]:
    """:func:`run_quality_cell` for each explainer; cells in ``store`` are read back, new ones written."""
    scores = check_scores(scores, score_opts)
    specs = explainer_specs(explainers)
    for cell in quality_cells(specs):
        if store is not None and store.has(cell.key):
            yield store.read(cell)
            continue
        res = run_quality_cell(
            model,
            data,
            specs[cell.explainer],
            scores,
            score_opts=score_opts,
            seed=seed,
            device=device,
            require_correct=require_correct,
            progress=(lambda n, c=cell: progress(c, n)) if progress is not None else None,
        )
        if store is not None:
            store.write(res)
        yield res


def score_higher_is_better(name: str) -> bool | None:
    """Whether a higher value of explanation score ``name`` is better."""
    return get_metric(name).similarity


def run_robust_cell(
    model: nn.Module,
    data: Iterable[Any],
    attack: str,
    eps: Any,
    *,
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> CellResult:
    """Robust accuracy of ``model`` under label attack ``attack`` (:func:`~fragdefense.attacks.robust_accuracy`)
    at budget ``eps`` over every image of ``data``.

    Rows: ``{"image", "label", "clean_correct", "robust_correct"}`` (``robust_correct`` ``None`` where the attack
    failed: not measured); the aggregate's ``clean_correct`` / ``robust_correct`` are the clean and robust
    accuracy over all images (a misclassified image is not robust), ``n_failed`` counts the unmeasured ones and
    makes ``robust_accuracy`` ``None``. Each batch's attack is seeded from ``(seed, attack, eps, first image id)``.
    """
    from fragdefense.attacks.robust_accuracy import robust_accuracy

    cell = robust_cells([attack], [eps])[0]
    dev = torch.device(device) if device is not None else _device_of(model)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for x, y, ids in iter_batches(data):
        res = robust_accuracy(
            model,
            x.to(dev),
            y.to(dev),
            attack=attack,
            eps=float(cell.eps),
            norm=norm,
            steps=steps,
            seed=image_seed(seed, attack, str(cell.eps), ids[0]),
            on_error="mark",
        )
        notes += [e for e in res.errors if e not in notes]
        failed = res.failed if res.failed is not None else torch.zeros_like(res.clean_correct)
        for j, i in enumerate(ids):
            rows.append(
                {
                    "image": i,
                    "label": int(y[j]),
                    "clean_correct": bool(res.clean_correct[j]),
                    "robust_correct": None if bool(failed[j]) else bool(res.robust_correct[j]),
                }
            )
        if progress is not None:
            progress(int(x.shape[0]))
    agg = {**robust_aggregate(rows), "attack": attack, "norm": norm}
    return CellResult(cell, rows, agg, None, False, time.perf_counter() - t0, notes)


def robust_aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Clean and robust accuracy over robust-accuracy rows; ``robust_accuracy`` is ``None`` when some image's
    attack failed (not measured) or there is no image.

    >>> robust_aggregate([{"clean_correct": True, "robust_correct": False}, {"clean_correct": True,
    ...                    "robust_correct": True}])["robust_accuracy"]
    0.5
    """
    n = len(rows)
    n_failed = sum(r.get("robust_correct") is None for r in rows)
    clean = sum(bool(r.get("clean_correct")) for r in rows)
    robust = sum(bool(r.get("robust_correct")) for r in rows)
    return {
        "n_images": n,
        "n_failed": n_failed,
        "clean_accuracy": clean / n if n else None,
        "robust_accuracy": robust / n if n and not n_failed else None,
    }


def run_robust_accuracy(
    model: nn.Module,
    data: Iterable[Any],
    *,
    attacks: Sequence[str],
    eps: Sequence[Any],
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    store: Any = None,
    progress: Callable[[Cell, int], None] | None = None,
) -> Iterator[CellResult]:
    """:func:`run_robust_cell` for every (label attack, eps); cells in ``store`` are read back, new ones written.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    >>> data = [(torch.rand(6, 3, 4, 4), torch.randint(0, 4, (6,)))]
    >>> res = next(run_robust_accuracy(net, data, attacks=["pgd"], eps=["2/255"], steps=5))
    >>> res.cell.key, res.aggregate["robust_accuracy"] <= res.aggregate["clean_accuracy"]
    ('robust__pgd__2_255', True)
    """
    from fragdefense.attacks.robust_accuracy import list_label_attacks

    known = list_label_attacks()
    for a in attacks:
        if a not in known:
            raise ValueError(f"unknown label attack {a!r} in `attacks`; registered: {', '.join(known)}")
    for cell in robust_cells(attacks, eps):
        if store is not None and store.has(cell.key):
            yield store.read(cell)
            continue
        res = run_robust_cell(
            model,
            data,
            cell.attack,
            cell.eps,
            norm=norm,
            steps=steps,
            seed=seed,
            device=device,
            progress=(lambda n, c=cell: progress(c, n)) if progress is not None else None,
        )
        if store is not None:
            store.write(res)
        yield res
