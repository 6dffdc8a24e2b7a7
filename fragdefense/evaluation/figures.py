"""Figures (matplotlib, Agg backend): metric vs eps curves (Ghorbani et al. Fig. 3) and example grids of
original / perturbed images with their maps (Fig. 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fragdefense.utils.io import atomic_savefig

__all__ = [
    "plot_metrics_vs_eps",
    "plot_examples",
    "plot_defense_comparison",
    "plot_robustness_vs_cost",
    "plot_certified_maps",
]


def _default_metrics() -> tuple[str, ...]:
    from fragdefense.metrics.registry import list_metrics

    return tuple(list_metrics(report=True, opts={"k": 1, "window": 1}))


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics_vs_eps(records: list[dict[str, Any]], path: str | Path, metrics: Sequence[str] | None = None) -> Path:
    """One panel per metric; one line per (method, attack); x axis eps in /255 units. When no record has a
    metric value (no image was attacked: every selected image misclassified), one panel saying so."""
    from fragdefense.metrics.registry import metric_label

    plt = _plt()
    metrics = [
        m
        for m in (metrics if metrics is not None else _default_metrics())
        if any(r.get(m) is not None for r in records)
    ]
    if not metrics:
        fig, ax = plt.subplots(1, 1, figsize=(4.2, 3.6))
        ax.text(0.5, 0.5, "no attacked images\n(every selected image misclassified)", ha="center", va="center")
        ax.set_axis_off()
        path = Path(path)
        atomic_savefig(fig, path, dpi=120)
        plt.close(fig)
        return path
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    keys = sorted({(r["method"], r["attack"]) for r in records})
    styles = {"random_sign": ":", "random_walk": "-.", "topk": "-", "mass_center": "--"}
    for ax, metric in zip(axes[0], metrics):
        for method, attack in keys:
            rs = sorted(
                (r for r in records if r["method"] == method and r["attack"] == attack), key=lambda r: r["epsilon"]
            )
            xs = [r["epsilon_255"] for r in rs if r.get(metric) is not None]
            ys = [r[metric] for r in rs if r.get(metric) is not None]
            ax.plot(xs, ys, styles.get(attack, "-"), marker="o", label=f"{method} / {attack}")
        ax.set_xlabel("eps (/255)")
        ax.set_title(metric_label(metric))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_examples(ex: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Rows = images; columns = original, its map, perturbed, its map."""
    plt = _plt()
    n = ex["x"].shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
    cols = [
        ("original", ex["x"], False),
        ("map", ex["clean_map"], True),
        ("perturbed", ex["x_adv"], False),
        ("map (perturbed)", ex["adv_map"], True),
    ]
    for i in range(n):
        for j, (name, t, is_map) in enumerate(cols):
            ax = axes[i][j]
            if is_map:
                ax.imshow(t[i].float().numpy(), cmap="hot")
            else:
                ax.imshow(t[i].permute(1, 2, 0).clamp(0, 1).float().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_defense_comparison(
    rows: list[dict[str, Any]], path: str | Path, metric: str = "topk_intersection", attack: str | None = None
) -> Path:
    """Accuracy vs robustness per defense (checkpoint): x = clean accuracy, y = ``metric`` under ``attack`` at the
    largest eps (the first gradient attack when ``None``). Defenses without an attacked image are listed, not
    drawn."""
    from fragdefense.metrics.registry import metric_label

    plt = _plt()
    fig, ax = plt.subplots(1, 1, figsize=(5.2, 4.2))
    missing = []
    for r in rows:
        v = r.get("robustness", {}).get(metric)
        acc = r.get("clean_accuracy")
        if v is None or acc is None:
            missing.append(r["name"])
            continue
        ax.scatter([100 * acc], [v], s=40)
        label = r["name"] if not r.get("method") else f"{r['name']} ({r['method']})"
        ax.annotate(label, (100 * acc, v), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{metric_label(metric)} under attack")
    title = "accuracy vs explanation robustness"
    if attack:
        title += f" ({attack})"
    ax.set_title(title, fontsize=10)
    if missing:
        ax.text(0.02, 0.02, "no attacked image: " + ", ".join(missing), transform=ax.transAxes, fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


_COST_METRICS = (("topk_intersection", "top-k intersection"), ("spearman", "Spearman"), ("lens_recall", "LENS recall"))


def plot_robustness_vs_cost(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Robustness (top-k intersection, Spearman, LENS recall after the attack) against the measured seconds per
    explanation (log x axis; process CPU seconds where recorded, else wall-clock): one colour per explainer,
    one marker per (attack, eps)."""
    use_cpu = all(r.get("cpu_seconds_per_image") is not None for r in records)
    cost_key = "cpu_seconds_per_image" if use_cpu else "seconds_per_image"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    labels = list(dict.fromkeys(r["method"] for r in records))
    cells = list(dict.fromkeys((r["attack"], r["epsilon_255"]) for r in records))
    colours = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    markers = dict(zip(cells, "os^Dv<>phX*"))
    fig, axes = plt.subplots(1, len(_COST_METRICS), figsize=(4.6 * len(_COST_METRICS), 4.0), squeeze=False)
    for ax, (metric, title) in zip(axes[0], _COST_METRICS):
        for r in records:
            if r.get(metric) is None or r.get(cost_key) is None:
                continue
            ax.scatter(
                r[cost_key],
                r[metric],
                color=colours[r["method"]],
                marker=markers.get((r["attack"], r["epsilon_255"]), "o"),
                s=40,
                alpha=0.85,
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"{'CPU' if use_cpu else 'wall-clock'} seconds per explanation (measured)")
        ax.set_title(title + " after attack")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours[lab], marker="o", ls="", label=lab) for lab in labels]
    handles += [
        Line2D([], [], color="grey", marker=markers[c], ls="", label=f"{c[0]} eps={c[1]:.3g}/255") for c in cells
    ]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


_CERT_COLOURS = (("abstain", "#9e9e9e"), ("not important", "#1f3b73"), ("important", "#f2b90c"))


def plot_certified_maps(
    examples: dict[str, torch.Tensor],
    radii: Sequence[float],
    path: str | Path,
    title: str = "",
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Certified attribution maps (Anani, Lorenz, Fritz & Schiele, "Pixel-level Certified Explanations via Randomized
    Smoothing", Fig. 1): per image a row original | attribution map | certified map at each radius of ``radii``
    (usually two). At radius ``r`` a pixel shows its certified label (important / not important) when it is certified
    with radius ``>= r``, else abstain. ``examples``: ``x`` (N, C, H, W), ``clean_map`` (N, H, W), ``labels``
    (N, H, W; 1 / 0 / -1 abstain) and ``radius`` (N, H, W), as kept by
    :func:`~fragdefense.evaluation.certified.run_certify_cell` with ``n_examples``; ``row_labels`` (e.g. the method
    of each row) are put in the first column's titles.

    >>> import tempfile, pathlib
    >>> ex = {"x": torch.rand(2, 3, 4, 4), "clean_map": torch.rand(2, 4, 4),
    ...       "labels": torch.randint(-1, 2, (2, 4, 4)), "radius": torch.rand(2, 4, 4) * 0.2}
    >>> plot_certified_maps(ex, [0.0, 0.1], pathlib.Path(tempfile.mkdtemp()) / "c.png").is_file()
    True
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _plt()
    radii = [float(r) for r in radii]
    n = int(examples["x"].shape[0])
    cols = 2 + len(radii)
    fig, axes = plt.subplots(max(1, n), cols, figsize=(2.1 * cols, 2.1 * max(1, n) + 0.5), squeeze=False)
    cmap = ListedColormap([c for _, c in _CERT_COLOURS])
    for i in range(n):
        labels = examples["labels"][i].to(torch.int64)
        radius = examples["radius"][i].to(torch.float64)
        panels: list[tuple[str, Any, dict[str, Any]]] = [
            (
                "image" if row_labels is None else f"image ({row_labels[i]})",
                examples["x"][i].permute(1, 2, 0).clamp(0, 1).float().numpy(),
                {},
            ),
            ("map", examples["clean_map"][i].float().numpy(), {"cmap": "hot"}),
        ]
        for r in radii:
            shown = torch.where((labels >= 0) & (radius >= r), labels, torch.full_like(labels, -1))
            rate = float((shown >= 0).to(torch.float64).mean())
            panels.append(
                (
                    f"certified, r={r:g}\n({100 * rate:.0f}% certified)",
                    shown.numpy(),
                    {"cmap": cmap, "vmin": -1, "vmax": 1},
                )
            )
        for j, (name, img, kw) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(img, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=8)
    handles = [Patch(facecolor=c, edgecolor="k", label=lab) for lab, c in reversed(_CERT_COLOURS)]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97 if title else 1))
    path = Path(path)
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path
