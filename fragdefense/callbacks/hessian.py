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
``fragdefense-hessian run_dir=...``). The history is part of the callback's checkpoint state, so a resumed run's
JSON holds every evaluation once (the evaluation runs at the end of the epoch's validation, before that epoch's
checkpoint is written; without validation at ``on_train_epoch_end``). An evaluation can take minutes: it logs a
line per stage and a heartbeat every ``progress_every`` seconds (logger ``fragdefense.callbacks.hessian``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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

log = logging.getLogger(__name__)


@contextmanager
def _progress(label: str, every: float | None) -> Iterator[None]:
    """Log ``label`` at the start, ``label ... <t> s`` every ``every`` seconds while the block runs (a daemon
    thread: the computation itself has no hook), and its duration at the end; ``every=None``: silent."""
    if every is None:
        yield
        return
    t0 = time.perf_counter()
    log.info("%s ...", label)
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            log.info("%s ... %.0f s", label, time.perf_counter() - t0)

    th = threading.Thread(target=beat, daemon=True, name="hessian-progress")
    th.start()
    try:
        yield
    finally:
        done.set()
        th.join()
    log.info("%s done in %.1f s", label, time.perf_counter() - t0)


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
        progress_every: seconds between the progress lines of an evaluation (a line per stage and a heartbeat;
            logger ``fragdefense.callbacks.hessian`` at INFO); ``None``: silent.

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
        progress_every: float | None = 10.0,
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
        if progress_every is not None and not (
            isinstance(progress_every, (int, float)) and not isinstance(progress_every, bool) and progress_every > 0
        ):
            raise ValueError(f"`progress_every` must be a number of seconds > 0 or None, got {progress_every!r}")
        self.progress_every = None if progress_every is None else float(progress_every)
        self._evaluated_epoch: int | None = None
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

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, label: str = "") -> dict[str, float]:
        """The summary of ``model`` on ``(x, y)`` with this monitor's settings (no prefix); ``label`` prefixes the
        progress lines (e.g. ``"epoch 3"``).

        The parameter and the input Hessian run as two stages, each with its own progress line; every stage seeds
        its own random vectors with ``seed``, so the values are those of one
        :func:`~fragdefense.hessian.summary.hessian_snapshot` call.
        """
        t0 = time.perf_counter()
        kw = dict(top_k=self.top_k, lanczos_iters=self.lanczos_iters, trace_matvecs=self.trace_matvecs)
        kw.update(input_iters=self.input_iters, beta=self.beta, tol=self.tol, seed=self.seed)
        head = f"Hessian probe{f' ({label})' if label else ''}"
        out: dict[str, float] = {}
        if self.n_param_samples:
            n = min(self.n_param_samples, len(x))
            what = f"top-{self.top_k} eigenvalue (<= {self.lanczos_iters} Lanczos iterations)"
            if self.trace_matvecs:
                what += f" and trace ({max(3, self.trace_matvecs)} Hutch++ products)"
            with _progress(f"{head}: parameter Hessian, {what} on {n} images", self.progress_every):
                out.update(hessian_snapshot(model, x, y, n_param_samples=self.n_param_samples, n_input=0, **kw))
        if self.n_input:
            n = min(self.n_input, len(x))
            label_in = f"{head}: input Hessian lambda_max of {n} images (<= {self.input_iters} Lanczos iterations)"
            with _progress(label_in, self.progress_every):
                out.update(hessian_snapshot(model, x, y, n_param_samples=0, n_input=self.n_input, **kw))
        out["seconds"] = time.perf_counter() - t0
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
        x, y = self._get_probe(trainer)
        if len(y) == 0:
            return
        net = resolve_network(pl_module, self.model, "HessianMonitor")
        p = next(iter(net.parameters()), None)
        device = p.device if p is not None else pl_module.device
        quiet = not trainer.is_global_zero
        every, self.progress_every = self.progress_every, None if quiet else self.progress_every
        try:
            with (
                preserve_training_state(pl_module, device),
                preserve_training_state(net),
                torch.inference_mode(False),  # (validation runs in inference mode)
                torch.enable_grad(),
            ):
                net.eval()
                xs, ys = x.to(device).clone(), y.to(device).clone()  # normal tensors, not inference tensors
                out = self.evaluate(net, xs, ys, label=f"epoch {epoch}")
        finally:
            self.progress_every = every
        self._evaluated_epoch = epoch
        self.history = [h for h in self.history if h["epoch"] != epoch]  # (a re-run epoch replaces its entry)
        self.history.append({"epoch": epoch, "global_step": int(trainer.global_step), **out})
        pl_module.log_dict(
            {_PREFIX + k: float(v) for k, v in out.items()},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            reduce_fx="max",
        )

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
