"""Figures (matplotlib, Agg backend): metric vs eps curves (Ghorbani et al. Fig. 3) and example grids of
original / perturbed images with their maps (Fig. 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fragdefense.utils.io import atomic_savefig

__all__ = ["plot_metrics_vs_eps", "plot_examples", "plot_defense_comparison"]


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
        ax.annotate(r["name"], (100 * acc, v), fontsize=8, xytext=(4, 4), textcoords="offset points")
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
