"""Fragility monitoring while training: attacks on interpretations on a fixed probe set, every N epochs.

:class:`FragilityMonitor` runs, on a fixed probe set (the datamodule's ``probe_batch()`` subset of the test split;
for any other datamodule or dataloader the first ``n_probe`` images of its validation loader, or ``probe=``), every
configured attribution method against every configured attack, each (method, attack) one cell of the evaluation
engine (:func:`fragdefense.evaluation.run_cell`, the engine of ``fragdefense-eval``), and logs, per epoch,

* ``fragility/probe_acc``: clean accuracy on the probe images;
* ``fragility/<method>/<attack>/<metric>`` for ``topk_intersection``, ``spearman``, ``kendall``,
  ``center_shift``, ``lens_recall`` (clean map vs attacked map of the original network), ``label_kept_rate``
  and ``perturbed_rate`` (share of attacked images for which a label-preserving perturbation was found);
* on data with ground-truth object masks (the synthetic data): ``fragility/<method>/mask_mass_clean`` and
  ``fragility/<method>/<attack>/mask_mass_attacked`` (share of the map's mass on the object);
* ``fragility/seconds`` (wall time of the evaluation, the slowest process under DDP).

Only images the model classifies correctly are attacked (the protocol of Ghorbani et al.); the similarity
metrics are means over those images. A (method, attack) without an attacked image (every probe image
misclassified) logs NaN for its metrics, and :meth:`FragilityMonitor.summary` says so instead of giving numbers; it
also flags cells where no image was perturbed or the ascent gradient was zero (their similarities are not
evidence of robustness).

Design notes:

* **When.** The evaluation runs in ``on_validation_epoch_end`` of the end-of-epoch validation, so its metrics
  are in ``trainer.callback_metrics`` before ``ModelCheckpoint`` / ``EarlyStopping`` read them (a checkpoint
  can be selected on ``fragility/saliency/topk/spearman``), and ``trainer.validate`` evaluates a fixed
  checkpoint. Epochs without validation (``check_val_every_n_epoch > 1``, ``limit_val_batches=0``) fall back
  to ``on_train_epoch_end``. The end-of-fit evaluation (``on_fit_end=True``) runs in ``on_train_end``: the
  last hook of ``fit`` before Lightning's teardown moves the model to the CPU and finalises the loggers. It
  reuses the last epoch's evaluation when no training step happened since.
* **No side effects on training.** The evaluation runs in eval mode and restores every submodule's own
  train/eval flag; the CPU and CUDA RNG states, python ``random`` and numpy are saved and restored (the
  training sampler draws its shuffling seed from the global torch RNG, so this keeps the data order);
  attacks differentiate with ``torch.autograd.grad`` w.r.t. the input only, so no parameter ``.grad`` changes;
  BatchNorm statistics are untouched in eval mode; the optimizer is never seen. A test checks bitwise-equal
  weights and losses with the monitor on and off.
* **Deterministic and shard-invariant.** Every attack runs in batches of ``batch_size``; each image draws its
  random numbers (``random_sign``, ``random_walk``, ``random_start=True``) from its own generator seeded from
  ``(seed, method, attack, eps, test index)`` (:func:`fragdefense.utils.conventions.image_seed`, the seeds of
  ``fragdefense-eval``), so every image gets the same perturbation at every epoch, whatever the batch size,
  ``n_probe`` or number of processes.
* **Multi-device.** Under DDP rank ``r`` of ``W`` takes probe positions ``r::W``; the per-image records (and the
  clean-accuracy counts) are gathered to every rank and the means computed from them in float64
  (:func:`fragdefense.evaluation.aggregate_rows`), so every rank logs the same values; images, tables and the
  PNG are written by rank 0 only.
* **W&B.** With a ``WandbLogger`` the scalars are defined (``define_metric``) against ``epoch``; example strips
  (original, perturbed, clean map, attacked map) are logged every ``log_images_every_n_epochs`` epochs as
  ``fragility/<method>/<attack>/examples``; at the end of fit a ``wandb.Table`` of per-image results
  (``fragility/per_image``) and the maps figure (``fragility/maps``).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from fragdefense.attacks import get_attack, list_attacks
from fragdefense.attributions import get_attribution, supports_create_graph
from fragdefense.callbacks._probe import (
    ImageSource,
    NetworkSpec,
    check_images,
    check_network_spec,
    find_probe,
    images_from,
    resolve_network,
)
from fragdefense.evaluation.engine import Cell, ExplainerSpec, aggregate_rows, clean_accuracy, run_cell
from fragdefense.evaluation.quality import run_quality_cell
from fragdefense.metrics import functional as MF
from fragdefense.metrics.registry import list_metrics
from fragdefense.utils.checks import check_bool, check_finite_float, parse_eps
from fragdefense.utils.conventions import Budget

__all__ = [
    "FragilityMonitor",
    "FragilityReport",
    "MONITOR_ATTACKS",
    "MONITOR_METRICS",
    "monitor_attacks",
    "monitor_metrics",
    "parse_eps",
    "preserve_training_state",
]


def monitor_attacks() -> tuple[str, ...]:
    """Registered attacks the monitor can run: every attack of :func:`fragdefense.attacks.list_attacks` that needs
    no per-image target (a monitor has no way to pick one).

    >>> monitor_attacks()[:4]
    ('topk', 'mass_center', 'random_walk', 'random_sign')
    """
    return tuple(a for a in list_attacks() if not get_attack(a).requires)


def monitor_metrics(k: int = 100, lens_window: int = 1) -> tuple[str, ...]:
    """Per-(method, attack) metrics in logging order: the reported metrics of the metric registry that apply
    (:func:`fragdefense.metrics.registry.list_metrics`), then ``label_kept_rate``, ``perturbed_rate``
    (``mask_mass_attacked`` is added on data with masks).

    >>> monitor_metrics()
    ('topk_intersection', 'spearman', 'kendall', 'center_shift', 'lens_recall', 'label_kept_rate', 'perturbed_rate')
    """
    return (*list_metrics(report=True, opts={"k": k, "window": lens_window}), "label_kept_rate", "perturbed_rate")


#: the built-in monitor attacks and metrics at import time (the registries are the live source)
MONITOR_ATTACKS = monitor_attacks()
MONITOR_METRICS = monitor_metrics()
_PREFIX = "fragility/"
#: the note of a (method, attack) without an attacked image (every probe image misclassified)
NO_ATTACKED_IMAGE = "no probe image attacked (all misclassified)"
#: keys of a monitor record that are not per-image results of the engine
_RECORD_KEYS = frozenset({"method", "attack", "eps", "probe_pos", "test_index"})


def _int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}, got {v!r}")
    return v


def _plain(v: Any) -> Any:
    """OmegaConf containers -> python containers (when the monitor is built from Hydra without ``_convert_``)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency
        return v
    if isinstance(v, (DictConfig, ListConfig)):
        return OmegaConf.to_container(v, resolve=True)
    return v


@contextmanager
def preserve_training_state(module: nn.Module, device: torch.device | None = None) -> Iterator[None]:
    """Run a block without side effects on training: restores each submodule's train/eval flag, the torch CPU
    RNG (and the CUDA RNG of ``device``), python ``random`` and numpy's global RNG, and the grad mode.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    >>> _ = net[1].eval()
    >>> s = torch.random.get_rng_state()
    >>> with preserve_training_state(net):
    ...     _ = net.eval(), torch.rand(3)
    >>> net.training, net[1].training, torch.equal(s, torch.random.get_rng_state())
    (True, False, True)
    """
    modes = [(m, m.training) for m in module.modules()]
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if (device is not None and device.type == "cuda")
        else []
    )
    grad = torch.is_grad_enabled()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for m, flag in modes:
            m.training = flag
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_grad_enabled(grad)


@dataclass
class FragilityReport:
    """Result of one :meth:`FragilityMonitor.evaluate` call.

    ``metrics`` are synchronised means over all processes (keys without the ``fragility/`` prefix, e.g.
    ``"saliency/topk/spearman"``); ``records`` one dict per attacked image (gathered from every process,
    sorted by method, attack and probe position); ``examples`` maps ``(method, attack)`` to the first
    ``n_images_logged`` attacked images of this process (``x``, ``x_adv``, ``clean_map``, ``adv_map``,
    ``label``, ``test_index``, ``topk_intersection``; CPU tensors / lists); ``cells`` maps ``(method, attack)``
    to that cell's aggregate over every process (:func:`fragdefense.evaluation.aggregate_rows`: ``n_images``
    attacked, ``n_skipped``, ``perturbed_rate``, ``zero_gradient_rate``, the metric means or ``None``), its
    ``seconds`` and ``warnings`` on this process.
    """

    metrics: dict[str, float]
    records: list[dict[str, Any]]
    examples: dict[tuple[str, str], dict[str, Any]]
    epoch: int
    global_step: int
    n_probe: int
    seconds: float
    protocol: dict[str, Any] = field(default_factory=dict)
    stage: str = "fit"
    cells: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """The metrics as logged: ``{"fragility/<name>": value}`` plus ``fragility/seconds``."""
        out = {_PREFIX + k: v for k, v in self.metrics.items()}
        out[_PREFIX + "seconds"] = self.seconds
        return out

    def notes(self) -> dict[tuple[str, str], list[str]]:
        """Per ``(method, attack)``: why its numbers are no evidence of robustness, if they are not (no probe image
        attacked because all were misclassified, no image perturbed, a zero ascent gradient on some images)."""
        out: dict[tuple[str, str], list[str]] = {}
        for key, c in self.cells.items():
            msgs = []
            if c.get("n_images") == 0:
                msgs.append(f"{NO_ATTACKED_IMAGE}; its metrics are NaN")
            else:
                if c.get("perturbed_rate") == 0.0:
                    msgs.append(
                        "no image perturbed (no label-preserving perturbation found): its similarities compare the "
                        "clean maps with themselves"
                    )
                if (c.get("zero_gradient_rate") or 0.0) > 0.0:
                    msgs.append(
                        f"zero ascent gradient on {_pct(c['zero_gradient_rate'])} of the attacked images: the attack "
                        "could not move their maps (not evidence of robustness)"
                    )
            if msgs:
                out[key] = msgs
        return out


class FragilityMonitor(L.Callback):
    """Monitor how fragile the model's explanations are while it trains (see the module docstring).

    Args:
        every_n_epochs: evaluate after epochs ``e`` (0-based) with ``(e + 1) % every_n_epochs == 0``;
            ``0``: only at the end of fit.
        methods: attribution methods, ``{name: options}`` (e.g. ``{"saliency": {}, "integrated_gradients":
            {"steps": 16}}``) or a list of names. Gradient attacks need methods supporting ``create_graph``.
        attacks: any of ``random_sign``, ``random_walk``, ``topk``, ``mass_center``.
        eps: L-inf (or L2, ``threat``) budget in pixel units of ``[0, 1]`` images; ``"8/255"`` strings accepted.
        steps, step_size, k, beta, check_every, restarts, random_start, criterion, threat, reduce, lens_window:
            the attack protocol of every cell (:func:`~fragdefense.attacks.attack_interpretation`; ``step_size``
            also accepts fraction strings; ``None`` = ``2.5 * eps / steps``). ``k`` (top-k size of the ``topk`` attack
            and of the top-k / LENS metrics) is capped at ``H * W``.
        n_probe: use at most this many probe images (``None``: all of ``datamodule.probe_batch()``).
        batch_size: images per attack batch (per process).
        log_images_every_n_epochs: log example strips to W&B every N epochs (only at evaluated epochs;
            ``0``: never).
        n_images_logged: example images per (method, attack) for W&B and the PNG.
        on_fit_end: evaluate at the end of fit (reusing the last evaluation when the weights have not changed
            since), log the W&B per-image table and write ``maps_png``; :meth:`summary` reads this result.
        on_validate: also evaluate during ``trainer.validate``.
        maps_png: file name of the maps figure at the end of fit, relative to ``trainer.default_root_dir``
            (or absolute); ``None``: no figure.
        seed: seed of the per-image generators of the random attacks and random starts (with method, attack,
            eps and test index; :func:`~fragdefense.utils.conventions.image_seed`), and of the global RNG inside
            the evaluation, for stochastic attribution methods such as SmoothGrad.
        probe: the probe images, instead of the datamodule's: an ``(x, y)`` pair (images in ``[0, 1]``), a dict
            as ``probe_batch()`` returns, a dataset or a ``DataLoader`` / iterable of ``(x, y)`` batches (the
            first ``n_probe`` images). Without it: ``datamodule.probe_batch()`` when the datamodule has one, else
            the first ``n_probe`` images of its ``val_dataloader()`` (else ``test_dataloader()``, else
            ``train_dataloader()``; or of the dataloaders given to ``fit``).
        probe_seed: seed of the loader's RNGs while the probe is read (a shuffled loader gives the same images
            every time; the training RNGs are restored).
        model: the network to evaluate: ``None`` (``pl_module.model`` if it is an ``nn.Module``, else the
            LightningModule), an attribute path of the LightningModule (``"net"``, ``"ema.module"``) or a
            callable ``pl_module -> nn.Module``. It must take images in ``[0, 1]`` and return logits.
        progress: report the evaluation's progress (global-zero process, ``rank_zero_info``: Lightning's console
            logger): after a batch of a cell (method x attack x eps) when ``progress_interval`` seconds passed
            since the last line, and after the last cell.
        progress_interval: minimum seconds between two progress lines (``0``: a line per batch).

    Any LightningDataModule or dataloader works (no ``probe_batch()`` needed)::

        mon = FragilityMonitor(attacks=["random_sign"], n_probe=16)           # 16 images of val_dataloader()
        mon = FragilityMonitor(probe=my_loader, model="net")                   # explicit probe and network

    Example:
        >>> from fragdefense.models import create_model
        >>> _ = torch.manual_seed(0)
        >>> net = create_model("small_cnn", num_classes=10, width=4).eval()
        >>> x = torch.rand(4, 3, 16, 16)
        >>> probe = {"x": x, "y": net(x).argmax(1), "mask": None, "indices": [0, 1, 2, 3]}
        >>> mon = FragilityMonitor(attacks=["random_sign", "topk"], eps="4/255", steps=2, check_every=1, k=20)
        >>> rep = mon.evaluate(net, probe)
        >>> rep.metrics["probe_acc"], rep.metrics["saliency/topk/label_kept_rate"]
        (1.0, 1.0)
        >>> sorted(k for k in rep.scalars() if k.startswith("fragility/saliency/topk/"))[:2]
        ['fragility/saliency/topk/center_shift', 'fragility/saliency/topk/kendall']
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        methods: Mapping[str, Mapping[str, Any] | None] | Sequence[str] | None = None,
        attacks: Sequence[str] = ("random_sign", "topk"),
        eps: float | str = "8/255",
        steps: int = 10,
        step_size: float | str | None = "2/255",
        k: int = 100,
        beta: float | Sequence[float] = 10.0,
        check_every: int = 5,
        restarts: int = 1,
        random_start: bool = False,
        criterion: str = "auto",
        threat: str = "linf",
        reduce: str = "abs_sum",
        lens_window: int = 1,
        n_probe: int | None = 64,
        batch_size: int = 64,
        log_images_every_n_epochs: int = 2,
        n_images_logged: int = 4,
        on_fit_end: bool = True,
        on_validate: bool = True,
        maps_png: str | None = "fragility_maps.png",
        seed: int = 0,
        probe: ImageSource | None = None,
        probe_seed: int = 0,
        model: NetworkSpec = None,
        progress: bool = True,
        progress_interval: float = 10.0,
        explanation_scores: Sequence[str] = (),
        score_opts: Mapping[str, Mapping[str, Any]] | None = None,
        default_methods: Mapping[str, Mapping[str, Any] | None] | Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        methods, attacks, beta = _plain(methods), _plain(attacks), _plain(beta)
        if methods is None:  # configs keep their defaults in `default_methods`: a `methods` override replaces them
            methods = _plain(default_methods) or {"saliency": {}}
        if isinstance(methods, str):
            methods = [methods]
        if isinstance(methods, Mapping):
            self.methods = {str(m): dict(o or {}) for m, o in methods.items()}
        elif isinstance(methods, Sequence):
            self.methods = {str(m): {} for m in methods}
        else:
            raise TypeError(f"`methods` must be a dict name -> options or a list of names, got {methods!r}")
        if not self.methods:
            raise ValueError("`methods` is empty; give at least one attribution method, e.g. {'saliency': {}}")
        if isinstance(attacks, str):
            attacks = [attacks]
        self.attacks = [str(a) for a in attacks]
        if not self.attacks:
            raise ValueError(f"`attacks` is empty; give at least one of {monitor_attacks()}")
        for a in self.attacks:
            if a not in monitor_attacks():
                raise ValueError(f"unknown monitor attack {a!r}; expected one of {monitor_attacks()}")
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"`attacks` has duplicates: {self.attacks}")
        for m in self.methods:
            get_attribution(m)  # raises with the list of known methods
            for a in self.attacks:
                if get_attack(a).needs_gradient and not supports_create_graph(m):
                    raise ValueError(
                        f"attack {a!r} back-propagates through the map, but method {m!r} does not support "
                        f"create_graph; monitor it with {' / '.join(list_attacks(needs_gradient=False))} only"
                    )
        self.every_n_epochs = _int(every_n_epochs, "every_n_epochs", 0)
        self.eps = parse_eps(eps)
        self._budget = Budget(eps, "eps")  # as written ("8/255"): part of the per-image seeds, as in fragdefense-eval
        self.step_size = None if step_size is None else parse_eps(step_size)
        self.steps = _int(steps, "steps", 1)
        self.k = _int(k, "k", 1)
        self.beta = beta if isinstance(beta, (int, float)) else [float(b) for b in beta]
        self.check_every = _int(check_every, "check_every", 1)
        self.restarts = _int(restarts, "restarts", 1)
        self.random_start = bool(random_start)
        self.criterion = str(criterion)
        self.threat = str(threat)
        self.reduce = str(reduce)
        self.lens_window = _int(lens_window, "lens_window", 0)
        self.n_probe = None if n_probe is None else _int(n_probe, "n_probe", 1)
        self.batch_size = _int(batch_size, "batch_size", 1)
        self.log_images_every_n_epochs = _int(log_images_every_n_epochs, "log_images_every_n_epochs", 0)
        self.n_images_logged = _int(n_images_logged, "n_images_logged", 0)
        self.on_fit_end_enabled = bool(on_fit_end)
        self.on_validate = bool(on_validate)
        self.maps_png = maps_png
        self.seed = _int(seed, "seed", 0)
        self.probe = probe
        self.probe_seed = _int(probe_seed, "probe_seed", 0)
        self.model = check_network_spec(model, "FragilityMonitor")
        self.progress = check_bool(progress, "progress")
        self.progress_interval = check_finite_float(progress_interval, "progress_interval", 0.0)
        from fragdefense.evaluation.quality import check_scores

        scores = _plain(explanation_scores) or []
        self.score_opts = {str(k): dict(v or {}) for k, v in (_plain(score_opts) or {}).items()}
        #: explanation scores (robustness / faithfulness) of each method's clean maps, logged per epoch; off when
        #: empty (they cost model calls: e.g. deletion AUC one forward per step and image)
        self.explanation_scores = check_scores(list(scores), self.score_opts)
        #: the last evaluation (any stage) and the end-of-fit one
        self.last: FragilityReport | None = None
        self.final: FragilityReport | None = None
        #: path of the maps figure written at the end of fit (rank 0)
        self.png_path: Path | None = None
        self._probe: dict[str, Any] | None = None
        self._evaluated_epoch: int | None = None
        self._wandb_defined = False

    # --- protocol -------------------------------------------------------------------------------------
    @property
    def protocol(self) -> dict[str, Any]:
        """The attack protocol (recorded with every result: numbers from different protocols don't compare)."""
        return {
            "methods": self.methods,
            "attacks": list(self.attacks),
            "eps_255": self.eps * 255,
            "k": self.k,
            **self._attack_kwargs(),
            "seed": self.seed,
            **(
                {"explanation_scores": self.explanation_scores, "score_opts": self.score_opts}
                if self.explanation_scores
                else {}
            ),
        }

    def _attack_kwargs(self) -> dict[str, Any]:
        """Options passed unchanged to :func:`~fragdefense.attacks.attack_interpretation` for every attack."""
        return {
            "eps": self.eps,
            "step_size": self.step_size,
            "steps": self.steps,
            "restarts": self.restarts,
            "random_start": self.random_start,
            "criterion": self.criterion,
            "beta": self.beta,
            "threat": self.threat,
            "reduce": self.reduce,
            "lens_window": self.lens_window,
            "check_every": self.check_every,
        }

    def metric_names(self, with_mask: bool) -> list[str]:
        """Logged scalar names (with the ``fragility/`` prefix), in logging order.

        >>> FragilityMonitor(attacks=["topk"]).metric_names(with_mask=False)[:3]
        ['fragility/probe_acc', 'fragility/saliency/topk/topk_intersection', 'fragility/saliency/topk/spearman']
        """
        names = ["probe_acc"]
        for m in self.methods:
            if with_mask:
                names.append(f"{m}/mask_mass_clean")
            for a in self.attacks:
                names += [f"{m}/{a}/{x}" for x in monitor_metrics(self.k, self.lens_window)]
                if with_mask:
                    names.append(f"{m}/{a}/mask_mass_attacked")
            names += [f"{m}/quality/{q}" for q in self.explanation_scores]
        return [_PREFIX + n for n in names] + [_PREFIX + "seconds"]

    # --- the evaluation -------------------------------------------------------------------------------
    def evaluate(
        self,
        model: nn.Module,
        probe: Mapping[str, Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        global_step: int = 0,
        keep_examples: bool = True,
        stage: str = "fit",
    ) -> FragilityReport:
        """Run every method x attack on this process's shard of ``probe`` and return the synchronised report.

        Each (method, attack) is one cell of the evaluation engine (:func:`fragdefense.evaluation.run_cell`) run on
        the shard's images as batches of ``(x, y, test indices)``; the per-image records of every process are
        gathered and the means computed from them (:func:`fragdefense.evaluation.aggregate_rows`, float64), so
        every process holds the same numbers.

        Args:
            model: classifier, images in ``[0, 1]`` -> logits (e.g. ``ClassifierModule.model``).
            probe: ``{"x": (P,C,H,W), "y": (P,), "mask": (P,H,W) or None, "indices": list}`` as
                ``probe_batch()`` returns, or any source the ``probe`` argument accepts (an ``(x, y)`` pair, a
                ``DataLoader``, ...); the first ``n_probe`` images are used.
            rank, world_size: this process's shard is positions ``rank::world_size``. With
                ``world_size > 1`` every process must call this (the records are gathered).
            epoch, global_step, stage: recorded in the report.
            keep_examples: keep example images (rank 0).

        The model's and its submodules' train/eval flags, the RNG states and parameter gradients are left
        as they were.
        """
        t0 = time.perf_counter()
        if isinstance(probe, Mapping) and "indices" in probe:
            check_images(probe["x"], "FragilityMonitor")
        else:
            probe = images_from(probe, self.n_probe, seed=self.probe_seed, owner="FragilityMonitor")
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        n_all = int(len(probe["y"]))
        n_total = n_all if self.n_probe is None else min(self.n_probe, n_all)
        positions = list(range(rank, n_total, world_size))
        indices = list(probe["indices"])
        test_index = [int(indices[i]) for i in positions]
        # per-image seeds come from the image ids: the test indices (the same seeds as fragdefense-eval), unless
        # a probe repeats one (then the probe positions, so that every image keeps its own seed and record)
        unique = len(set(indices[:n_total])) == n_total
        ids = test_index if unique else positions
        pos_of = dict(zip(ids, positions))
        x_all = probe["x"][positions]
        h, w = (int(x_all.shape[-2]), int(x_all.shape[-1])) if x_all.ndim == 4 else (1, 1)
        k = min(self.k, h * w)
        mask = probe.get("mask")
        mask = mask[positions].clone() if mask is not None else None
        mask_of = {i: mask[j] for j, i in enumerate(ids)} if mask is not None else {}
        n_keep = self.n_images_logged if keep_examples else 0
        protocol = {**self._attack_kwargs(), "k": k}
        eps = protocol.pop("eps")
        budget = self._budget if float(self._budget) == eps else Budget(eps)
        with torch.inference_mode(False), preserve_training_state(model, device), torch.enable_grad():
            model.eval()
            x = x_all.to(device=device, dtype=torch.float32).clone()
            y = torch.as_tensor(probe["y"])[positions].to(device="cpu", dtype=torch.long)  # run_cell moves each batch
            bs = self.batch_size
            batches = [(x[s : s + bs], y[s : s + bs], ids[s : s + bs]) for s in range(0, len(positions), bs)]
            # stochastic methods (SmoothGrad) draw from the global RNG: seed it (restored on exit)
            torch.random.default_generator.manual_seed(self.seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(self.seed)
            acc = clean_accuracy(model, batches, device)
            records: list[dict[str, Any]] = []
            examples: dict[tuple[str, str], dict[str, Any]] = {}
            cells: dict[tuple[str, str], dict[str, Any]] = {}
            mm_adv: dict[int, float] = {}
            mm_clean: dict[int, float] = {}

            def mask_mass(res: Any, _x: Tensor, ids_b: list[int]) -> None:
                """The share of each attacked image's clean and attacked map on its object mask."""
                if not res.n_attacked:
                    return
                done = [ids_b[i] for i in res.index.tolist()]
                mk = torch.stack([mask_of[i] for i in done]).to(res.adv_map.device)
                mm_adv.update(zip(done, MF.mask_mass(res.adv_map.abs(), mk).double().tolist()))
                mm_clean.update(zip(done, MF.mask_mass(res.clean_map.abs(), mk).double().tolist()))

            report = _Progress(
                len(self.methods) * len(self.attacks),
                len(positions),
                self.progress_interval,
                enabled=self.progress and rank == 0,
            )
            for mi, (method, mopts) in enumerate(self.methods.items()):
                spec = ExplainerSpec(method, method, dict(mopts))
                for ai, attack in enumerate(self.attacks):
                    mm_adv.clear()
                    mm_clean.clear()
                    report.start(f"{method} / {attack} / eps {budget}")
                    res = run_cell(
                        model,
                        batches,
                        Cell(method, attack, budget),
                        spec,
                        protocol=protocol,
                        seed=self.seed,
                        device=device,
                        n_examples=n_keep,
                        require_correct=True,
                        on_batch=mask_mass if mask is not None else None,
                        progress=report.batch,
                    )
                    report.done(res.aggregate)
                    ex = res.examples
                    records_cell = []
                    for r in res.rows:
                        image = r.pop("image")
                        pos = pos_of[image]
                        row = {
                            "method": method,
                            "attack": attack,
                            "eps": eps,
                            "probe_pos": pos,
                            "test_index": int(indices[pos]),
                            **r,
                        }
                        if mask is not None:
                            row["mask_mass_attacked"] = mm_adv[image]
                            row["mask_mass_clean"] = mm_clean[image]
                        row["_order"] = (mi, ai)
                        records_cell.append(row)
                    records += records_cell
                    n_ex = min(n_keep, len(records_cell))
                    if n_ex:  # the first attacked images of this process
                        examples[(method, attack)] = {
                            "x": ex["x"][:n_ex],
                            "x_adv": ex["x_adv"][:n_ex],
                            "clean_map": ex["clean_map"][:n_ex],
                            "adv_map": ex["adv_map"][:n_ex],
                            "label": [int(v) for v in ex["label"][:n_ex]],
                            "test_index": [r["test_index"] for r in records_cell[:n_ex]],
                            "topk_intersection": [float(r["topk_intersection"]) for r in records_cell[:n_ex]],
                        }
                    cells[(method, attack)] = {"seconds": res.seconds, "warnings": list(res.warnings)}
            quality_rows: list[dict[str, Any]] = []
            if self.explanation_scores:
                for method, mopts in self.methods.items():
                    if report.enabled:
                        report._emit(f"explanation scores of {method}: {', '.join(self.explanation_scores)}")
                    q = run_quality_cell(
                        model,
                        batches,
                        ExplainerSpec(method, method, dict(mopts)),
                        self.explanation_scores,
                        score_opts=self.score_opts,
                        seed=self.seed,
                        device=device,
                        require_correct=True,
                    )
                    quality_rows += [{"method": method, **r} for r in q.rows]
        parts = _gather(
            [{"records": records, "n": acc["n"], "correct": acc["correct"], "quality": quality_rows}], world_size
        )
        records = [r for part in parts for r in part["records"]]
        quality_rows = [r for part in parts for r in part.get("quality", [])]
        records.sort(key=lambda r: (r["_order"], r["probe_pos"]))
        for r in records:
            del r["_order"]
        n_seen, n_correct = sum(part["n"] for part in parts), sum(part["correct"] for part in parts)
        values, cell_aggs = self._means(records, n_seen, n_correct, with_mask=mask is not None)
        for method in self.methods if self.explanation_scores else ():
            for name in self.explanation_scores:
                vals = [float(r[name]) for r in quality_rows if r["method"] == method and r.get(name) is not None]
                vals = [v for v in vals if math.isfinite(v)]
                values[f"{method}/quality/{name}"] = math.fsum(vals) / len(vals) if vals else float("nan")
        for key, agg in cell_aggs.items():
            cells.setdefault(key, {"seconds": 0.0, "warnings": []}).update(agg)
        return FragilityReport(
            metrics=values,
            records=records,
            examples=examples,
            epoch=int(epoch),
            global_step=int(global_step),
            n_probe=n_total,
            seconds=time.perf_counter() - t0,
            protocol=self.protocol,
            stage=stage,
            cells=cells,
        )

    def _means(
        self, records: list[dict[str, Any]], n_seen: int, n_correct: int, with_mask: bool
    ) -> tuple[dict[str, float], dict[tuple[str, str], dict[str, Any]]]:
        """The logged means (NaN where a cell attacked no image) and each cell's aggregate, from the gathered
        records: identical on every process (float64, :func:`math.fsum`: independent of the records' order)."""
        nan = float("nan")
        values: dict[str, float] = {"probe_acc": (n_correct / n_seen) if n_seen else nan}
        aggs: dict[tuple[str, str], dict[str, Any]] = {}
        names = list(monitor_metrics(self.k, self.lens_window))
        for m in self.methods:
            for a in self.attacks:
                rows = [
                    {k_: v for k_, v in r.items() if k_ not in _RECORD_KEYS}
                    for r in records
                    if r["method"] == m and r["attack"] == a
                ]
                aggs[(m, a)] = aggregate_rows(rows, n_seen - len(rows))
            if with_mask:
                v = aggs[(m, self.attacks[0])].get("mask_mass_clean")  # the images the first attack attacked
                values[f"{m}/mask_mass_clean"] = nan if v is None else float(v)
            for a in self.attacks:
                agg = aggs[(m, a)]
                for name in [*names, *(["mask_mass_attacked"] if with_mask else [])]:
                    v = agg.get(name)
                    values[f"{m}/{a}/{name}"] = nan if v is None else float(v)
        return values, aggs

    # --- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        probe = self._get_probe(trainer)
        if not self._wandb_defined and trainer.is_global_zero:
            runs = _wandb_runs(trainer)
            if runs:
                names = self.metric_names(with_mask=probe.get("mask") is not None)
                for run in runs:
                    run.define_metric("epoch")
                    for n in names:
                        run.define_metric(n, step_metric="epoch")
                    run.define_metric(_PREFIX + "*", step_metric="epoch")
                    run.config.update({"fragility_monitor": self.protocol}, allow_val_change=True)
                self._wandb_defined = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fn = str(getattr(trainer.state.fn, "value", trainer.state.fn))
        if fn == "validate":
            if self.on_validate:
                self._run_and_log(trainer, pl_module, stage="validate")
            return
        if fn != "fit" or not self._due(trainer.current_epoch):
            return
        if not getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", True):
            return  # a mid-epoch validation (val_check_interval < 1): wait for the end-of-epoch one
        self._run_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # fallback for epochs without (end-of-epoch) validation
        if self._due(trainer.current_epoch) and self._evaluated_epoch != trainer.current_epoch:
            self._run_and_log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.on_fit_end_enabled:
            return
        rep = self.last
        if rep is None or rep.stage != "fit" or rep.global_step != trainer.global_step:
            epoch = max(int(trainer.fit_loop.epoch_progress.current.ready) - 1, 0)  # the epoch of these weights
            rep = self._run(trainer, pl_module, epoch=epoch)
            if trainer.is_global_zero:
                for lg in trainer.loggers:
                    lg.log_metrics({**rep.scalars(), "epoch": epoch}, step=trainer.global_step)
                    lg.save()
        self.final = rep
        if trainer.is_global_zero:
            self.png_path = self._write_png(trainer, rep)
            self._wandb_final(trainer, rep)

    # --- helpers --------------------------------------------------------------------------------------
    def _due(self, epoch: int) -> bool:
        return self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0

    def _get_probe(self, trainer: L.Trainer) -> dict[str, Any]:
        if self._probe is None:
            self._probe = find_probe(
                trainer, probe=self.probe, n=self.n_probe, seed=self.probe_seed, owner="FragilityMonitor"
            )
            if len(self._probe["y"]) == 0:
                warnings.warn("FragilityMonitor: the probe set is empty (data.probe_size=0)", stacklevel=2)
        return self._probe

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int, stage: str = "fit") -> FragilityReport:
        net = resolve_network(pl_module, self.model, "FragilityMonitor")
        with preserve_training_state(pl_module, pl_module.device):
            rep = self.evaluate(
                net,
                self._get_probe(trainer),
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                epoch=epoch,
                global_step=trainer.global_step,
                keep_examples=trainer.is_global_zero,
                stage=stage,
            )
        self.last = rep
        if trainer.is_global_zero:
            for (m, at), msgs in rep.notes().items():
                warnings.warn(f"FragilityMonitor, {m} / {at}: {'; '.join(msgs)}", RuntimeWarning, stacklevel=2)
        return rep

    def _run_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str = "fit") -> None:
        epoch = int(trainer.current_epoch)
        rep = self._run(trainer, pl_module, epoch=epoch, stage=stage)
        self._evaluated_epoch = epoch if stage == "fit" else self._evaluated_epoch
        # The means are already identical on every process (computed from the gathered records); "max" over
        # identical values keeps them exact, satisfies Lightning's epoch-level sync and logs the slowest seconds.
        pl_module.log_dict(rep.scalars(), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        n = self.log_images_every_n_epochs
        if trainer.is_global_zero and n and (epoch + 1) % n == 0:
            self._wandb_images(trainer, rep)

    def _write_png(self, trainer: L.Trainer, rep: FragilityReport) -> Path | None:
        if not self.maps_png or not rep.examples:
            return None
        from fragdefense.evaluation.figures import plot_examples

        method = next(iter(self.methods))
        attack = next((a for a in self.attacks if get_attack(a).needs_gradient), self.attacks[0])
        ex = rep.examples.get((method, attack))
        if ex is None or not len(ex["x"]):
            return None
        path = Path(self.maps_png)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        path.parent.mkdir(parents=True, exist_ok=True)
        pre = f"{method}/{attack}/"
        k = min(self.k, ex["x"].shape[-2] * ex["x"].shape[-1])
        title = (
            f"{method} / {attack}, eps {self.eps * 255:.3g}/255, after epoch {rep.epoch + 1}: top-{k}"
            f" intersection {rep.metrics.get(pre + 'topk_intersection', float('nan')):.2f}, "
            f"Spearman {rep.metrics.get(pre + 'spearman', float('nan')):.2f}"
        )
        return plot_examples(ex, path, title=title)

    def _wandb_images(self, trainer: L.Trainer, rep: FragilityReport) -> None:
        runs = _wandb_runs(trainer)
        if not runs or not rep.examples:
            return
        import wandb

        payload: dict[str, Any] = {"epoch": rep.epoch}
        for (method, attack), ex in rep.examples.items():
            imgs = []
            for i in range(len(ex["x"])):
                strip = _example_strip(ex["x"][i], ex["x_adv"][i], ex["clean_map"][i], ex["adv_map"][i])
                cap = (
                    f"test #{ex['test_index'][i]} label {ex['label'][i]} | top-k ∩ {ex['topk_intersection'][i]:.2f}"
                    " | original, perturbed, clean map, attacked map"
                )
                imgs.append(wandb.Image(strip, caption=cap))
            payload[f"{_PREFIX}{method}/{attack}/examples"] = imgs
        for run in runs:
            run.log(payload)

    def _wandb_final(self, trainer: L.Trainer, rep: FragilityReport) -> None:
        runs = _wandb_runs(trainer)
        if not runs:
            return
        import wandb

        cols = [
            "epoch",
            "method",
            "attack",
            "eps",
            "probe_pos",
            "test_index",
            "label",
            "label_kept",
            "perturbed",
            "best_iter",
            "zero_gradient",
            "topk_intersection",
            "spearman",
            "kendall",
            "center_shift",
            "lens_recall",
            "linf_distance",
            "mask_mass_clean",
            "mask_mass_attacked",
        ]
        data = [[rep.epoch if c == "epoch" else r.get(c) for c in cols] for r in rep.records]
        payload: dict[str, Any] = {"epoch": rep.epoch, f"{_PREFIX}per_image": wandb.Table(columns=cols, data=data)}
        if self.png_path is not None and self.png_path.is_file():
            payload[f"{_PREFIX}maps"] = wandb.Image(str(self.png_path), caption=self.png_path.name)
        for run in runs:
            run.log(payload)
            run.summary.update({f"{_PREFIX}final/{k}": v for k, v in rep.metrics.items()})

    def summary(self) -> dict[str, Any] | None:
        """The end-of-fit result (or, with ``on_fit_end=False``, the last evaluation during fit) as a JSON-ready
        dict; ``None`` if there is none.

        ``{"epoch", "n_probe", "eps", "eps_255", "protocol", "probe_acc", "seconds", "maps_png",
        "methods": {method: {"mask_mass_clean"?, "attacks": {attack: {metric: value, "acc_attacked", "n_attacked",
        "n_perturbed", "zero_gradient_rate", "notes", "text"}}}}}``; ``acc_attacked`` = share of probe images
        still correctly classified after the attack; ``n_perturbed``: attacked images for which a label-preserving
        perturbation was found (the means include the others, whose maps did not change); ``notes``: what makes
        the cell's numbers no evidence of robustness (no probe image attacked, no image perturbed, a zero ascent
        gradient); ``text``: the cell as one line for a console, every figure beside its ``n perturbed /
        n attacked``. A cell without an attacked image has no metric values here (they are logged as NaN) and its
        text says why.
        """
        rep = self.final
        if rep is None and self.last is not None and self.last.stage == "fit":
            rep = self.last
        if rep is None:
            return None
        acc = rep.metrics.get("probe_acc", float("nan"))
        notes = rep.notes()
        methods: dict[str, Any] = {}
        for m in self.methods:
            entry: dict[str, Any] = {}
            mm = rep.metrics.get(f"{m}/mask_mass_clean")
            if mm is not None and math.isfinite(mm):
                entry["mask_mass_clean"] = mm
            atk: dict[str, Any] = {}
            for a in self.attacks:
                pre = f"{m}/{a}/"
                cell = rep.cells.get((m, a), {})
                n_att = cell.get("n_images")
                vals: dict[str, Any] = {}
                if n_att != 0:
                    vals = {k[len(pre) :]: v for k, v in rep.metrics.items() if k.startswith(pre)}
                kept = vals.get("label_kept_rate", float("nan"))
                # no attacked image: no correctly classified one, so nothing is classified correctly after the attack
                vals["acc_attacked"] = acc * kept if n_att != 0 else acc
                vals["n_attacked"] = n_att
                rate = cell.get("perturbed_rate")
                vals["n_perturbed"] = round(rate * n_att) if rate is not None and n_att else (0 if n_att == 0 else None)
                vals["zero_gradient_rate"] = cell.get("zero_gradient_rate")
                vals["notes"] = notes.get((m, a), [])
                vals["text"] = _cell_text(vals, acc, self.k)
                atk[a] = vals
            entry["attacks"] = atk
            methods[m] = entry
        return {
            "epoch": rep.epoch,
            "global_step": rep.global_step,
            "n_probe": rep.n_probe,
            "eps": self.eps,
            "eps_255": self.eps * 255,
            "protocol": rep.protocol,
            "probe_acc": acc,
            "methods": methods,
            "seconds": rep.seconds,
            "maps_png": str(self.png_path) if self.png_path is not None else None,
        }


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "not measured"


def _cell_text(v: Mapping[str, Any], acc: float, k: int) -> str:
    """One cell of :meth:`FragilityMonitor.summary` as a console line: accuracy clean -> attacked, and the top-k
    intersection and Spearman of clean vs attacked maps only where they measure something, each beside how many
    of the attacked images were perturbed (the means include the unperturbed ones, whose maps did not move).

    >>> _cell_text({"n_attacked": 0, "acc_attacked": 0.0}, 0.0, 100)
    'acc 0.00%: no probe image attacked (all misclassified)'
    >>> _cell_text({"n_attacked": 3, "acc_attacked": 1.0, "perturbed_rate": 0.0, "topk_intersection": 1.0}, 1.0, 9)
    'acc 100.00% -> 100.00%: no image perturbed (no label-preserving perturbation found), similarities not measured'
    >>> _cell_text({"n_attacked": 4, "n_perturbed": 3, "acc_attacked": 0.5, "perturbed_rate": 0.75,
    ...             "topk_intersection": 0.5, "spearman": 0.25}, 0.5, 9)
    'acc 50.00% -> 50.00%, top-9 0.500 (3 perturbed / 4 attacked), Spearman 0.250 (3 perturbed / 4 attacked)'
    """
    n_att = v.get("n_attacked")
    if n_att == 0 and not (isinstance(acc, (int, float)) and math.isfinite(acc)):
        return "no probe image evaluated (the probe set is empty): nothing measured"
    head = f"acc {_pct(acc)}"
    if n_att == 0:
        return f"{head}: {NO_ATTACKED_IMAGE}"
    head += f" -> {_pct(v.get('acc_attacked'))}"
    pr, zg = v.get("perturbed_rate"), v.get("zero_gradient_rate") or 0.0
    if zg >= 1.0:
        return f"{head}: zero ascent gradient on every image (the maps could not move), similarities not measured"
    if pr == 0.0:
        return f"{head}: no image perturbed (no label-preserving perturbation found), similarities not measured"
    n_pert = v.get("n_perturbed")
    if n_pert is None and pr is not None and n_att is not None:
        n_pert = round(pr * n_att)
    count = f" ({n_pert} perturbed / {n_att} attacked)" if n_pert is not None and n_att is not None else ""
    topk, rho = v.get("topk_intersection"), v.get("spearman")
    out = f"{head}, top-{k} {_num(topk)}{count}, Spearman {_num(rho)}{count}"
    if zg > 0.0:
        out += f" (zero ascent gradient on {_pct(zg)} of the images)"
    return out


class _Progress:
    """Rate-limited progress lines of one monitor evaluation (the engine's ``run_cell(progress=...)`` hook):
    ``rank_zero_info`` (Lightning's console logger) after a batch when ``interval`` seconds passed since the last
    line, and after the last cell; silent when disabled."""

    def __init__(self, n_cells: int, n_images: int, interval: float, enabled: bool) -> None:
        self.n_cells, self.n_images, self.interval, self.enabled = n_cells, n_images, float(interval), enabled
        self.t0 = self.last = time.perf_counter()
        self.cell, self.name, self.seen = 0, "", 0

    def _emit(self, msg: str) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        self.last = time.perf_counter()
        rank_zero_info(f"FragilityMonitor: {msg}; {self.last - self.t0:.0f} s elapsed")

    def start(self, name: str) -> None:
        self.cell, self.name, self.seen = self.cell + 1, name, 0

    def batch(self, n: int) -> None:
        self.seen += int(n)
        if self.enabled and time.perf_counter() - self.last >= self.interval:
            self._emit(f"cell {self.cell}/{self.n_cells} ({self.name}): {self.seen}/{self.n_images} images")

    def done(self, agg: Mapping[str, Any]) -> None:
        last = self.cell == self.n_cells
        if self.enabled and (last or time.perf_counter() - self.last >= self.interval):
            n, rate = agg.get("n_images", 0), agg.get("perturbed_rate")
            what = f"{round(rate * n) if rate is not None else 0} perturbed / {n} attacked" if n else "none attacked"
            self._emit(f"cell {self.cell}/{self.n_cells} ({self.name}) done, {what}")


def _gather(records: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Every process's records on every process (a no-op on one process)."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return records
    out: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, records)
    return [r for part in out for r in (part or [])]


def _wandb_runs(trainer: L.Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _colorize(m: Tensor, cmap: str = "hot") -> Tensor:
    """Map ``(H, W)`` -> RGB ``(3, H, W)`` in ``[0, 1]`` (scaled by its own maximum)."""
    import matplotlib

    a = m.detach().float().abs()
    a = a / a.max().clamp_min(1e-12)
    rgb = matplotlib.colormaps[cmap](a.numpy())[..., :3]
    return torch.from_numpy(rgb).permute(2, 0, 1).float()


def _example_strip(x: Tensor, x_adv: Tensor, clean: Tensor, adv: Tensor, scale: int = 4) -> np.ndarray:
    """One ``H x 4W`` RGB uint8 strip: original | perturbed | clean map | attacked map (upscaled ``scale``x).

    >>> _example_strip(torch.rand(3, 8, 8), torch.rand(3, 8, 8), torch.rand(8, 8), torch.rand(8, 8)).shape
    (32, 128, 3)
    """
    img = x.float().clamp(0, 1)
    if img.shape[0] == 1:
        img, x_adv = img.expand(3, -1, -1), x_adv.expand(3, -1, -1)
    row = torch.cat([img, x_adv.float().clamp(0, 1), _colorize(clean), _colorize(adv)], dim=2)
    row = row.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
