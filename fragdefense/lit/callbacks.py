"""Small training callbacks (timing)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L

__all__ = ["EpochTimer"]


class EpochTimer(L.Callback):
    """Wall-clock seconds of each training epoch (including validation), logged as ``time/epoch_s``.

    The time is taken at the end of the epoch's validation when there is one (before that epoch's checkpoint is
    written, so a resumed run keeps every epoch's time), else at the end of the training epoch.

    >>> EpochTimer().state_dict()
    {'epoch_seconds': []}
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._t0 = 0.0
        self._timed_epoch: int | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or str(getattr(trainer.state.fn, "value", trainer.state.fn)) != "fit":
            return
        if getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", True):
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)  # epochs without (end-of-epoch) validation

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._timed_epoch == trainer.current_epoch:
            return
        self._timed_epoch = trainer.current_epoch
        dt = time.perf_counter() - self._t0
        self.epoch_seconds.append(dt)
        pl_module.log("time/epoch_s", dt, on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_seconds": self.epoch_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_seconds = list(state_dict.get("epoch_seconds", []))
