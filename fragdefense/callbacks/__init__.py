"""Lightning callbacks that monitor explanations while a model trains.

* :class:`FragilityMonitor` — attacks on interpretations on the datamodule's fixed probe set every N epochs
  and at the end of fit; logs ``fragility/<method>/<attack>/<metric>`` (CSV, W&B), W&B example images and a
  per-image table, and a maps figure in the run directory.
* :class:`InfluenceMonitor` — influence functions of probe images on a training subset every N epochs: their
  most influential training images (W&B panels / PNGs) and the influence attack's fragility figures.
* :class:`HessianMonitor` — parameter-Hessian top eigenvalue and trace, input-Hessian lambda_max on the probe set.
* :class:`CertifiedMonitor` — share of certified pixels of the probe images' attribution maps (randomized smoothing)
  and its curve over L2 radii; logs ``certify/certified_rate``, ``certify/rate_at_<r>``.

Each takes any LightningDataModule or dataloader: the probe is the datamodule's ``probe_batch()`` when it has one,
else the first images of its validation (else test, else train) loader, or an explicit ``probe=`` (an ``(x, y)``
pair or a DataLoader); images in ``[0, 1]``. The network is ``pl_module.model`` (else the LightningModule), or
``model=`` (an attribute path or a callable ``pl_module -> nn.Module``).
"""

from fragdefense.callbacks.certified import CertifiedMonitor
from fragdefense.callbacks.fragility import (
    MONITOR_ATTACKS,
    MONITOR_METRICS,
    FragilityMonitor,
    FragilityReport,
    parse_eps,
    preserve_training_state,
)
from fragdefense.callbacks.hessian import HessianMonitor, hessian_snapshot
from fragdefense.callbacks.influence import InfluenceMonitor

__all__ = [
    "CertifiedMonitor",
    "MONITOR_ATTACKS",
    "MONITOR_METRICS",
    "FragilityMonitor",
    "FragilityReport",
    "InfluenceMonitor",
    "HessianMonitor",
    "hessian_snapshot",
    "parse_eps",
    "preserve_training_state",
]
