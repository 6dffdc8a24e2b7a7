"""Hessian monitoring while training: curvature of the loss (parameters) and of the input (probe images).

:class:`HessianMonitor` evaluates, every ``every_n_epochs`` epochs at the end of the epoch, on the datamodule's
fixed probe subset of the test split (``trainer.datamodule.probe_batch()``; for any other datamodule or dataloader
the first images of its validation loader, or ``probe=``; as :class:`~fragdefense.callbacks.FragilityMonitor`):

* ``hessian/param_top_eig`` (and ``hessian/param_eig_<i>`` for ``top_k > 1``): top eigenvalues of the Hessian
  of the mean cross-entropy w.r.t. the parameters on the first ``n_param_samples`` probe images (Lanczos);
* ``hessian/param_trace`` and ``hessian/param_trace_stderr``: its trace (Hutch++);
* ``hessian/input_lambda_max_mean`` / ``_median``: per-image top (largest-magnitude) eigenvalue of the input
  Hessian of the predicted logit of the softplus(``beta``) surrogate, over the probe images;
* ``hessian/seconds``.

It runs in eval mode, restores every submodule's train/eval flag and the RNG states
(:func:`~fragdefense.callbacks.fragility.preserve_training_state`), differentiates with ``torch.autograd.grad``
only (no ``.grad`` is touched) and never sees the optimizer, so training is unchanged. ``history`` keeps one
dict per evaluation; with ``history_json`` it is also written to the run directory (plotted by
``fragdefense-hessian run_dir=...``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from fragdefense.callbacks._probe import ImageSource, NetworkSpec, check_network_spec, find_probe, resolve_network
from fragdefense.callbacks.fragility import preserve_training_state
from fragdefense.hessian.summary import hessian_snapshot

__all__ = ["HessianMonitor", "hessian_snapshot"]

_PREFIX = "hessian/"


def _int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}, got {v!r}")
    return v


class HessianMonitor(L.Callback):
    """Log Hessian-spectrum summaries every N epochs (see the module docstring).

    Args:
        every_n_epochs: evaluate after epochs ``e`` (0-based) with ``(e + 1) % every_n_epochs == 0``.
        n_param_samples: probe images of the parameter-Hessian batch (``0``: skip the parameter Hessian).
        top_k: parameter-Hessian eigenvalues to log.
        lanczos_iters, trace_matvecs: budgets of the parameter Lanczos run and of Hutch++ (``0``: no trace).
        n_input: probe images for the input-Hessian ``lambda_max`` (``0``: skip).
        input_iters: Lanczos budget per image; beta: softplus surrogate sharpness; tol: Lanczos tolerance.
        history_json: file name (relative to ``trainer.default_root_dir``) of the per-evaluation history, written
            at the end of fit by rank 0 (``None``: not written).
        seed: seed of the random start vectors (the same at every evaluation).
        probe: the probe images, instead of the datamodule's (an ``(x, y)`` pair with images in ``[0, 1]``, a
            ``DataLoader`` or an iterable of batches; the first ``max(n_param_samples, n_input)`` images). Without
            it: ``datamodule.probe_batch()``, else the first images of its ``val_dataloader()`` (else
            ``test_dataloader()``, else ``train_dataloader()``).
        probe_seed: seed of the loader's RNGs while the probe is read.
        model: the network (``None``: ``pl_module.model`` if it is an ``nn.Module``, else the LightningModule;
            an attribute path such as ``"net"``; or a callable ``pl_module -> nn.Module``).

    Example:
        >>> mon = HessianMonitor(every_n_epochs=2, n_input=16)
        >>> mon.every_n_epochs, mon.n_input
        (2, 16)
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        n_param_samples: int = 64,
        top_k: int = 1,
        lanczos_iters: int = 30,
        trace_matvecs: int = 30,
        n_input: int = 32,
        input_iters: int = 30,
        beta: float = 10.0,
        tol: float = 1e-3,
        history_json: str | None = "hessian_history.json",
        seed: int = 0,
        probe: ImageSource | None = None,
        probe_seed: int = 0,
        model: NetworkSpec = None,
    ) -> None:
        super().__init__()
        self.every_n_epochs = _int(every_n_epochs, "every_n_epochs", 1)
        self.n_param_samples = _int(n_param_samples, "n_param_samples", 0)
        self.top_k = _int(top_k, "top_k", 1)
        self.lanczos_iters = _int(lanczos_iters, "lanczos_iters", 1)
        self.trace_matvecs = _int(trace_matvecs, "trace_matvecs", 0)
        self.n_input = _int(n_input, "n_input", 0)
        self.input_iters = _int(input_iters, "input_iters", 1)
        if not float(beta) > 0:
            raise ValueError(f"`beta` must be a number > 0, got {beta!r}")
        self.beta = float(beta)
        self.tol = float(tol)
        self.history_json = history_json
        self.seed = _int(seed, "seed", 0)
        self.probe = probe
        self.probe_seed = _int(probe_seed, "probe_seed", 0)
        self.model = check_network_spec(model, "HessianMonitor")
        #: one dict per evaluation: {"epoch", "global_step", <metric>: value, "seconds"}
        self.history: list[dict[str, float]] = []
        self.json_path: Path | None = None
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None

    def _get_probe(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        if self._probe is None:
            n = max(self.n_param_samples, self.n_input, 1)
            batch = find_probe(trainer, probe=self.probe, n=n, seed=self.probe_seed, owner="HessianMonitor")
            self._probe = (batch["x"], batch["y"])
        return self._probe

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The summary of ``model`` on ``(x, y)`` with this monitor's settings (no prefix)."""
        t0 = time.perf_counter()
        out = hessian_snapshot(
            model,
            x,
            y,
            n_param_samples=self.n_param_samples,
            top_k=self.top_k,
            lanczos_iters=self.lanczos_iters,
            trace_matvecs=self.trace_matvecs,
            n_input=self.n_input,
            input_iters=self.input_iters,
            beta=self.beta,
            tol=self.tol,
            seed=self.seed,
        )
        out["seconds"] = time.perf_counter() - t0
        return out

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        if (epoch + 1) % self.every_n_epochs:
            return
        x, y = self._get_probe(trainer)
        if len(y) == 0:
            return
        net = resolve_network(pl_module, self.model, "HessianMonitor")
        p = next(iter(net.parameters()), None)
        device = p.device if p is not None else pl_module.device
        with preserve_training_state(pl_module, device), preserve_training_state(net), torch.inference_mode(False):
            net.eval()
            out = self.evaluate(net, x.to(device), y.to(device))
        self.history.append({"epoch": epoch, "global_step": int(trainer.global_step), **out})
        pl_module.log_dict(
            {_PREFIX + k: float(v) for k, v in out.items()},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            reduce_fx="max",
        )

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
                    "n_param_samples": self.n_param_samples,
                    "top_k": self.top_k,
                    "lanczos_iters": self.lanczos_iters,
                    "trace_matvecs": self.trace_matvecs,
                    "n_input": self.n_input,
                    "input_iters": self.input_iters,
                    "beta": self.beta,
                    "tol": self.tol,
                    "seed": self.seed,
                },
                "history": self.history,
            },
        )
