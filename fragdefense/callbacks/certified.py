"""Certified attributions while training: how many pixels of the explanations of the probe images are certified.

:class:`CertifiedMonitor` certifies, every ``every_n_epochs`` epochs at the end of the epoch's validation (without
validation: at ``on_train_epoch_end``), the attribution maps of the first ``n_images`` probe images by randomized
smoothing (Anani, Lorenz, Fritz & Schiele, "Pixel-level Certified Explanations via Randomized Smoothing") through
:func:`~fragdefense.evaluation.certified.run_certify_cell`, and logs the means over the images:

* ``certify/certified_rate``, ``certify/certified_important_rate``, ``certify/abstain_rate``;
* ``certify/rate_at_<r>`` for every radius ``r`` of ``radii``;
* ``certify/deletion_drop_certified``, ``certify/deletion_drop_random``, ``certify/seconds``;
* ``certify/localization`` when the probe has object masks (the synthetic data).

The probe comes from the datamodule's ``probe_batch()`` (else the first images of its validation loader, or
``probe=``), the network from ``pl_module.model`` (or ``model=``), as for the other monitors. The evaluation runs in
eval mode with the training state (module flags, RNGs) restored afterwards and never touches ``.grad`` or the
optimizer. The explained class is the true label (``require_correct=False`` by default: every probe image counts).
``history`` keeps one dict per evaluation and is part of the callback's checkpoint state (a resumed run continues
it); with ``history_json`` rank 0 writes it to the run directory at the end of fit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fragdefense.callbacks._probe import ImageSource, NetworkSpec, check_network_spec, find_probe, resolve_network
from fragdefense.callbacks.fragility import preserve_training_state

__all__ = ["CertifiedMonitor"]

_PREFIX = "certify/"


def _int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}, got {v!r}")
    return v


class CertifiedMonitor(L.Callback):
    """Log certified-attribution rates of the probe images every N epochs (see the module docstring).

    Args:
        every_n_epochs: evaluate after epochs ``e`` (0-based) with ``(e + 1) % every_n_epochs == 0``.
        method: attribution method (registered name); method_opts: its options.
        n_images: probe images to certify.
        sigma, n0, n, tau, alpha, top_percent, correction, radii: certification settings
            (:func:`~fragdefense.certify.certify_attribution`; ``radii`` of the ``rate_at_<r>`` values).
        seed: seed of the per-image noise (the same at every evaluation).
        require_correct: certify only the probe images the model classifies correctly at that epoch.
        history_json: file name (relative to ``trainer.default_root_dir``) of the history written at the end of fit
            (``None``: not written).
        probe, probe_seed, model: as :class:`~fragdefense.callbacks.HessianMonitor`.

    Example:
        >>> mon = CertifiedMonitor(every_n_epochs=2, n_images=4, n=50, radii=[0.0, 0.1])
        >>> mon.settings["n"], mon.settings["radii"]
        (50, [0.0, 0.1])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        method: str = "saliency",
        n_images: int = 8,
        sigma: float = 0.25,
        n0: int = 10,
        n: int = 100,
        tau: float = 0.75,
        alpha: float = 0.001,
        top_percent: float = 20.0,
        correction: str = "bonferroni",
        radii: list[float] | tuple[float, ...] = (0.0, 0.05, 0.1, 0.2),
        method_opts: dict[str, Any] | None = None,
        seed: int = 0,
        require_correct: bool = False,
        history_json: str | None = "certified_history.json",
        probe: ImageSource | None = None,
        probe_seed: int = 0,
        model: NetworkSpec = None,
    ) -> None:
        super().__init__()
        from fragdefense.evaluation.certified import check_certify_settings
        from fragdefense.evaluation.engine import explainer_specs

        self.every_n_epochs = _int(every_n_epochs, "every_n_epochs", 1)
        self.n_images = _int(n_images, "n_images", 1)
        self.settings = check_certify_settings(
            dict(sigma=sigma, n0=n0, n=n, tau=tau, alpha=alpha, top_percent=top_percent, correction=correction,
                 radii=list(radii))
        )  # fmt: skip
        self.explainer = explainer_specs({str(method): {"method": method, "opts": dict(method_opts or {})}})[
            str(method)
        ]
        self.seed = _int(seed, "seed", 0)
        self.require_correct = bool(require_correct)
        self.history_json = history_json
        self.probe = probe
        self.probe_seed = _int(probe_seed, "probe_seed", 0)
        self.model = check_network_spec(model, "CertifiedMonitor")
        self._evaluated_epoch: int | None = None
        #: one dict per evaluation: {"epoch", "global_step", "n_images", <metric>: value, "seconds"}
        self.history: list[dict[str, Any]] = []
        self.json_path: Path | None = None
        self._probe: dict[str, Any] | None = None

    def _get_probe(self, trainer: L.Trainer) -> dict[str, Any]:
        """``{"x", "y", "ids", "mask"}`` of the probe images (``mask`` ``None`` when the data has no object masks)."""
        if self._probe is None:
            b = find_probe(trainer, probe=self.probe, n=self.n_images, seed=self.probe_seed, owner="CertifiedMonitor")
            ids = [int(i) for i in b.get("indices") or range(len(b["y"]))]
            self._probe = {"x": b["x"], "y": b["y"], "ids": ids, "mask": b.get("mask")}
        return self._probe

    def evaluate(
        self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ids: list[int], mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The aggregate of :func:`~fragdefense.evaluation.certified.run_certify_cell` on ``(x, y)`` (image ids
        ``ids``; with object masks ``mask`` also ``localization``)."""
        from fragdefense.evaluation.certified import run_certify_cell

        batch = {"x": x, "y": y, "ids": ids, "mask": mask}
        res = run_certify_cell(
            net, [batch], self.explainer, **self.settings, seed=self.seed, require_correct=self.require_correct
        )
        out = {k: v for k, v in res.aggregate.items() if k != "common_radius"}
        out["seconds"] = res.seconds
        return out

    # --- Lightning hooks: evaluate at the end of the epoch's validation (before that epoch's checkpoint) ------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._get_probe(trainer)  # read outside of inference mode

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or str(getattr(trainer.state.fn, "value", trainer.state.fn)) != "fit":
            return
        if not getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", True):
            return  # a mid-epoch validation: wait for the end-of-epoch one
        self._maybe_run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_run(trainer, pl_module)  # epochs without (end-of-epoch) validation

    def _maybe_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        if (epoch + 1) % self.every_n_epochs or self._evaluated_epoch == epoch:
            return
        probe = self._get_probe(trainer)
        x, y = probe["x"], probe["y"]
        if len(y) == 0:
            return
        net = resolve_network(pl_module, self.model, "CertifiedMonitor")
        p = next(iter(net.parameters()), None)
        device = p.device if p is not None else pl_module.device
        t0 = time.perf_counter()
        with (
            preserve_training_state(pl_module, device),
            preserve_training_state(net),
            torch.inference_mode(False),  # (validation runs in inference mode)
            torch.enable_grad(),
        ):
            out = self.evaluate(net, x.to(device).clone(), y.to(device).clone(), probe["ids"], probe["mask"])
        out["seconds"] = time.perf_counter() - t0
        self._evaluated_epoch = epoch
        self.history = [h for h in self.history if h["epoch"] != epoch]  # (a re-run epoch replaces its entry)
        self.history.append({"epoch": epoch, "global_step": int(trainer.global_step), **out})
        logged = {
            _PREFIX + k: float(v)
            for k, v in out.items()
            if k not in ("n_skipped",) and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        pl_module.log_dict(logged, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="mean")

    def state_dict(self) -> dict[str, Any]:
        """The evaluation history (saved in checkpoints, so a resumed run continues it)."""
        return {"history": [dict(h) for h in self.history], "evaluated_epoch": self._evaluated_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (resuming a run)."""
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._evaluated_epoch = state_dict.get("evaluated_epoch")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history_json or not trainer.is_global_zero or not self.history:
            return
        from fragdefense.utils.io import atomic_write_json

        path = Path(self.history_json)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        self.json_path = atomic_write_json(
            path,
            {
                "settings": {
                    **self.settings,
                    "method": self.explainer.method_name,
                    "method_opts": dict(self.explainer.opts),
                    "n_images": self.n_images,
                    "seed": self.seed,
                    "require_correct": self.require_correct,
                },
                "history": self.history,
            },
        )
