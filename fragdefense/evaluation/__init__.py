"""Evaluation of explanations under attack as library functions (plain torch; no Hydra, Lightning or W&B).

* :mod:`~fragdefense.evaluation.engine` — the streamed grid engine (:func:`run_grid`, :func:`run_cell`), per-image
  seeding, aggregation.
* :mod:`~fragdefense.evaluation.store` — resumable on-disk store of finished cells (:class:`CellStore`).
* :mod:`~fragdefense.evaluation.report` — every markdown table (grid, protocol, defense comparison, ...).
* :mod:`~fragdefense.evaluation.figures` — every figure (metrics vs eps, examples, defense comparison, certified
  maps).
* :mod:`~fragdefense.evaluation.quality` — explanation scores of the clean maps and robust accuracy under label
  attacks as cells (:func:`~fragdefense.evaluation.quality.run_quality`,
  :func:`~fragdefense.evaluation.quality.run_robust_accuracy`).
* :mod:`~fragdefense.evaluation.certified` — certified attributions by randomized smoothing as cells
  (:func:`~fragdefense.evaluation.certified.run_certify`).

``fragdefense-eval``, the :class:`~fragdefense.callbacks.FragilityMonitor` and the defense comparison call these;
the command keeps only config parsing and file output, the callback only hooks and logging.
"""

from fragdefense.evaluation.engine import (
    PROTOCOL_DEFAULTS,
    Cell,
    CellResult,
    ExplainerSpec,
    aggregate_rows,
    clean_accuracy,
    explainer_specs,
    grid_cells,
    iter_batches,
    run_cell,
    run_grid,
)
from fragdefense.evaluation.store import CellStore, check_writable, config_differences

__all__ = [
    "PROTOCOL_DEFAULTS",
    "Cell",
    "CellResult",
    "CellStore",
    "ExplainerSpec",
    "aggregate_rows",
    "check_writable",
    "clean_accuracy",
    "config_differences",
    "explainer_specs",
    "grid_cells",
    "iter_batches",
    "run_cell",
    "run_grid",
]
