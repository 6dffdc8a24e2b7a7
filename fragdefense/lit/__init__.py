"""Lightning layer: the training module, loggers and callbacks."""

from fragdefense.lit.callbacks import EpochTimer
from fragdefense.lit.loggers import make_loggers, resolve_wandb_mode
from fragdefense.lit.module import ClassifierModule, build_optimizer

__all__ = ["ClassifierModule", "EpochTimer", "build_optimizer", "make_loggers", "resolve_wandb_mode"]
