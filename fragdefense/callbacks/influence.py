"""Influence-function monitoring while training (Koh & Liang; the attack of Ghorbani et al.; `docs/background.md` §4).

:class:`InfluenceMonitor` takes, every N epochs, a few probe test images (``trainer.datamodule.probe_batch()``; for
any other datamodule or dataloader the first images of its validation loader, or ``probe=``) and a fixed, seeded
subset of the training split (or of ``train_data=``), and computes the exact influence of those training images on the
probe predictions through the model's current last linear layer (:class:`~fragdefense.influence.LastLayerInfluence`,
with ``damping``: the model is not at an optimum of the last layer's loss alone). It logs

* ``influence/<attack>/spearman``, ``influence/<attack>/topk_kept``, ``influence/<attack>/label_kept_rate``,
  ``influence/<attack>/attacked_score_drop`` for the signed-gradient attack (``gradient``) and the random-sign
  baseline (``random_sign``) at ``eps`` (:func:`~fragdefense.influence.attack_influence`);
* ``influence/self_influence_mean`` (mean ``-I(z_j, z_j)`` over the training subset) and ``influence/seconds``;
* the probe images' most influential training images, before and after the attack: with a ``WandbLogger`` as
  W&B image panels (``influence/top_influential``, one strip per probe image: test image | top-k training images,
  then the attacked image | its top-k) via the logger's ``log_image``; otherwise (or in addition, ``save_png``) as
  ``<default_root_dir>/influence/epoch_XXX.png``.

The evaluation has no side effects on training: it runs in eval mode inside
:func:`~fragdefense.callbacks.fragility.preserve_training_state` (train/eval flags, RNG states and grad mode are
restored), differentiates with ``torch.autograd.grad`` w.r.t. the input only, and the random baseline draws from
its own seeded generator. Under DDP every process computes the same (deterministic) values; images and PNGs are
written by rank 0.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from fragdefense.callbacks._probe import (
    ImageSource,
    NetworkSpec,
    check_network_spec,
    find_probe,
    find_train_subset,
    resolve_network,
)
from fragdefense.callbacks.fragility import preserve_training_state
from fragdefense.influence import (
    INFLUENCE_ATTACKS,
    LastLayerInfluence,
    attack_influence,
    feature_extractor,
    find_head,
)
from fragdefense.utils.checks import parse_eps

__all__ = ["InfluenceMonitor"]

_PREFIX = "influence/"


def _int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}, got {v!r}")
    return v


class InfluenceMonitor(L.Callback):
    """Log how fragile the model's influence-function explanations are while it trains (see the module docstring).

    Args:
        every_n_epochs: evaluate after epochs ``e`` (0-based) with ``(e + 1) % every_n_epochs == 0``.
        n_probe: probe test images used (the first of ``datamodule.probe_batch()``).
        n_train: training images in the influence subset (drawn once with ``train_seed``).
        train_seed: seed of that subset.
        head: the model's linear last layer (submodule name; ``None``: its last ``nn.Linear``).
        damping, l2: added to the last layer's Hessian (``damping`` > 0 is needed for a softmax head).
        attacks: any of ``gradient``, ``random_sign``.
        eps: L-inf budget of the attacks (``"8/255"`` strings accepted).
        n_attacked, k, steps, rank_by: the attack protocol (see :func:`~fragdefense.influence.attack_influence`).
        n_images_logged: probe images shown with their top-``k`` training images (``0``: none).
        save_png: also write the PNG when a W&B logger is present.
        batch_size: images per feature batch.
        seed: seed of the random-sign baseline.
        probe: the probe images, instead of the datamodule's (an ``(x, y)`` pair with images in ``[0, 1]``, a
            ``DataLoader`` or an iterable of batches; the first ``n_probe`` images). Without it:
            ``datamodule.probe_batch()``, else the first images of its ``val_dataloader()`` (else
            ``test_dataloader()``, else ``train_dataloader()``).
        train_data: the training images, instead of the datamodule's training split (an ``(x, y)`` pair, a
            dataset or a ``DataLoader``; ``n_train`` of them drawn with ``train_seed``). Without it: the
            datamodule's ``train_set``, else the dataset of its ``train_dataloader()``.
        probe_seed: seed of the loader's RNGs while the probe is read.
        model: the network (``None``: ``pl_module.model`` if it is an ``nn.Module``, else the LightningModule;
            an attribute path such as ``"net"``; or a callable ``pl_module -> nn.Module``).

    Example:
        >>> from fragdefense.models import create_model
        >>> _ = torch.manual_seed(0)
        >>> net = create_model("small_cnn", num_classes=10, width=4).eval()
        >>> xtr, ytr = torch.rand(40, 3, 16, 16), torch.randint(0, 10, (40,))
        >>> probe = {"x": torch.rand(3, 3, 16, 16), "y": torch.randint(0, 10, (3,))}
        >>> rep = InfluenceMonitor(n_probe=3, k=3).evaluate(net, probe, xtr, ytr)
        >>> sorted(rep["metrics"])[:3]
        ['gradient/attacked_score_drop', 'gradient/label_kept_rate', 'gradient/spearman']
        >>> rep["top_clean"].shape
        torch.Size([3, 3])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        n_probe: int = 8,
        n_train: int = 1000,
        train_seed: int = 0,
        head: str | None = None,
        damping: float = 1e-3,
        l2: float = 0.0,
        attacks: Sequence[str] = ("gradient", "random_sign"),
        eps: float | str = "8/255",
        n_attacked: int = 3,
        k: int = 5,
        steps: int = 1,
        rank_by: str = "helpful",
        n_images_logged: int = 4,
        save_png: bool = False,
        batch_size: int = 256,
        seed: int = 0,
        probe: ImageSource | None = None,
        train_data: ImageSource | None = None,
        probe_seed: int = 0,
        model: NetworkSpec = None,
    ) -> None:
        super().__init__()
        self.every_n_epochs = _int(every_n_epochs, "every_n_epochs", 1)
        self.n_probe = _int(n_probe, "n_probe", 1)
        self.n_train = _int(n_train, "n_train", 2)
        self.train_seed = _int(train_seed, "train_seed", 0)
        self.head = head
        for v, name in ((damping, "damping"), (l2, "l2")):
            if not float(v) >= 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {v!r}")
        self.damping, self.l2 = float(damping), float(l2)
        attacks = [attacks] if isinstance(attacks, str) else [str(a) for a in attacks]
        for a in attacks:
            if a not in INFLUENCE_ATTACKS:
                raise ValueError(f"unknown influence attack {a!r}; expected one of {INFLUENCE_ATTACKS}")
        if not attacks:
            raise ValueError(f"`attacks` is empty; give at least one of {INFLUENCE_ATTACKS}")
        self.attacks = attacks
        self.eps = parse_eps(eps)
        self.n_attacked = _int(n_attacked, "n_attacked", 1)
        self.k = _int(k, "k", 1)
        self.steps = _int(steps, "steps", 1)
        if rank_by not in ("helpful", "harmful", "abs"):
            raise ValueError(f"`rank_by` must be 'helpful', 'harmful' or 'abs', got {rank_by!r}")
        self.rank_by = rank_by
        self.n_images_logged = _int(n_images_logged, "n_images_logged", 0)
        self.save_png = bool(save_png)
        self.batch_size = _int(batch_size, "batch_size", 1)
        self.seed = _int(seed, "seed", 0)
        self.probe = probe
        self.train_data = train_data
        self.probe_seed = _int(probe_seed, "probe_seed", 0)
        self.model = check_network_spec(model, "InfluenceMonitor")
        self.last: dict[str, Any] | None = None
        self.png_paths: list[Path] = []
        self._data: dict[str, Any] | None = None
        self._evaluated_epoch: int | None = None

    # --- the evaluation (no Lightning) ------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, probe: dict[str, Any], x_train: Tensor, y_train: Tensor) -> dict[str, Any]:
        """Influence of ``(x_train, y_train)`` on the probe images through ``model``'s last layer, and the attacks.

        Returns ``{"metrics": {name: value}, "top_clean", "top_adv" (n, k) indices into x_train, "x", "x_adv",
        "spearman" (n,)}`` (``top_adv`` / ``x_adv`` of the first attack in ``attacks``; ``gradient`` if listed).
        """
        device = next(model.parameters()).device
        model.eval()
        head = find_head(model, self.head)
        feats = feature_extractor(model, head)
        with torch.no_grad():
            phi = torch.cat([feats(xb.to(device)) for xb in x_train.split(self.batch_size)])
        labels = y_train.to(device)
        if head.out_features == 1:
            labels = labels.clamp(0, 1)
        inf = LastLayerInfluence(head.weight, head.bias, damping=self.damping, l2=self.l2).fit(phi, labels)
        x = probe["x"][: self.n_probe].to(device)
        y = probe["y"][: self.n_probe].to(device)
        k = min(self.k, len(x_train))
        metrics: dict[str, float] = {"self_influence_mean": float(inf.self_influence().mean())}
        gen = torch.Generator(device=device).manual_seed(self.seed)
        shown = None
        for attack in self.attacks:
            res = attack_influence(
                feats,
                inf,
                x,
                y,
                eps=self.eps,
                attack=attack,
                n_attacked=min(self.n_attacked, len(x_train)),
                k=k,
                steps=self.steps,
                rank_by=self.rank_by,
                generator=gen,
                batch_size=self.batch_size,
            )
            metrics.update({f"{attack}/{m}": v for m, v in res.summary().items()})
            if shown is None or attack == "gradient":
                shown = res
        assert shown is not None
        return {
            "metrics": metrics,
            "top_clean": shown.topk_clean.cpu(),
            "top_adv": shown.topk_adv.cpu(),
            "x": x.cpu(),
            "x_adv": shown.x_adv.cpu(),
            "spearman": shown.spearman.cpu(),
            "topk_kept": shown.topk_kept.cpu(),
            "attack": shown.protocol["attack"],
        }

    # --- Lightning hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._get_data(trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or str(getattr(trainer.state.fn, "value", trainer.state.fn)) != "fit":
            return
        if not getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", True):
            return
        if self._due(trainer.current_epoch):
            self._run_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer.current_epoch) and self._evaluated_epoch != trainer.current_epoch:
            self._run_and_log(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The evaluated epoch and the PNGs written so far (saved in checkpoints; the metrics themselves live in
        the loggers), so a resumed run neither repeats an evaluation nor forgets its figures."""
        return {"evaluated_epoch": self._evaluated_epoch, "png_paths": [str(p) for p in self.png_paths]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (resuming a run)."""
        self._evaluated_epoch = state_dict.get("evaluated_epoch")
        self.png_paths = [Path(p) for p in state_dict.get("png_paths", [])]

    # --- helpers -------------------------------------------------------------------------------------------
    def _due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every_n_epochs == 0

    def _get_data(self, trainer: L.Trainer) -> dict[str, Any]:
        if self._data is not None:
            return self._data
        owner = "InfluenceMonitor"
        probe = find_probe(trainer, probe=self.probe, n=self.n_probe, seed=self.probe_seed, owner=owner)
        train = find_train_subset(trainer, data=self.train_data, n=self.n_train, seed=self.train_seed, owner=owner)
        self._data = {
            "probe": {"x": probe["x"], "y": probe["y"], "indices": probe["indices"]},
            "x_train": train["x"],
            "y_train": train["y"],
            "train_indices": train["indices"],
        }
        if len(self._data["probe"]["y"]) == 0:
            warnings.warn("InfluenceMonitor: the probe set is empty (data.probe_size=0)", stacklevel=2)
        return self._data

    def _run_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = self._get_data(trainer)
        if len(data["probe"]["y"]) == 0:
            return
        epoch = int(trainer.current_epoch)
        net = resolve_network(pl_module, self.model, "InfluenceMonitor")
        t0 = time.perf_counter()
        with preserve_training_state(pl_module, pl_module.device), preserve_training_state(net):
            rep = self.evaluate(net, data["probe"], data["x_train"], data["y_train"])
        rep["epoch"] = epoch
        rep["seconds"] = time.perf_counter() - t0
        self.last = rep
        self._evaluated_epoch = epoch
        scalars = {_PREFIX + k: v for k, v in rep["metrics"].items()}
        scalars[_PREFIX + "seconds"] = rep["seconds"]
        pl_module.log_dict(scalars, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        if trainer.is_global_zero and self.n_images_logged:
            self._log_images(trainer, rep, data)

    def _log_images(self, trainer: L.Trainer, rep: dict[str, Any], data: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        from fragdefense.influence.viz import influence_strip, plot_top_influential

        n = min(self.n_images_logged, len(rep["x"]))
        xtr, ytr = data["x_train"], data["y_train"]
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            images, captions = [], []
            for i in range(n):
                images.append(influence_strip(rep["x"][i], xtr[rep["top_clean"][i]]))
                captions.append(f"probe #{data['probe']['indices'][i]}: test image | top-{rep['top_clean'].shape[1]}")
                images.append(influence_strip(rep["x_adv"][i], xtr[rep["top_adv"][i]]))
                captions.append(
                    f"after {rep['attack']} (eps {self.eps * 255:.3g}/255): Spearman {float(rep['spearman'][i]):.2f}, "
                    f"top-k kept {int(rep['topk_kept'][i])}"
                )
            for lg in wandb_loggers:
                lg.log_image(key=_PREFIX + "top_influential", images=images, caption=captions, step=trainer.global_step)
        if not wandb_loggers or self.save_png:
            path = Path(trainer.default_root_dir) / "influence" / f"epoch_{rep['epoch']:03d}.png"
            m = rep["metrics"]
            a = rep["attack"]
            self.png_paths.append(
                plot_top_influential(
                    rep["x"][:n],
                    rep["x_adv"][:n],
                    xtr,
                    rep["top_clean"][:n],
                    rep["top_adv"][:n],
                    path,
                    title=(
                        f"epoch {rep['epoch']}: {a} attack eps {self.eps * 255:.3g}/255, Spearman "
                        f"{m.get(f'{a}/spearman', float('nan')):.2f}, "
                        f"top-k kept {m.get(f'{a}/topk_kept', float('nan')):.2f}"
                    ),
                    train_labels=ytr,
                )
            )
