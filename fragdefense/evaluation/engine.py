"""The evaluation engine: attack a model's explanations over a grid, streamed batch by batch (plain torch).

A **grid** is explainers x attacks x budgets; each (explainer, attack, eps) is a **cell**. For every cell the
engine iterates the images batch by batch from any iterable of ``(x, y)`` or ``(x, y, ids)`` batches (a
``DataLoader`` in a fixed order), attacks each batch with
:func:`~fragdefense.attacks.attack_interpretation` and keeps one small record per image (no image tensors), so
memory does not grow with the number of images. Random draws are seeded **per image** from
``(seed, explainer, attack, eps, image id)`` (:func:`~fragdefense.utils.conventions.image_seed`), so a
record does not depend on the batch size, the shard or the number of processes.

:func:`run_grid` yields one :class:`CellResult` per finished cell; a :class:`~fragdefense.evaluation.store.CellStore`
makes a run resumable (finished cells are read back, not recomputed). The command ``fragdefense-eval`` and the
:class:`~fragdefense.callbacks.FragilityMonitor` both call it.

>>> import torch
>>> from fragdefense.models import create_model
>>> _ = torch.manual_seed(0)
>>> net = create_model("small_cnn", num_classes=3, width=4).eval()
>>> data = [(torch.rand(4, 3, 16, 16), torch.randint(0, 3, (4,)))]
>>> cells = list(run_grid(net, data, explainers={"saliency": {}}, attacks=["random_sign"], eps=["8/255"],
...                       protocol={"k": 20}, require_correct=False))
>>> cells[0].aggregate["n_images"], cells[0].cell.key
(4, 'saliency__random_sign__8_255')
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fragdefense.attacks import attack_interpretation, get_attack
from fragdefense.attributions import resolve_attribution
from fragdefense.utils.conventions import Budget, image_seed, make_generator

__all__ = [
    "Cell",
    "CellResult",
    "ExplainerSpec",
    "explainer_specs",
    "grid_cells",
    "iter_batches",
    "clean_accuracy",
    "run_cell",
    "run_grid",
    "aggregate_rows",
    "PROTOCOL_DEFAULTS",
]

#: the attack protocol of a grid when not given (recorded with every result)
PROTOCOL_DEFAULTS: dict[str, Any] = {
    "steps": 30,
    "step_size": None,
    "k": 100,
    "beta": 10.0,
    "restarts": 1,
    "random_start": False,
    "criterion": "auto",
    "check_every": 1,
    "lens_window": 1,
    "reduce": "abs_sum",
    "threat": "linf",
}

_SPEC_KEYS = {"method", "opts", "surrogate", "surrogate_opts"}


@dataclass(frozen=True)
class ExplainerSpec:
    """An explainer of the grid: a label, the attribution ``method`` (registered name, callable or captum object),
    its ``opts``, and an optional differentiable ``surrogate`` that gives the attack's ascent direction."""

    label: str
    method: Any
    opts: dict[str, Any] = field(default_factory=dict)
    surrogate: Any = None
    surrogate_opts: dict[str, Any] = field(default_factory=dict)

    @property
    def method_name(self) -> str:
        return resolve_attribution(self.method).name

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method_name,
            "opts": dict(self.opts),
            "surrogate": None if self.surrogate is None else resolve_attribution(self.surrogate).name,
            "surrogate_opts": dict(self.surrogate_opts),
        }


def explainer_specs(explainers: Any, *, check_gradient_attacks: Sequence[str] = ()) -> dict[str, ExplainerSpec]:
    """Normalise explainers into :class:`ExplainerSpec` by label. Accepted forms: a list of names, a mapping
    ``name -> options`` (``{"integrated_gradients": {"steps": 32}}``), or a mapping ``label -> {method, opts,
    surrogate, surrogate_opts}``; values may also be callables or captum objects.

    ``check_gradient_attacks``: gradient attacks that will run; an explainer without a differentiable path (and
    no ``surrogate``) is refused up front.

    >>> specs = explainer_specs({"sal": {"method": "saliency"}, "integrated_gradients": {"steps": 8}})
    >>> specs["sal"].method, specs["integrated_gradients"].opts
    ('saliency', {'steps': 8})
    """
    if isinstance(explainers, str):
        explainers = [explainers]
    if isinstance(explainers, Sequence):
        explainers = {str(m) if isinstance(m, str) else resolve_attribution(m).name: m for m in explainers}
        explainers = {k: ({} if isinstance(v, str) else {"method": v}) for k, v in explainers.items()}
    if not isinstance(explainers, Mapping) or not explainers:
        raise ValueError(
            "`explainers` must be a non-empty list of method names or a mapping label -> options / "
            "{method, opts, surrogate, surrogate_opts}"
        )
    out: dict[str, ExplainerSpec] = {}
    for label, spec in explainers.items():
        if isinstance(spec, ExplainerSpec):
            spec = {
                "method": spec.method,
                "opts": spec.opts,
                "surrogate": spec.surrogate,
                "surrogate_opts": spec.surrogate_opts,
            }
        spec = dict(spec or {}) if isinstance(spec, Mapping) else {"method": spec}
        if set(spec) & _SPEC_KEYS and not set(spec) <= _SPEC_KEYS:
            bad = sorted(set(spec) - _SPEC_KEYS)
            raise ValueError(
                f"explainer {label!r}: unknown key(s) {bad}; use {sorted(_SPEC_KEYS)} and put method options "
                "under `opts`"
            )
        if not set(spec) & _SPEC_KEYS:  # plain form: name -> method options
            spec = {"method": label, "opts": spec}
        method = spec.get("method", label)
        resolve_attribution(method, "method")
        sur = spec.get("surrogate")
        if sur is not None and not resolve_attribution(sur, "surrogate").create_graph:
            raise ValueError(f"explainer {label!r}: `surrogate`={sur!r} must support create_graph")
        es = ExplainerSpec(
            str(label), method, dict(spec.get("opts") or {}), sur, dict(spec.get("surrogate_opts") or {})
        )
        for a in check_gradient_attacks:
            if get_attack(a).needs_gradient and sur is None and not resolve_attribution(method).create_graph:
                raise ValueError(
                    f"explainer {label!r} ({es.method_name}) has no differentiable path for gradient attack {a!r}: "
                    "set `surrogate` (e.g. saliency) or use random attacks only"
                )
        out[str(label)] = es
    return out


@dataclass(frozen=True)
class Cell:
    """One (explainer, attack, eps) of the grid (``kind="attack"``). The same record names the other evaluations
    of a run: the explanation scores of an explainer's clean maps (``kind="quality"``, ``attack`` empty, eps 0)
    and the robust accuracy under a label attack (``kind="robust"``, ``explainer`` empty), and the certified
    attributions of an explainer (``kind="certify"``, ``attack`` empty, eps 0)."""

    explainer: str
    attack: str
    eps: Budget
    kind: str = "attack"

    @property
    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``saliency__topk__8_255``, ``saliency__quality``,
        ``robust__autoattack__8_255``, ``saliency__certify``."""
        if self.kind == "quality":
            raw = f"{self.explainer}__quality"
        elif self.kind == "certify":
            raw = f"{self.explainer}__certify"
        elif self.kind == "robust":
            raw = f"robust__{self.attack}__{self.eps}"
        else:
            raw = f"{self.explainer}__{self.attack}__{self.eps}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


def grid_cells(explainers: Iterable[str], attacks: Iterable[str], eps: Iterable[Any]) -> list[Cell]:
    """Every (explainer, attack, eps) in order; budgets are parsed (``"8/255"`` or numbers).

    >>> [c.key for c in grid_cells(["saliency"], ["topk"], ["4/255", 0.5])]
    ['saliency__topk__4_255', 'saliency__topk__0.5']
    """
    budgets = [Budget(e, "eps") for e in eps]
    if not budgets:
        raise ValueError("`eps` is empty; give at least one budget such as '8/255'")
    attacks = list(attacks)
    for a in attacks:
        get_attack(a)
    return [Cell(m, a, e) for m in explainers for a in attacks for e in budgets]


def iter_batches(data: Iterable[Any], id_offset: int = 0) -> Iterator[tuple[Tensor, Tensor, list[int]]]:
    """``(x, y, ids)`` from batches of ``(x, y)`` (ids: running positions from ``id_offset``), ``(x, y, ids)``
    or dicts with ``x``/``y`` (and ``indices``/``ids``). Checks each batch's form."""
    pos = id_offset
    for i, batch in enumerate(data):
        if isinstance(batch, Mapping):
            x, y = batch["x"], batch["y"]
            ids = batch.get("ids", batch.get("indices"))
        elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
            x, y = batch[0], batch[1]
            ids = batch[2] if len(batch) == 3 else None
        else:
            raise TypeError(f"batch {i} of `data` must be (x, y), (x, y, ids) or a dict with x, y; got {type(batch)}")
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"batch {i}: images must be a tensor (B, C, H, W), got {getattr(x, 'shape', type(x))}")
        y = torch.as_tensor(y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"batch {i}: labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        ids = list(range(pos, pos + x.shape[0])) if ids is None else [int(v) for v in torch.as_tensor(ids).tolist()]
        pos += x.shape[0]
        yield x, y.long(), ids


def clean_accuracy(model: nn.Module, data: Iterable[Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """Streamed clean pass: ``{"n": images, "correct": count, "accuracy": share or None, "num_classes": K}``."""
    dev = torch.device(device) if device is not None else _device_of(model)
    n = correct = 0
    k = None
    with torch.no_grad():
        for x, y, _ in iter_batches(data):
            logits = model(x.to(dev))
            k = int(logits.shape[1])
            correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
            n += int(x.shape[0])
    return {"n": n, "correct": correct, "accuracy": (correct / n) if n else None, "num_classes": k}


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class CellResult:
    """A finished cell: its per-image ``rows``, the ``aggregate`` over them, figure ``examples`` (first images,
    tensors on the CPU; empty when read back from a store) and whether it was ``resumed`` from a store."""

    cell: Cell
    rows: list[dict[str, Any]]
    aggregate: dict[str, Any]
    examples: dict[str, Tensor] | None = None
    resumed: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


_NON_METRIC = {"image", "label", "label_kept", "perturbed", "best_iter", "zero_gradient"}


def aggregate_rows(rows: Sequence[dict[str, Any]], n_skipped: int = 0) -> dict[str, Any]:
    """Means over the attacked images of every metric, plus counts and rates. No attacked image: ``n_images`` 0 and
    every rate and metric ``None`` (never a made-up perfect score).

    >>> aggregate_rows([{"image": 0, "label_kept": True, "perturbed": True, "spearman": 0.5},
    ...                 {"image": 1, "label_kept": True, "perturbed": False, "spearman": 1.0}])["spearman"]
    0.75
    >>> aggregate_rows([], n_skipped=3)["label_kept_rate"] is None
    True
    """
    n = len(rows)
    out: dict[str, Any] = {"n_images": n, "n_skipped": int(n_skipped)}
    metrics = [k for k in (rows[0] if rows else {}) if k not in _NON_METRIC]
    for flag, name in (
        ("label_kept", "label_kept_rate"),
        ("perturbed", "perturbed_rate"),
        ("zero_gradient", "zero_gradient_rate"),
    ):
        vals = [r[flag] for r in rows if flag in r]
        out[name] = (sum(bool(v) for v in vals) / len(vals)) if vals else None
    for m in metrics:
        vals = [float(r[m]) for r in rows if r.get(m) is not None and math.isfinite(float(r[m]))]
        out[m] = (math.fsum(vals) / len(vals)) if vals else None
    return out


def run_cell(
    model: nn.Module,
    data: Iterable[Any],
    cell: Cell,
    explainer: ExplainerSpec,
    *,
    protocol: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    n_examples: int = 0,
    require_correct: bool = True,
    progress: Callable[[int], None] | None = None,
    on_batch: Callable[[Any, Tensor, list[int]], None] | None = None,
) -> CellResult:
    """Attack every image of ``data`` for one cell; returns its per-image rows and aggregate.

    Args:
        model: classifier, images in ``[0, 1]`` -> logits (run in eval mode, restored afterwards).
        data: iterable of ``(x, y)`` / ``(x, y, ids)`` batches (re-iterated per cell: a DataLoader is fine).
        protocol: attack options (:data:`PROTOCOL_DEFAULTS` for the missing ones).
        seed: the grid's seed; per-image generators come from ``(seed, explainer, attack, eps, id)``.
        n_examples: keep the first images (clean, attacked, maps) for figures.
        require_correct: skip (and count) images the model misclassifies.
        progress: called with the number of images of each finished batch.
        on_batch: called as ``on_batch(result, x, ids)`` after each batch (the
            :class:`~fragdefense.attacks.InterpretationAttackResult` of the batch, its images and ids), e.g. to write
            the attacked images of the batch to disk; nothing is kept in memory for it.
    """
    proto = {**PROTOCOL_DEFAULTS, **dict(protocol or {})}
    dev = torch.device(device) if device is not None else _device_of(model)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    n_skipped = 0
    examples: dict[str, list[Tensor]] = {"x": [], "x_adv": [], "clean_map": [], "adv_map": [], "label": [], "id": []}
    notes: list[str] = []
    kw = {k: v for k, v in proto.items() if v is not None or k == "step_size"}
    for x, y, ids in iter_batches(data):
        xb, yb = x.to(dev), y.to(dev)
        gens = [image_seed(seed, cell.explainer, cell.attack, str(cell.eps), i) for i in ids]
        res = attack_interpretation(
            model,
            xb,
            yb if require_correct else None,
            attack=cell.attack,
            method=explainer.method,
            method_opts=explainer.opts,
            surrogate=explainer.surrogate,
            surrogate_opts=explainer.surrogate_opts or None,
            eps=float(cell.eps),
            generator=make_generator(gens, dev),
            **kw,
        )
        n_skipped += res.n_skipped
        for w in res.warnings:
            if w not in notes:
                notes.append(w)
        for r in res.records():
            j = r.pop("index")
            r = {"image": ids[j], **r}
            rows.append(r)
        if n_examples and len(examples["x"]) < n_examples and res.n_attacked:
            for j in range(res.n_attacked):
                if len(examples["x"]) >= n_examples:
                    break
                i = int(res.index[j])
                examples["x"].append(x[i].cpu())
                examples["x_adv"].append(res.x_adv[i].detach().cpu())
                examples["clean_map"].append(res.clean_map[j].detach().cpu())
                examples["adv_map"].append(res.adv_map[j].detach().cpu())
                examples["label"].append(torch.tensor(int(res.label[j])))
                examples["id"].append(torch.tensor(ids[i]))
        if on_batch is not None:
            on_batch(res, x, ids)
        if progress is not None:
            progress(int(x.shape[0]))
    ex = {k: torch.stack(v) for k, v in examples.items()} if examples["x"] else None
    agg = aggregate_rows(rows, n_skipped)
    return CellResult(cell, rows, agg, ex, False, time.perf_counter() - t0, notes)


def run_grid(
    model: nn.Module,
    data: Iterable[Any],
    *,
    explainers: Any,
    attacks: Sequence[str],
    eps: Sequence[Any],
    protocol: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    store: Any = None,
    n_examples: int = 0,
    require_correct: bool = True,
    progress: Callable[[Cell, int], None] | None = None,
    on_batch: Callable[[Cell, Any, Tensor, list[int]], None] | None = None,
) -> Iterator[CellResult]:
    """Run every cell of explainers x attacks x eps over ``data``; yields each :class:`CellResult` as it
    finishes. With a ``store`` (:class:`~fragdefense.evaluation.store.CellStore`) a finished cell is written
    atomically at once, and cells already in the store are read back instead of recomputed.

    ``data`` is iterated once per cell (streamed: only one batch of images is in memory at a time).
    """
    specs = explainer_specs(explainers, check_gradient_attacks=attacks)
    for cell in grid_cells(specs, attacks, eps):
        if store is not None and store.has(cell.key):
            yield store.read(cell)
            continue
        res = run_cell(
            model,
            data,
            cell,
            specs[cell.explainer],
            protocol=protocol,
            seed=seed,
            device=device,
            n_examples=n_examples,
            require_correct=require_correct,
            progress=(lambda n, c=cell: progress(c, n)) if progress is not None else None,
            on_batch=(lambda r, x, ids, c=cell: on_batch(c, r, x, ids)) if on_batch is not None else None,
        )
        if store is not None:
            store.write(res)
        yield res
