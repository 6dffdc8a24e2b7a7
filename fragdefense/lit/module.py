"""``ClassifierModule``: the LightningModule that trains any registered model with an optional
regularizer (defense)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from fragdefense.regularizers import Regularizer, regularized_loss

__all__ = ["ClassifierModule", "build_optimizer"]

_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(params: Any, name: str = "sgd", lr: float = 0.1, **kw: Any) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer by name (``sgd``, ``adam``, ``adamw``).

    >>> build_optimizer(nn.Linear(2, 2).parameters(), "adam", lr=1e-3).defaults["lr"]
    0.001
    """
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer `name`={name!r}; expected one of {sorted(_OPTIMIZERS)}")
    return _OPTIMIZERS[name](params, lr=lr, **kw)


def rng_states() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and python RNG states, in types ``torch.load(weights_only=True)``
    accepts (tensors, lists, tuples of ints)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ClassifierModule(L.LightningModule):
    """Cross-entropy classification with optional regularizer, per-stage accuracy, and schedulers.

    Args:
        model: an ``nn.Module`` mapping images in ``[0, 1]`` to logits (see :mod:`fragdefense.models`);
            ``None``: rebuilt from ``model_config`` (this is how ``load_from_checkpoint`` gets it).
        num_classes: number of classes (for the accuracy metrics); ``None``: ``model.num_classes``.
        optimizer: ``{"name": "sgd"|"adam"|"adamw", "lr": ..., **kwargs}``.
        scheduler: ``{"name": "onecycle"|"cosine"|"step"|"none", ...}``; ``onecycle`` and ``cosine`` are
            stepped per batch (``warmup_epochs`` for cosine), ``step`` per epoch (``step_size``, ``gamma``).
        label_smoothing: cross-entropy label smoothing.
        regularizer: a :class:`~fragdefense.regularizers.Regularizer` or ``None``.
        model_config: how to rebuild ``model``, stored in the checkpoint's hyper-parameters (the model itself is
            not) so that :func:`fragdefense.models.load_checkpoint_model` and ``ClassifierModule.load_from_checkpoint
            (path)`` rebuild it from the file alone: ``create_model`` arguments (``{"name": ..., **kw}``) or
            ``{"instantiate": <Hydra config with _target_>}`` for any ``nn.Module``
            (:func:`fragdefense.models.model_from_config`).

    The regularizer is not stored: a module loaded with ``load_from_checkpoint`` has none unless given
    (``load_from_checkpoint(path, regularizer=...)``), which is what evaluation needs. Loading a checkpoint
    outside of ``Trainer.fit`` leaves the global RNGs alone (they are restored only when resuming a fit).

    Example:
        >>> m = ClassifierModule(model_config={"name": "small_cnn", "num_classes": 3, "width": 4})
        >>> m.model.name, m.num_classes
        ('small_cnn', 3)
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        num_classes: int | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        regularizer: Regularizer | None = None,
        model_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "regularizer"])
        if model is None:
            if not model_config:
                raise ValueError(
                    "ClassifierModule needs `model` (an nn.Module) or `model_config` to rebuild it from; "
                    "load_from_checkpoint(path, model=...) for a checkpoint written without model_config"
                )
            from fragdefense.models import model_from_config

            model = model_from_config(model_config)
        self.model = model
        if num_classes is None:
            num_classes = getattr(model, "num_classes", None)
            if not isinstance(num_classes, int):
                raise ValueError("ClassifierModule needs `num_classes` (the model has no int `num_classes` attribute)")
            self.hparams["num_classes"] = int(num_classes)  # stored in checkpoints
        self.num_classes = int(num_classes)
        self.optimizer_cfg = dict(optimizer or {"name": "sgd", "lr": 0.05, "momentum": 0.9})
        self.scheduler_cfg = dict(scheduler or {"name": "none"})
        self.label_smoothing = float(label_smoothing)
        self.regularizer = regularizer
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _epoch_float(self) -> float:
        nb = self.trainer.num_training_batches if self._trainer is not None else 0
        if not nb or not math.isfinite(nb):
            return float(self.current_epoch)
        return self.current_epoch + (self.trainer.fit_loop.epoch_loop.batch_progress.current.ready % nb) / nb

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        reg = self.regularizer
        epoch = self._epoch_float() if reg is not None else 0.0
        out = regularized_loss(self.model, reg, x, y, epoch, self.label_smoothing)
        logits, task, loss = out.logits, out.task, out.loss
        if reg is not None:
            if out.term is not None:
                self.log("train/reg_term", out.term.detach(), on_step=False, on_epoch=True)
            self.log("train/reg_weight", reg.current_weight(epoch), on_step=False, on_epoch=True)
            for k, v in out.logs.items():
                self.log(f"train/reg/{k}", v, on_step=False, on_epoch=True)
        self.train_acc(logits.detach(), y)
        self.log("train/task_loss", task.detach(), on_step=False, on_epoch=True)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the global RNG states (torch, numpy, python) drive shuffling and augmentation; storing them makes a
        # run resumed from an end-of-epoch checkpoint continue exactly as the uninterrupted run would
        checkpoint["fragdefense_rng_states"] = rng_states()
        if self._trainer is not None:  # the length the schedule was planned for (checked when resuming)
            checkpoint["fragdefense_schedule"] = {
                "name": self.scheduler_cfg.get("name", "none"),
                "total_steps": getattr(self, "_planned_total_steps", None),
                "max_epochs": self.trainer.max_epochs,
                "max_steps": self.trainer.max_steps,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("fragdefense_rng_states")
        if states is not None and self._trainer is not None:  # resuming a fit, not load_from_checkpoint
            set_rng_states(states)
            self._resumed_schedule = {
                "saved": checkpoint.get("fragdefense_schedule") or {},
                "states": list(checkpoint.get("lr_schedulers") or []),
            }
            self._check_resumed_schedule()

    def _check_resumed_schedule(self) -> None:
        """Refuse to resume a OneCycle schedule whose planned total length differs from this run's (its shape
        depends on the total number of steps: the restored state would run past its end and fail mid-training,
        ``Tried to step N times``). Cosine is re-stretched over the new length, step is epoch-count independent;
        runs before training, as soon as both lengths are known."""
        resumed = getattr(self, "_resumed_schedule", None)
        new_total = getattr(self, "_planned_total_steps", None)
        if resumed is None or new_total is None or self.scheduler_cfg.get("name") != "onecycle":
            return
        old_total = next((st.get("total_steps") for st in resumed["states"] if "total_steps" in st), None)
        if old_total is None or int(old_total) == int(new_total):
            return
        saved = resumed["saved"]
        was = f" (trainer.max_epochs={saved['max_epochs']})" if saved.get("max_epochs") is not None else ""
        raise ValueError(
            f"cannot resume: the checkpoint's OneCycle learning-rate schedule (`module.scheduler.name`='onecycle') "
            f"was planned for {old_total} optimizer steps{was}, this run needs {new_total} "
            f"(`trainer.max_epochs`={self.trainer.max_epochs}). OneCycle's shape depends on the total length, so it "
            "cannot be extended or shortened: resume with the original trainer.max_epochs (and the same data and "
            "batch size), start a new run_dir, or train with an epoch-count-independent schedule "
            "(module.scheduler.name=step, or cosine, which is re-stretched over the new length)"
        )

    def configure_optimizers(self) -> Any:
        cfg = dict(self.optimizer_cfg)
        opt = build_optimizer(self.parameters(), **cfg)
        sch = dict(self.scheduler_cfg)
        name = sch.pop("name", "none")
        if name in (None, "none"):
            return opt
        if name == "onecycle":
            total = int(self.trainer.estimated_stepping_batches)
            self._planned_total_steps = total
            self._check_resumed_schedule()  # before Lightning restores the old state into this schedule
            s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total, **sch)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}
        if name == "cosine":
            total = int(self.trainer.estimated_stepping_batches)
            warm = int(float(sch.pop("warmup_epochs", 0.0)) * total / max(1, self.trainer.max_epochs or 1))
            if sch:
                raise ValueError(f"unknown cosine scheduler options {sorted(sch)}; expected warmup_epochs")

            def f(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

            s = torch.optim.lr_scheduler.LambdaLR(opt, f)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}
        if name == "step":
            s = torch.optim.lr_scheduler.StepLR(opt, **sch)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "epoch"}}
        raise ValueError(f"unknown scheduler `name`={name!r}; expected onecycle, cosine, step or none")
