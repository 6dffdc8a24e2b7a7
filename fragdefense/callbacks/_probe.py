"""What the monitors evaluate, from any data and any LightningModule (shared by the three monitors).

* **Images** (:func:`find_probe`, :func:`find_train_subset`, :func:`images_from`): an explicit source given to
  the monitor (an ``(x, y)`` pair, a dict with ``"x"`` / ``"y"``, a dataset, a ``DataLoader`` or any iterable of
  batches), else the datamodule's ``probe_batch()`` (every fragdefense datamodule), else the first images of
  its ``val_dataloader()``, ``test_dataloader()`` or ``train_dataloader()`` (or of the dataloaders given to
  ``fit``). Loaders are read with their RNGs seeded by a fixed seed (so shuffled loaders give the same images
  every time) and the global RNGs and every loader generator restored afterwards (training is not disturbed).
  Images must be ``(N, C, H, W)`` floats in ``[0, 1]``: the models normalise inside.
* **Network** (:func:`resolve_network`): ``model=None`` takes ``pl_module.model`` when it is an ``nn.Module``,
  else the LightningModule itself; a string is an attribute path of the LightningModule (``"net"``,
  ``"ema.module"``); a callable maps the LightningModule to the network.

>>> x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
>>> p = images_from((x, y), 4, owner="FragilityMonitor")
>>> p["x"].shape, p["indices"]
(torch.Size([4, 3, 8, 8]), [0, 1, 2, 3])
>>> from torch.utils.data import TensorDataset
>>> loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
>>> torch.equal(images_from(loader, 5)["y"], images_from(loader, 5)["y"])  # seeded: the same images every time
True
>>> images_from((torch.full((2, 3, 8, 8), -1.5), y[:2]), owner="HessianMonitor")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: HessianMonitor: the probe images must be ... in [0, 1] ..., got values in [-1.5, -1.5]; is the data ...
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ImageSource",
    "NetworkSpec",
    "images_from",
    "find_probe",
    "find_train_subset",
    "check_images",
    "check_network_spec",
    "resolve_network",
]

#: An explicit image source: ``(x, y)``, ``{"x", "y"[, "mask", "indices"]}``, a dataset, a DataLoader or an iterable
#: of ``(x, y)`` / dict batches.
ImageSource = tuple | Mapping | Dataset | DataLoader | Iterable
#: How a monitor finds the network: ``None``, an attribute path of the LightningModule, or ``pl_module -> nn.Module``.
NetworkSpec = str | Callable[[L.LightningModule], nn.Module] | None

_X_KEYS = ("x", "image", "images", "input", "inputs", "pixel_values", "img")
_Y_KEYS = ("y", "label", "labels", "target", "targets")
_LOADER_HOOKS = ("val_dataloader", "test_dataloader", "train_dataloader")


# --- the network --------------------------------------------------------------------------------------------------
def check_network_spec(model: Any, owner: str) -> NetworkSpec:
    """``model`` if it is ``None``, a non-empty attribute path or a callable; ``TypeError`` otherwise."""
    if model is None or callable(model) or (isinstance(model, str) and model.strip()):
        return model
    raise TypeError(
        f"{owner}: `model` must be None (pl_module.model, else the LightningModule), an attribute path of the "
        f"LightningModule such as 'net' or 'ema.module', or a callable pl_module -> nn.Module; got {model!r}"
    )


def resolve_network(pl_module: nn.Module, model: NetworkSpec, owner: str) -> nn.Module:
    """The network a monitor evaluates (see the module docstring).

    >>> class Lit(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    >>> lit = Lit()
    >>> resolve_network(lit, None, "m") is lit, resolve_network(lit, "backbone.1", "m")
    (True, Linear(in_features=12, out_features=2, bias=True))
    >>> resolve_network(lit, lambda m: m.backbone, "m") is lit.backbone
    True
    """
    if model is None:
        net = getattr(pl_module, "model", None)
        return net if isinstance(net, nn.Module) else pl_module
    if isinstance(model, str):
        obj: Any = pl_module
        for part in model.strip().split("."):
            if not hasattr(obj, part):
                raise AttributeError(
                    f"{owner}: `model`={model!r}: {type(obj).__name__} has no attribute {part!r} (the attribute path "
                    "is read from the LightningModule)"
                )
            obj = getattr(obj, part)
    else:
        obj = model(pl_module)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{owner}: `model`={model!r} gave a {type(obj).__name__}, expected an nn.Module")
    return obj


# --- images -------------------------------------------------------------------------------------------------------
def check_images(x: Tensor, owner: str, what: str = "probe") -> None:
    """``ValueError`` naming ``owner`` unless ``x`` is a float ``(N, C, H, W)`` tensor with pixels in ``[0, 1]``."""
    form = (
        f"{owner}: the {what} images must be float tensors (N, C, H, W) with pixels in [0, 1] (the model normalises "
        "inside, e.g. fragdefense.models.ImageClassifier)"
    )
    if isinstance(x, Tensor) and x.numel() == 0:
        return  # an empty probe (probe_size=0): the monitors warn and skip
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{form}, got {got}")
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= -1e-6 and hi <= 1 + 1e-6):
        raise ValueError(
            f"{form}, got values in [{lo:.3g}, {hi:.3g}]; is the data already normalised (transforms.Normalize)? "
            "Move the normalisation into the model."
        )


def _split(batch: Any, owner: str) -> tuple[Any, Any, Any]:
    """``(x, y, mask or None)`` of one batch or one dataset item."""
    if isinstance(batch, Mapping):
        xk = next((k for k in _X_KEYS if k in batch), None)
        yk = next((k for k in _Y_KEYS if k in batch), None)
        if xk is None or yk is None:
            raise ValueError(
                f"{owner}: a batch dict needs an image key ({', '.join(_X_KEYS)}) and a label key "
                f"({', '.join(_Y_KEYS)}); got keys {sorted(map(str, batch))}"
            )
        return batch[xk], batch[yk], batch.get("mask")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1], None
    raise TypeError(
        f"{owner}: a batch must be an (x, y) pair or a dict with 'x' and 'y' (images in [0, 1], labels), "
        f"got {type(batch).__name__}"
    )


def _labels(y: Any) -> Tensor:
    return torch.as_tensor(y).reshape(-1).long()


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The generators a DataLoader draws its order from (its own, its sampler's, its batch sampler's sampler's)."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _read_batches(source: Iterable, n: int | None, seed: int, owner: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """The first ``n`` images of an iterable of batches, read with seeded RNGs that are restored afterwards."""
    from fragdefense.callbacks.fragility import preserve_training_state

    gens = _loader_generators(source)
    saved = [(g, g.get_state()) for g in gens]
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    ms: list[Tensor] = []
    have = 0
    try:
        with preserve_training_state(nn.Module()):  # torch CPU, python and numpy RNGs, grad mode
            import random

            import numpy as np

            torch.random.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            for g in gens:
                g.manual_seed(seed)
            for batch in source:
                if n is not None and have >= n:
                    break
                x, y, m = _split(batch, owner)
                x = torch.as_tensor(x)
                if x.ndim == 3:  # a single image (an iterable dataset)
                    x, m = x.unsqueeze(0), (torch.as_tensor(m).unsqueeze(0) if m is not None else None)
                take = x.shape[0] if n is None else min(x.shape[0], n - have)
                xs.append(x[:take].detach().cpu().clone())
                ys.append(_labels(y)[:take].cpu().clone())
                if m is not None:
                    ms.append(torch.as_tensor(m)[:take].detach().cpu().clone())
                have += take
    finally:
        for g, state in saved:
            g.set_state(state)
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.long), None
    mask = torch.cat(ms) if len(ms) == len(xs) else None
    return torch.cat(xs), torch.cat(ys), mask


def _from_dataset(ds: Any, n: int | None, seed: int, sample: bool, owner: str) -> dict[str, Any]:
    size = len(ds)
    k = size if n is None else min(n, size)
    if sample:
        g = torch.Generator().manual_seed(seed)
        pos = torch.randperm(size, generator=g)[:k].sort().values.tolist()
    else:
        pos = list(range(k))
    items = [_split(ds[i], owner) for i in pos]
    x = torch.stack([torch.as_tensor(it[0]) for it in items]) if items else torch.empty(0)
    y = torch.cat([_labels(it[1]) for it in items]) if items else torch.empty(0, dtype=torch.long)
    has_mask = bool(items) and all(it[2] is not None for it in items)
    mask = torch.stack([torch.as_tensor(it[2]) for it in items]) if has_mask else None
    return {"x": x, "y": y, "mask": mask, "indices": pos}


def _map_style(ds: Any) -> bool:
    return isinstance(ds, Sized) and hasattr(ds, "__getitem__") and not isinstance(ds, torch.utils.data.IterableDataset)


def images_from(
    source: ImageSource,
    n: int | None = None,
    *,
    seed: int = 0,
    sample: bool = False,
    owner: str = "monitor",
    what: str = "probe",
) -> dict[str, Any]:
    """``{"x": (N,C,H,W), "y": (N,), "mask": (N,H,W) or None, "indices": list}`` from an explicit source.

    Args:
        source: ``(x, y)``; a dict with ``"x"``, ``"y"`` (and optionally ``"mask"``, ``"indices"``, as
            ``probe_batch()`` returns); a map-style dataset of ``(image, label)`` items; a ``DataLoader`` or any
            iterable of ``(x, y)`` / dict batches.
        n: at most this many images (``None``: all).
        seed: seed of the loader's RNGs while it is read (and of the subset with ``sample``).
        sample: draw a seeded random subset of ``n`` images of a tensor pair or a dataset (also the dataset behind
            a ``DataLoader``) instead of the first ``n``.
        owner, what: named in error messages.
    """
    with torch.inference_mode(False):
        if isinstance(source, (tuple, list, Mapping)):
            x, y, m = _split(source, owner)
            x, y = torch.as_tensor(x), _labels(y)
            if len(x) != len(y):
                raise ValueError(f"{owner}: the {what} images and labels differ in length ({len(x)} vs {len(y)})")
            k = len(y) if n is None else min(n, len(y))
            if sample:
                pos = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:k].sort().values.tolist()
            else:
                pos = list(range(k))
            given = source.get("indices") if isinstance(source, Mapping) else None
            out = {
                "x": x[pos].detach().clone(),
                "y": y[pos].clone(),
                "mask": torch.as_tensor(m)[pos].clone() if m is not None else None,
                "indices": [int(given[p]) for p in pos] if given is not None else pos,
            }
        elif sample and isinstance(source, DataLoader) and _map_style(source.dataset):
            out = _from_dataset(source.dataset, n, seed, True, owner)
        elif isinstance(source, Dataset) and _map_style(source):
            out = _from_dataset(source, n, seed, sample, owner)
        elif isinstance(source, Iterable) and not isinstance(source, (str, bytes, Tensor)):
            x, y, m = _read_batches(source, n, seed, owner)
            out = {"x": x, "y": y, "mask": m, "indices": list(range(len(y)))}
        else:
            raise TypeError(
                f"{owner}: the {what} source must be an (x, y) pair, a dict with 'x' and 'y', a dataset, a DataLoader "
                f"or an iterable of (x, y) batches; got {type(source).__name__}"
            )
    out["x"] = out["x"].float() if out["x"].dtype == torch.float64 else out["x"]
    check_images(out["x"], owner, what)
    return out


def _first_loader(obj: Any) -> Any:
    """One loader out of what a ``*_dataloader()`` hook returned (a loader, a list / dict of loaders, or empty)."""
    if isinstance(obj, Mapping):
        obj = next(iter(obj.values()), None)
    elif isinstance(obj, (list, tuple)) and not (len(obj) == 2 and isinstance(obj[0], Tensor)):
        obj = obj[0] if obj else None
    return obj


def _hook_sources(trainer: L.Trainer, hooks: tuple[str, ...]) -> list[tuple[str, Callable[[], Any]]]:
    """``(description, get_loader)`` for each ``*_dataloader`` hook of the datamodule, or of the LightningModule /
    the dataloaders given to ``fit`` / ``validate`` when there is no datamodule."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    dm = getattr(trainer, "datamodule", None)
    out: list[tuple[str, Callable[[], Any]]] = []
    if dm is not None:
        for h in hooks:
            if is_overridden(h, dm, parent=L.LightningDataModule):
                out.append((f"datamodule.{h}()", getattr(dm, h)))
        return out
    loops = {
        "val_dataloader": ("fit_loop.epoch_loop.val_loop", "validate_loop"),
        "test_dataloader": ("test_loop",),
        "train_dataloader": ("fit_loop",),
    }
    for h in hooks:
        for path in loops[h]:
            loop: Any = trainer
            for part in path.split("."):
                loop = getattr(loop, part, None)
            inst = getattr(getattr(loop, "_data_source", None), "instance", None)  # Lightning's record of the source
            if inst is None:
                continue
            if isinstance(inst, L.LightningModule):
                if is_overridden(h, inst, parent=L.LightningModule):
                    out.append((f"LightningModule.{h}()", getattr(inst, h)))
            elif not isinstance(inst, L.LightningDataModule):
                out.append((f"the {h.split('_')[0]} dataloaders given to the trainer", lambda inst=inst: inst))
            break
    return out


def _from_hooks(
    trainer: L.Trainer, hooks: tuple[str, ...], n: int | None, seed: int, sample: bool, owner: str, what: str
) -> tuple[dict[str, Any] | None, list[str]]:
    tried: list[str] = []
    for name, get in _hook_sources(trainer, hooks):
        try:
            with torch.inference_mode(False):
                loader = _first_loader(get())
        except Exception as e:  # noqa: BLE001 - e.g. a split that this stage's setup() did not create
            tried.append(f"{name} raised {type(e).__name__}: {e}")
            warnings.warn(f"{owner}: {name} raised {type(e).__name__} ({e}); trying the next source", stacklevel=3)
            continue
        if loader is None:
            tried.append(f"{name} returned no loader")
            continue
        out = images_from(loader, n, seed=seed, sample=sample, owner=owner, what=what)
        if len(out["y"]):
            return out, tried
        tried.append(f"{name} gave no images")
    return None, tried


def find_probe(
    trainer: L.Trainer, *, probe: ImageSource | None = None, n: int | None = None, seed: int = 0, owner: str
) -> dict[str, Any]:
    """The probe images of a monitor: ``probe`` when given, else the datamodule's ``probe_batch()``, else the
    first ``n`` images of ``val_dataloader()``, ``test_dataloader()`` or ``train_dataloader()`` (read with
    ``seed``). ``RuntimeError`` naming ``owner`` when there is no source."""
    if probe is not None:
        return images_from(probe, n, seed=seed, owner=owner)
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and callable(getattr(dm, "probe_batch", None)):
        with torch.inference_mode(False):
            return images_from(dm.probe_batch(), n, owner=owner)
    out, tried = _from_hooks(trainer, _LOADER_HOOKS, n, seed, False, owner, "probe")
    if out is None:
        raise RuntimeError(
            f"{owner} found no probe images: pass `probe=` to the monitor (an (x, y) pair or a DataLoader), or fit "
            "with a datamodule that has probe_batch() (every fragdefense datamodule) or a val / test / train "
            "dataloader" + (f" (tried: {'; '.join(tried)})" if tried else "")
        )
    return out


def find_train_subset(
    trainer: L.Trainer, *, data: ImageSource | None = None, n: int, seed: int = 0, owner: str
) -> dict[str, Any]:
    """A seeded subset of ``n`` training images: from ``data`` when given, else the datamodule's ``train_set``
    (fragdefense datamodules, seen without per-image augmentation), else the dataset behind its (or ``fit``'s)
    ``train_dataloader()`` (the first ``n`` images of the loader when it has no map-style dataset)."""
    if data is not None:
        return images_from(data, n, seed=seed, sample=True, owner=owner, what="training")
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and hasattr(dm, "probe_batch") and hasattr(dm, "train_set"):
        with torch.inference_mode(False):
            if dm.train_set is None:
                dm.setup("fit")
            ds = dm.train_set
            if isinstance(ds, torch.utils.data.Subset) and hasattr(dm, "_eval_view"):
                ds = torch.utils.data.Subset(dm._eval_view(ds.dataset), ds.indices)  # no per-image augmentation
        return images_from(ds, n, seed=seed, sample=True, owner=owner, what="training")
    out, tried = _from_hooks(trainer, ("train_dataloader",), n, seed, True, owner, "training")
    if out is None:
        raise RuntimeError(
            f"{owner} found no training images: pass `train_data=` to the monitor (an (x, y) pair, a dataset or a "
            "DataLoader), or fit with a datamodule / dataloaders" + (f" (tried: {'; '.join(tried)})" if tried else "")
        )
    return out
