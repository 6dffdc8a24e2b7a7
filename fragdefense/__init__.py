"""fragdefense: train image classifiers whose explanations can be trusted.

Functional core (plain torch): :mod:`fragdefense.attributions`, :mod:`fragdefense.metrics.functional`.
Ecosystem layers: :mod:`fragdefense.models` (registry), :mod:`fragdefense.data` (LightningDataModules),
:mod:`fragdefense.lit` (LightningModule), :mod:`fragdefense.cli` (Hydra commands).
"""

__version__ = "0.1.0"
