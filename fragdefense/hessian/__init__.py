"""Hessian-spectrum utilities (parameter and input Hessians) and probes of the geometric explanation of
fragility (Ghorbani, Abid & Zou, "Interpretation of Neural Networks is Fragile"; ``docs/background.md`` §6).

* :mod:`~fragdefense.hessian.hvp` — Hessian-vector products as batched operators: :func:`param_hessian`
  (loss over a batch or a dataloader), :func:`input_hessian` (per image, of a logit or of the loss).
* :mod:`~fragdefense.hessian.eigen` — :func:`lanczos` (full reorthogonalisation), :func:`power_iteration`
  (deflated, PyHessian's method), :func:`exact_eigen`.
* :mod:`~fragdefense.hessian.trace` — :func:`hutchinson`, :func:`hutchpp`, :func:`exact_trace`.
* :mod:`~fragdefense.hessian.density` — :func:`slq` spectral density.
* :mod:`~fragdefense.hessian.probes` — map change along top eigenvectors vs random directions, eigenvalues vs
  softplus beta, lambda_max vs measured fragility.
"""

from fragdefense.hessian.density import SpectralDensity, slq
from fragdefense.hessian.eigen import EigenResult, exact_eigen, lanczos, lanczos_tridiagonal, power_iteration
from fragdefense.hessian.hvp import HessianOperator, input_hessian, param_hessian
from fragdefense.hessian.probes import (
    eigenvalues_vs_beta,
    fragility_vs_curvature,
    input_top_eigen,
    map_change_along_directions,
)
from fragdefense.hessian.trace import TraceEstimate, exact_trace, hutchinson, hutchpp

__all__ = [
    "HessianOperator",
    "param_hessian",
    "input_hessian",
    "EigenResult",
    "lanczos",
    "lanczos_tridiagonal",
    "power_iteration",
    "exact_eigen",
    "TraceEstimate",
    "hutchinson",
    "hutchpp",
    "exact_trace",
    "SpectralDensity",
    "slq",
    "input_top_eigen",
    "map_change_along_directions",
    "eigenvalues_vs_beta",
    "fragility_vs_curvature",
]
