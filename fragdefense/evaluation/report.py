"""Markdown tables of the evaluation: the grid, its protocol, and the defense comparison (one home for every
table builder)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fragdefense.evaluation.explainers import attack_path
from fragdefense.metrics.registry import list_metrics, metric_label

__all__ = [
    "fmt",
    "grid_table",
    "protocol_block",
    "comparison_table",
    "compare_table",
    "cost_table",
    "seed_table",
    "pgd_table",
    "quality_table",
    "robust_accuracy_table",
    "certify_table",
]


def fmt(v: Any, nd: int = 3) -> str:
    """A number for a table; ``None``/NaN as ``-``.

    >>> fmt(0.12345), fmt(None), fmt(float("nan"))
    ('0.123', '-', '-')
    """
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "-" if f != f else f"{f:.{nd}f}"


def _metrics_of(records: Sequence[Mapping[str, Any]]) -> list[str]:
    reg = list_metrics(report=True, opts={"k": 1, "window": 1, "target_mask": 1, "target_map": 1})
    seen = [m for m in reg if any(m in r for r in records)]
    return seen


def grid_table(records: Sequence[Mapping[str, Any]], clean_acc: float | None = None) -> str:
    """One row per explainer x attack x eps with the mean of every reported metric, the label-kept rate and the
    number of attacked images (``-`` where no image was attacked).

    >>> print(grid_table([{"method": "saliency", "attack": "topk", "epsilon_255": 8, "n_images": 0}]).splitlines()[2])
    | saliency | topk | 8 | 0 / 0 | - | - |
    """
    metrics = _metrics_of(records)
    head = "| method | attack | eps (/255) | perturbed / attacked | " + " | ".join(metric_label(m) for m in metrics)
    head += (" | " if metrics else "") + "label kept | zero gradient |"
    lines = [head, "|" + "---|" * (6 + len(metrics))]
    for r in records:
        vals = [fmt(r.get(m), 2 if m == "center_shift" else 3) for m in metrics]
        lines.append(
            f"| {r['method']} | {r['attack']} | {float(r['epsilon_255']):.3g} | {_perturbed_of(r)} | "
            + " | ".join(vals)
            + (" | " if vals else "")
            + f"{fmt(r.get('label_kept_rate'), 2)} | {fmt(r.get('zero_gradient_rate'), 2)} |"
        )
    if clean_acc is not None:
        lines += ["", f"Clean accuracy on the selected images: {100 * clean_acc:.1f}%."]
    empty = [r for r in records if not r.get("n_images")]
    if empty:
        lines += [
            "",
            f"{len(empty)} cell(s) attacked no image (every selected image misclassified or skipped): their metrics "
            "are not defined and shown as `-`.",
        ]
    return "\n".join(lines) + "\n"


def _perturbed_of(r: Mapping[str, Any]) -> str:
    """``n perturbed / n attacked`` of a grid record (the metrics are means over the attacked images; an image the
    attack did not move scores as unmoved)."""
    n = int(r.get("n_images") or 0)
    rate = r.get("perturbed_rate")
    return f"{round(rate * n) if rate is not None else 0} / {n}"


def protocol_block(protocol: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """The attack protocol as a markdown list (steps, step size, beta, k, criterion, restarts, ...), for beside a
    table: numbers from different protocols are not comparable.

    >>> print(protocol_block({"steps": 30, "step_size": 0.5 / 255, "k": 100}).splitlines()[0])
    **Protocol** (numbers from different protocols are not comparable):
    """
    items = dict(protocol)
    if extra:
        items.update(extra)
    lines = ["**Protocol** (numbers from different protocols are not comparable):", ""]
    for key in ("steps", "step_size", "beta", "k", "criterion", "restarts", "random_start", "check_every", "threat"):
        if key in items:
            v = items.pop(key)
            if key == "step_size":
                v = "2.5 * eps / steps (default)" if v is None else f"{float(v) * 255:.3g}/255"
            lines.append(f"- {key}: {v}")
    for key, v in items.items():
        lines.append(f"- {key}: {v}")
    return "\n".join(lines) + "\n"


def comparison_table(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("topk_intersection", "spearman")
) -> str:
    """The defense comparison: one row per checkpoint with its clean accuracy and, for each listed metric, the
    value under the comparison's attack at the largest eps (one row per defense and explainer). Rows with
    ``robust_accuracy`` (``{"pgd@8/255": 0.31, ...}``) or ``quality`` (``{"deletion_auc": 0.2, ...}``, scores
    of the clean maps) get those columns too, so a defense that gains map robustness by flattening its maps
    (worse deletion/insertion AUC and ROAD) is visible next to its top-k intersection.

    >>> print(comparison_table([{"name": "a", "clean_accuracy": 0.9, "robustness": {"topk_intersection": 0.5},
    ...                          "n_attacked": 10}]).splitlines()[2])
    | a | - | 90.0 | 10 | 0.500 | - |
    >>> head = comparison_table([{"name": "a", "clean_accuracy": 0.9, "robustness": {}, "n_attacked": 4,
    ...     "robust_accuracy": {"pgd@8/255": 0.25}, "quality": {"deletion_auc": 0.1}}]).splitlines()[0]
    >>> "robust acc pgd@8/255 (%)" in head, head.endswith("| deletion AUC ↓ |")
    (True, True)
    """
    robust = list(dict.fromkeys(k for r in rows for k in (r.get("robust_accuracy") or {})))
    quality = list(dict.fromkeys(k for r in rows for k in (r.get("quality") or {})))
    head = "| defense (checkpoint) | explainer | clean acc (%) | "
    head += "".join(f"robust acc {k} (%) | " for k in robust) + "attacked | "
    head += " | ".join([metric_label(m) for m in metrics] + [_score_label(q) for q in quality]) + " |"
    lines = [head, "|" + "---|" * (4 + len(robust) + len(metrics) + len(quality))]
    for r in rows:
        acc = r.get("clean_accuracy")
        rob = r.get("robustness", {})
        ra = r.get("robust_accuracy") or {}
        qu = r.get("quality") or {}
        cells = [fmt(rob.get(m)) for m in metrics] + [fmt(qu.get(q)) for q in quality]
        lines.append(
            f"| {r['name']} | {r.get('method') or '-'} | {fmt(None if acc is None else 100 * acc, 1)} | "
            + "".join(f"{fmt(None if ra.get(k) is None else 100 * ra[k], 1)} | " for k in robust)
            + f"{r.get('n_attacked', 0)} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _score_label(name: str) -> str:
    """An explanation score's label with its direction (↑ higher is better, ↓ lower is better)."""
    from fragdefense.metrics.registry import METRICS

    spec = METRICS.get(name)
    arrow = "" if spec is None or spec.similarity is None else (" ↑" if spec.similarity else " ↓")
    return metric_label(name) + arrow


def quality_table(records: Sequence[Mapping[str, Any]], scores: Sequence[str] | None = None) -> str:
    """Explanation scores of the clean maps, one row per explainer (``records``: ``{"method", "n_images",
    <score>: mean}``; ``scores``: the columns, by default every score key of the records). ``-``: not measured
    (no correctly classified image).

    >>> print(quality_table([{"method": "saliency", "n_images": 3, "deletion_auc": 0.25}]).splitlines()[2])
    | saliency | 3 | 0.250 |
    """
    if scores is None:
        scores = list(dict.fromkeys(k for r in records for k in r if k not in _QUALITY_META))
    lines = ["| explainer | n | " + " | ".join(_score_label(q) for q in scores) + " |"]
    lines.append("|" + "---|" * (2 + len(scores)))
    for r in records:
        lines.append(f"| {r['method']} | {r.get('n_images', 0)} | " + " | ".join(fmt(r.get(q)) for q in scores) + " |")
    return "\n".join(lines) + "\n"


_QUALITY_META = {
    "method",
    "n_images",
    "n_skipped",
    "label_kept_rate",
    "perturbed_rate",
    "zero_gradient_rate",
    "seconds",
    "score_opts",
}


def robust_accuracy_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Clean and robust accuracy per label attack and budget (``-`` where an attack failed on some image: not
    measured).

    >>> print(robust_accuracy_table([{"attack": "pgd", "epsilon_255": 8, "n_images": 4, "clean_accuracy": 0.75,
    ...                               "robust_accuracy": 0.25, "n_failed": 0}]).splitlines()[2])
    | pgd | 8 | 4 | 75.0 | 25.0 | 0 |
    """
    lines = [
        "| label attack | eps (/255) | n | clean acc (%) | robust acc (%) | not measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        ca, ra = r.get("clean_accuracy"), r.get("robust_accuracy")
        lines.append(
            f"| {r['attack']} | {float(r['epsilon_255']):.3g} | {r.get('n_images', 0)} | "
            f"{fmt(None if ca is None else 100 * ca, 1)} | {fmt(None if ra is None else 100 * ra, 1)} | "
            f"{r.get('n_failed', 0)} |"
        )
    return "\n".join(lines) + "\n"


def _f(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def compare_table(records: list[dict[str, Any]], clean_acc: float | None = None) -> str:
    """Markdown table of the comparison (one row per explainer x attack x eps), with cost and attack path."""
    head = (
        "| explainer | attack | eps (/255) | top-k ∩ | Spearman | Kendall | center shift (px) | LENS recall "
        "| label kept | n | s / explanation (wall) | CPU s / explanation | attack gradient |"
    )
    lines = [head, "|" + "---|" * 13]

    def g(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}"

    for r in records:
        lines.append(
            f"| {r['method']} | {r['attack']} | {r['epsilon_255']:.3g} | {_f(r.get('topk_intersection'))} | "
            f"{_f(r.get('spearman'))} | {_f(r.get('kendall'))} | {_f(r.get('center_shift'), 2)} | "
            f"{_f(r.get('lens_recall'))} | {_f(r.get('label_kept_rate'), 2)} | {r['n_images']} | "
            f"{g(r.get('seconds_per_image'))} | {g(r.get('cpu_seconds_per_image'))} | {r.get('attack_path', '-')} |"
        )
    if clean_acc is not None:
        lines += ["", f"Clean accuracy on the selected images: {100 * clean_acc:.1f}%."]
    return "\n".join(lines) + "\n"


def cost_table(explainers: dict[str, dict[str, Any]], beta: Any = None) -> str:
    """Markdown table of the explainers: method, options, attack gradient path and measured cost."""

    def g(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}"

    lines = [
        "| explainer | method | options | attack gradient | s / explanation (wall) | CPU s / explanation |",
        "|" + "---|" * 6,
    ]
    for label, e in explainers.items():
        opts = ", ".join(f"{k}={v}" for k, v in e["opts"].items()) or "-"
        lines.append(
            f"| {label} | {e['method']} | {opts} | {attack_path(e, beta)} | {g(e.get('seconds_per_image'))} | "
            f"{g(e.get('cpu_seconds_per_image'))} |"
        )
    return "\n".join(lines) + "\n"


def seed_table(chk: dict[str, Any]) -> str:
    """Markdown table of the seed-to-seed overlap of the seeded explainers (their noise floor)."""
    if not chk["explainers"]:
        return ""
    lines = [
        f"Seed check: overlap of the clean map with `seed` vs `seed + 1` ({chk['n_images']} images, k={chk['k']}); "
        "attacked maps are compared with the same seed.",
        "",
        "| explainer | top-k ∩ | Spearman | LENS recall |",
        "|---|---|---|---|",
    ]
    for label, r in chk["explainers"].items():
        lines.append(f"| {label} | {_f(r['topk_intersection'])} | {_f(r['spearman'])} | {_f(r['lens_recall'])} |")
    return "\n".join(lines) + "\n"


def pgd_table(pgd: dict[str, Any]) -> str:
    """Markdown table of the PGD-evidence check."""
    p = pgd["protocol"]
    lines = [
        f"PGD evidence check (Lim, Lee & Kim's claim): L-inf PGD eps={p['eps'] * 255:.3g}/255, {p['steps']} steps of "
        f"{p['step_size'] * 255:.3g}/255, random start; {pgd['n_flipped']} of {pgd['n_correct']} correctly "
        f"classified images flipped. Overlap of the clean map M_y(x) with the map of the original class "
        f"M_y(x_adv) and, as a control, of the adversarial class M_y'(x_adv); top-k with k={p['k']}, "
        f"rate = fraction with top-k ∩ >= {p['threshold']}.",
        "",
        "| explainer | orig class: top-k ∩ | Spearman | LENS recall | rate | adv class: top-k ∩ | Spearman "
        "| LENS recall | rate |",
        "|" + "---|" * 9,
    ]
    for label, r in pgd["explainers"].items():
        lines.append(
            f"| {label} | {_f(r['orig_class_topk_intersection'])} | {_f(r['orig_class_spearman'])} | "
            f"{_f(r['orig_class_lens_recall'])} | {_f(r['orig_class_rate_topk_ge_threshold'], 2)} | "
            f"{_f(r['adv_class_topk_intersection'])} | {_f(r['adv_class_spearman'])} | "
            f"{_f(r['adv_class_lens_recall'])} | {_f(r['adv_class_rate_topk_ge_threshold'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def certify_table(records: Sequence[Mapping[str, Any]], radii: Sequence[float]) -> str:
    """Certified attributions per explainer: images, the certified-pixel rate at each radius, and the certified
    deletion drop against random deletion of as many pixels (``-``: not measured).

    >>> print(certify_table([{"method": "saliency", "n_images": 2, "rate_at_0": 0.5, "rate_at_0.1": 0.25,
    ...     "deletion_drop_certified": 0.3, "deletion_drop_random": 0.1}], [0.0, 0.1]).splitlines()[2])
    | saliency | 2 | 0.500 | 0.250 | 0.300 | 0.100 | - |
    """
    from fragdefense.evaluation.certified import rate_key

    head = "| explainer | n | " + " | ".join(f"certified r >= {r:g}" for r in radii)
    head += " | deletion drop, certified important | deletion drop, random | certified-map deletion AUC ↓ |"
    lines = [head, "|" + "---|" * (5 + len(radii))]
    for r in records:
        vals = [fmt(r.get(rate_key(float(q)))) for q in radii]
        lines.append(
            f"| {r['method']} | {r.get('n_images', 0)} | "
            + " | ".join(vals)
            + f" | {fmt(r.get('deletion_drop_certified'))} | {fmt(r.get('deletion_drop_random'))}"
            + f" | {fmt(r.get('certified_map_deletion_auc'))} |"
        )
    return "\n".join(lines) + "\n"
