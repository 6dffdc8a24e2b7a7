"""Certified attributions as evaluation cells, streamed batch by batch (plain torch).

Each explainer's maps are certified pixel by pixel by randomized smoothing
(:func:`~fragdefense.certify.certify_attribution`; Anani, Lorenz, Fritz & Schiele, "Pixel-level Certified
Explanations via Randomized Smoothing"): a cell ``kind="certify"`` per explainer (key ``<explainer>__certify``), one
row per image, seeded **per image** -- the noise of image ``i`` comes from
``image_seed(seed, explainer, "certify", i)`` and the random pixels of its certified-deletion baseline from
``image_seed(seed, explainer, "certify", i, "deletion")``; a method with its own noise (SmoothGrad: a ``generator``
option) draws it from ``image_seed(seed, explainer, "certify", i, "method")`` -- so a row does not depend on the
batch it is in. Cells go
through the same resumable :class:`~fragdefense.evaluation.store.CellStore` as the attack and quality cells.

Rows: ``image``, ``label`` (the explained class: the true label), ``certified_rate`` (share of pixels certified),
``certified_important_rate`` (share certified important), ``abstain_rate``, ``rate_at_<r>`` for each radius ``r`` of
``radii`` (share certified with radius ``>= r``), ``common_radius`` (``sigma * Phi^-1(tau)``),
``deletion_drop_certified`` / ``deletion_drop_random`` (drop of the target-class probability when the certified-
important pixels / as many random pixels are set to 0, :func:`~fragdefense.certify.certified_deletion`),
``certified_map_deletion_auc`` (the deletion AUC of :func:`~fragdefense.metrics.faithfulness.deletion_auc`, 32
steps, over the certified map: certified important first, then abstained, then certified not important) and, when
object masks are given, ``localization`` (share of the certified-important pixels inside the mask; ``None`` without
any certified-important pixel). The aggregate is the mean of each over the images.

>>> import torch
>>> from fragdefense.models import create_model
>>> _ = torch.manual_seed(0)
>>> net = create_model("small_cnn", num_classes=3, width=4).eval()
>>> data = [(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))]
>>> res = next(run_certify(net, data, explainers=["saliency"], settings={"n0": 4, "n": 20, "radii": [0.0, 0.1]},
...                        require_correct=False))
>>> res.cell.key, res.aggregate["n_images"], sorted(k for k in res.rows[0] if k.startswith("rate_at"))
('saliency__certify', 2, ['rate_at_0', 'rate_at_0.1'])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fragdefense.evaluation.engine import (
    Cell,
    CellResult,
    ExplainerSpec,
    _device_of,
    aggregate_rows,
    explainer_specs,
    iter_batches,
)
from fragdefense.utils.conventions import Budget, image_seed, make_generator

__all__ = [
    "CERTIFY_DEFAULTS",
    "check_certify_settings",
    "certify_cells",
    "rate_key",
    "run_certify_cell",
    "run_certify",
]

#: settings of a certification run when not given (recorded with every result)
CERTIFY_DEFAULTS: dict[str, Any] = {
    "sigma": 0.25,
    "n0": 10,
    "n": 100,
    "tau": 0.75,
    "alpha": 0.001,
    "top_percent": 20.0,
    "correction": "bonferroni",
    "radii": [0.0, 0.05, 0.1, 0.2],
    "reduce": "abs_sum",
    "chunk_size": None,
}


def rate_key(r: float) -> str:
    """The row key of the certified rate at radius ``r``.

    >>> rate_key(0.0), rate_key(0.05), rate_key(0.25)
    ('rate_at_0', 'rate_at_0.05', 'rate_at_0.25')
    """
    return f"rate_at_{float(r):g}"


def check_certify_settings(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`CERTIFY_DEFAULTS` updated with ``settings``, every value checked (unknown keys refused) before any work.

    >>> check_certify_settings({"sigma": 0.12, "radii": [0, 0.1]})["radii"]
    [0.0, 0.1]
    >>> check_certify_settings({"sigmas": 0.1})
    Traceback (most recent call last):
    ...
    ValueError: unknown certification setting(s) ['sigmas']; known: alpha, chunk_size, correction, n, n0, radii, \
reduce, sigma, tau, top_percent
    """
    from fragdefense.certify.smoothing import (
        CORRECTIONS,
        _check_chunk,
        _check_open,
        _check_reduce,
        _check_sigma,
    )
    from fragdefense.certify.stats import _check_level
    from fragdefense.utils.checks import check_int_in_range

    given = dict(settings or {})
    bad = sorted(set(given) - set(CERTIFY_DEFAULTS))
    if bad:
        raise ValueError(f"unknown certification setting(s) {bad}; known: {', '.join(sorted(CERTIFY_DEFAULTS))}")
    s = {**CERTIFY_DEFAULTS, **given}
    s["sigma"] = _check_sigma(s["sigma"])
    s["n0"] = check_int_in_range(s["n0"], "n0", 1)
    s["n"] = check_int_in_range(s["n"], "n", 1)
    s["tau"] = _check_open(s["tau"], "tau", 0.5, 1.0)
    s["alpha"] = _check_level(s["alpha"], "alpha")
    s["top_percent"] = _check_open(s["top_percent"], "top_percent", 0.0, 100.0)
    if s["correction"] not in CORRECTIONS:
        raise ValueError(f"`correction` must be one of {CORRECTIONS}, got {s['correction']!r}")
    s["reduce"] = _check_reduce(s["reduce"])
    s["chunk_size"] = _check_chunk(s["chunk_size"])
    radii = s["radii"]
    radii = [radii] if isinstance(radii, (int, float)) else radii
    try:
        radii = [float(r) for r in radii]
    except (TypeError, ValueError):
        raise TypeError(f"`radii` must be a list of L2 radii >= 0 (pixel units), got {s['radii']!r}") from None
    if not radii or any(not (math.isfinite(r) and r >= 0) for r in radii):
        raise ValueError(f"`radii` must be a non-empty list of finite L2 radii >= 0 (pixel units), got {s['radii']!r}")
    s["radii"] = radii
    return s


def certify_cells(explainers: Iterable[str]) -> list[Cell]:
    """One certification cell per explainer label.

    >>> [c.key for c in certify_cells(["saliency", "smoothgrad"])]
    ['saliency__certify', 'smoothgrad__certify']
    """
    return [Cell(str(e), "", Budget(0), "certify") for e in explainers]


def _batches(data: Iterable[Any]) -> Iterator[tuple[Tensor, Tensor, list[int], Any]]:
    """``(x, y, ids, mask or None)``: :func:`~fragdefense.evaluation.engine.iter_batches` plus a dict batch's
    ``"mask"``."""
    pos = 0
    for batch in data:
        mask = batch.get("mask") if isinstance(batch, Mapping) else None
        for x, y, ids in iter_batches([batch], id_offset=pos):
            pos += x.shape[0]
            yield x, y, ids, mask


def _mask_for(masks: Any, batch_mask: Any, ids: Sequence[int], keep: list[int]) -> Tensor | None:
    if batch_mask is not None:
        return torch.as_tensor(batch_mask)[keep].bool()
    if masks is None:
        return None
    if isinstance(masks, Tensor):
        return masks[[ids[j] for j in keep]].bool()
    if isinstance(masks, Mapping):
        return torch.stack([torch.as_tensor(masks[ids[j]]) for j in keep]).bool()
    raise TypeError(
        "`masks` must be None, a tensor (N, H, W) indexed by image id or a dict id -> (H, W) mask, "
        f"got {type(masks).__name__}"
    )


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _seeds_method(explainer: ExplainerSpec) -> bool:
    """Whether the method draws its own noise through a ``generator`` option that the user did not set (SmoothGrad):
    such a method gets a per-image ``torch.Generator`` and is certified one image at a time."""
    import inspect

    from fragdefense.attributions.registry import resolve_attribution

    if "generator" in explainer.opts or "seed" in explainer.opts or "noise" in explainer.opts:
        return False
    try:
        return "generator" in inspect.signature(resolve_attribution(explainer.method).fn).parameters
    except (TypeError, ValueError):
        return False


def _certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    ids: list[int],
    explainer: ExplainerSpec,
    s: dict[str, Any],
    seed: int,
    dev: torch.device,
    stochastic: bool,
) -> Any:
    """:func:`~fragdefense.certify.certify_attribution` with the per-image seeds; a method with its own noise gets
    its own per-image generator ``image_seed(seed, explainer, "certify", id, "method")`` (the state advances over
    the image's noisy samples, so they stay independent) and runs image by image (each call still batches the
    ``n0 + n`` noisy copies)."""
    from fragdefense.certify import certify_attribution
    from fragdefense.certify.smoothing import CertifiedAttribution

    kw = dict(
        sigma=s["sigma"], n0=s["n0"], n=s["n"], tau=s["tau"], alpha=s["alpha"], top_percent=s["top_percent"],
        correction=s["correction"], chunk_size=s["chunk_size"], reduce=s["reduce"],
    )  # fmt: skip
    seeds = [image_seed(seed, explainer.label, "certify", i) for i in ids]
    if not stochastic:
        gens = make_generator(seeds, dev)
        return certify_attribution(
            model, x, explainer.method, target=y, generator=gens, method_opts=dict(explainer.opts), **kw
        )
    parts = []
    for j, i in enumerate(ids):
        g = make_generator(image_seed(seed, explainer.label, "certify", i, "method"), dev)
        opts = {**explainer.opts, "generator": g}
        parts.append(
            certify_attribution(
                model, x[j : j + 1], explainer.method, target=y[j : j + 1], generator=[seeds[j]], method_opts=opts, **kw
            )
        )
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    cat = {
        k: torch.cat([getattr(p, k) for p in parts])
        for k in ("labels", "radius", "certified_rate", "counts", "selected", "p_lower", "p_values", "target")
    }
    rest = {k: getattr(first, k) for k in ("common_radius", "k", "sigma", "n0", "n", "tau", "alpha", "top_percent",
                                            "correction", "method", "settings")}  # fmt: skip
    return CertifiedAttribution(**cat, **rest)


def run_certify_cell(
    model: nn.Module,
    data: Iterable[Any],
    explainer: ExplainerSpec,
    *,
    sigma: float = 0.25,
    n0: int = 10,
    n: int = 100,
    tau: float = 0.75,
    alpha: float = 0.001,
    top_percent: float = 20.0,
    correction: str = "bonferroni",
    radii: Sequence[float] = (0.0, 0.05, 0.1, 0.2),
    seed: int = 0,
    device: torch.device | str | None = None,
    require_correct: bool = True,
    masks: Any = None,
    progress: Callable[[int], None] | None = None,
    n_examples: int = 0,
    reduce: str = "abs_sum",
    chunk_size: int | None = None,
) -> CellResult:
    """Certify ``explainer``'s maps of every image of ``data`` (the true class is explained; with ``require_correct``
    only correctly classified images are certified, the others counted in ``n_skipped``). See the module docstring
    for the rows and the seeds.

    Args:
        model: classifier on images in ``[0, 1]`` (run in eval mode).
        data: iterable of ``(x, y)``, ``(x, y, ids)`` or dict batches (``x``, ``y``, optional ``ids`` and ``mask``).
        explainer: the explainer (its ``opts`` are the method's options).
        sigma, n0, n, tau, alpha, top_percent, correction, reduce, chunk_size: as
            :func:`~fragdefense.certify.certify_attribution`.
        radii: L2 radii of the ``rate_at_<r>`` columns.
        seed: the run's seed (per-image seeds, see the module docstring).
        masks: object masks for ``localization``: a bool tensor ``(N, H, W)`` indexed by image id or a dict
            ``id -> (H, W)``; a dict batch's ``"mask"`` takes precedence.
        progress: called with the number of images of each finished batch.
        n_examples: keep the first images for :func:`~fragdefense.evaluation.figures.plot_certified_maps`:
            ``x``, ``clean_map`` (the method's map of the clean image), ``labels`` (certified labels: 1 important,
            0 not important, -1 abstain), ``radius`` (per-pixel certified radius), ``label``, ``id``.
    """
    from fragdefense.attributions.maps import to_map
    from fragdefense.certify import certified_deletion, certified_localization
    from fragdefense.metrics.faithfulness import deletion_auc

    s = check_certify_settings(
        dict(
            sigma=sigma, n0=n0, n=n, tau=tau, alpha=alpha, top_percent=top_percent, correction=correction,
            radii=list(radii), reduce=reduce, chunk_size=chunk_size,
        )
    )  # fmt: skip
    radii = s["radii"]
    dev = torch.device(device) if device is not None else _device_of(model)
    cell = certify_cells([explainer.label])[0]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    n_skipped = 0
    examples: dict[str, list[Tensor]] = {k: [] for k in ("x", "clean_map", "labels", "radius", "label", "id")}
    stochastic = _seeds_method(explainer)
    was_training = model.training
    model.eval()
    try:
        for x, y, ids, batch_mask in _batches(data):
            xb, yb = x.to(dev), y.to(dev)
            keep = list(range(xb.shape[0]))
            if require_correct:
                with torch.no_grad():
                    keep = (model(xb).argmax(1) == yb).nonzero().flatten().tolist()
                n_skipped += int(xb.shape[0] - len(keep))
            if keep:
                mask = _mask_for(masks, batch_mask, ids, keep)
                xk, yk, ik = xb[keep], yb[keep], [ids[j] for j in keep]
                res = _certify(model, xk, yk, ik, explainer, s, seed, dev, stochastic)
                dgen = make_generator([image_seed(seed, explainer.label, "certify", i, "deletion") for i in ik], dev)
                dele = certified_deletion(model, xk, res, generator=dgen)
                curve = res.certified_rate_at(radii).cpu().tolist()
                imp = res.certified_important.flatten(1).to(torch.float64).mean(1).cpu().tolist()
                cert = res.certified_rate.cpu().tolist()
                d_cert, d_rand = dele.drop_certified.cpu().tolist(), dele.drop_random.cpu().tolist()
                # faithfulness of the certified map with the project's deletion metric: pixels deleted in the order
                # certified important > abstain > certified not important (ties in a per-image seeded order)
                cmap = torch.where(res.labels == 1, 1.0, torch.where(res.labels == -1, 0.5, 0.0)).to(dev)
                dauc = (
                    deletion_auc(
                        model, xk, yk, cmap, steps=min(32, cmap[0].numel()), chunk_size=s["chunk_size"], generator=dgen
                    )
                    .cpu()
                    .tolist()
                )
                loc = certified_localization(res, mask.to(dev)).cpu().tolist() if mask is not None else None
                for j, i in enumerate(ik):
                    row: dict[str, Any] = {
                        "image": i,
                        "label": int(yk[j]),
                        "certified_rate": float(cert[j]),
                        "certified_important_rate": float(imp[j]),
                        "abstain_rate": 1.0 - float(cert[j]),
                        **{rate_key(r): float(curve[j][q]) for q, r in enumerate(radii)},
                        "common_radius": float(res.common_radius),
                        "deletion_drop_certified": float(d_cert[j]),
                        "deletion_drop_random": float(d_rand[j]),
                        "certified_map_deletion_auc": float(dauc[j]),
                    }
                    if loc is not None:
                        row["localization"] = _num(float(loc[j]))
                    rows.append(row)
                want = n_examples - len(examples["x"])
                if want > 0:
                    take = list(range(min(want, len(ik))))
                    from fragdefense.attributions.registry import resolve_attribution

                    spec = resolve_attribution(explainer.method, "method")
                    xe = xk[take]
                    eopts = dict(explainer.opts)
                    if stochastic:
                        eopts["generator"] = make_generator(
                            image_seed(seed, explainer.label, "certify", "examples"), dev
                        )
                    clean = to_map(spec(model, xe, yk[take], **eopts).detach(), s["reduce"], normalize=False)
                    for j in take:
                        examples["x"].append(xe[j].detach().cpu())
                        examples["clean_map"].append(clean[j].cpu())
                        examples["labels"].append(res.labels[j].cpu())
                        examples["radius"].append(res.radius[j].cpu())
                        examples["label"].append(torch.tensor(int(yk[j])))
                        examples["id"].append(torch.tensor(ik[j]))
            if progress is not None:
                progress(int(x.shape[0]))
    finally:
        model.train(was_training)
    ex = {k: torch.stack(v) for k, v in examples.items()} if examples["x"] else None
    return CellResult(cell, rows, aggregate_rows(rows, n_skipped), ex, False, time.perf_counter() - t0, [])


def run_certify(
    model: nn.Module,
    data: Iterable[Any],
    *,
    explainers: Any,
    settings: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    store: Any = None,
    require_correct: bool = True,
    masks: Any = None,
    n_examples: int = 0,
    progress: Callable[[Cell, int], None] | None = None,
) -> Iterator[CellResult]:
    """:func:`run_certify_cell` for each explainer with ``settings`` (keys of :data:`CERTIFY_DEFAULTS`, checked
    before any work); cells already in ``store`` (a :class:`~fragdefense.evaluation.store.CellStore` whose config
    should record the settings) are read back (no figure examples), new ones written.

    ``data`` is iterated once per explainer."""
    s = check_certify_settings(settings)
    specs = explainer_specs(explainers)
    for cell in certify_cells(specs):
        if store is not None and store.has(cell.key):
            yield store.read(cell)
            continue
        res = run_certify_cell(
            model,
            data,
            specs[cell.explainer],
            **s,
            seed=seed,
            device=device,
            require_correct=require_correct,
            masks=masks,
            n_examples=n_examples,
            progress=(lambda k, c=cell: progress(c, k)) if progress is not None else None,
        )
        if store is not None:
            store.write(res)
        yield res
