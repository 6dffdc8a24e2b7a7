"""Small training callbacks (timing)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L

__all__ = ["EpochTimer"]


class EpochTimer(L.Callback):
    """Wall-clock seconds of each training epoch (including validation), logged as ``time/epoch_s``."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dt = time.perf_counter() - self._t0
        self.epoch_seconds.append(dt)
        pl_module.log("time/epoch_s", dt, on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_seconds": self.epoch_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_seconds = list(state_dict.get("epoch_seconds", []))
