"""Figures of the evaluation (kept for imports; the home is :mod:`fragdefense.evaluation.figures`)."""

from fragdefense.evaluation.figures import plot_examples, plot_metrics_vs_eps

__all__ = ["plot_metrics_vs_eps", "plot_examples"]
