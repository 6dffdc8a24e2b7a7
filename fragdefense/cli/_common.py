"""Pieces the commands share: device choice, the model from a config, a seeded image subset, and the checks of
the config keys every command has (seed, device, the model source), on :mod:`fragdefense.utils.checks`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from fragdefense.models import create_model, list_models, load_checkpoint_model
from fragdefense.utils.checks import (
    check_device,
    check_file,
    check_finite_float,
    check_int_in_range,
    optional,
)

__all__ = [
    "resolve_device",
    "load_model",
    "selected_indices",
    "select_images",
    "import_plugins",
    "check_model_name",
    "check_beta",
    "check_mapping",
    "check_file_list",
    "check_seed",
    "common_spec",
    "require_model_source",
]


def check_seed(v: Any, name: str = "seed") -> int:
    """A seed: an int ``>= 0``.

    >>> check_seed(0)
    0
    """
    return check_int_in_range(v, name, 0)


def check_model_name(v: Any, name: str = "model_name") -> str:
    """A registered model name, ``torchvision.<name>`` or ``timm.<name>`` (plugins are imported before the check).

    >>> check_model_name("small_cnn")
    'small_cnn'
    """
    if not isinstance(v, str) or not v:
        raise TypeError(f"`{name}` must be a model name string, got {v!r}")
    if not (v.startswith(("torchvision.", "timm.")) or v in list_models()):
        raise ValueError(
            f"unknown model `{name}`={v!r}; registered: {', '.join(list_models())} (or 'torchvision.<name>', "
            "'timm.<name>')"
        )
    return v


def check_beta(v: Any, name: str = "beta") -> float | list[float]:
    """A softplus beta: a number ``> 0`` or a ``[start, end]`` pair of them (a schedule).

    >>> check_beta(10.0), check_beta([10, 100])
    (10.0, [10.0, 100.0])
    """
    if isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, (str, Mapping))):
        vals = list(v)
        if len(vals) != 2:
            raise ValueError(f"`{name}` must be a number > 0 or a [start, end] pair of numbers > 0, got {v!r}")
        return [check_finite_float(b, name, 0.0, lo_open=True) for b in vals]
    return check_finite_float(v, name, 0.0, lo_open=True)


def check_mapping(v: Any, name: str) -> dict:
    """A mapping (e.g. ``model_kwargs: {width: 64}``).

    >>> check_mapping({"width": 8}, "model_kwargs")
    {'width': 8}
    """
    if not isinstance(v, Mapping):
        raise TypeError(f"`{name}` must be a mapping such as {{width: 64}}, got {v!r}")
    return dict(v)


def check_file_list(v: Any, name: str) -> list[str]:
    """A (possibly empty) list of existing files.

    >>> check_file_list([], "checkpoints")
    []
    """
    if isinstance(v, str) or not hasattr(v, "__iter__") or isinstance(v, Mapping):
        raise TypeError(f"`{name}` must be a list of file paths such as [a.ckpt, b.ckpt], got {v!r}")
    return [check_file(p, name) for p in v]


def common_spec() -> dict[str, Callable[[Any, str], Any]]:
    """Checks of the keys every command shares: ``seed``, ``device``, ``checkpoint``, ``model_name``,
    ``weights_path``, ``model_kwargs``, ``checkpoints`` (for :func:`fragdefense.utils.checks.validate_config`)."""
    return {
        "seed": check_seed,
        "device": check_device,
        "checkpoint": optional(check_file),
        "checkpoints": optional(check_file_list),
        "model_name": optional(check_model_name),
        "weights_path": optional(check_file),
        "model_kwargs": optional(check_mapping),
    }


def require_model_source(cfg: Any, *extra: str) -> None:
    """``ValueError`` unless the config names a model (``checkpoint``, ``model_name`` or one of ``extra``)."""
    keys = ("checkpoint", "model_name", *extra)
    if not any(cfg.get(k) for k in keys):
        alts = {"checkpoints": "`checkpoints=[...]`", "run_dir": "`run_dir=<train run>`"}
        more = "".join(f", {alts.get(k, k)}" for k in extra)
        raise ValueError(
            f"give `checkpoint=<path to a fragdefense-train .ckpt>`, `model_name=<name> weights_path=<file>`{more}"
        )


def import_plugins(cfg: DictConfig | dict) -> list[str]:
    """Import the modules listed in the config's ``plugins`` (e.g. ``plugins=[my_lab.explainers]``) before a command
    runs, so their ``register_model`` / ``register_attack`` / ``register_metric`` / ``register_attribution`` /
    ``register_regularizer`` calls take effect. Returns the imported names; a module that cannot be imported is an
    error naming it, before any work.

    >>> import_plugins({"plugins": ["json"]})
    ['json']
    """
    import importlib

    names = cfg.get("plugins") or []
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        try:
            importlib.import_module(str(name))
        except ImportError as e:
            raise ValueError(
                f"`plugins` entry {name!r} cannot be imported ({type(e).__name__}: {e}); give importable module "
                "names (on PYTHONPATH or installed)"
            ) from e
        out.append(str(name))
    return out


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU) or any ``torch.device`` string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(cfg: DictConfig, datamodule: Any) -> torch.nn.Module:
    """The model a command's config names: ``checkpoint=`` (a fragdefense-train checkpoint) or ``model_name=`` +
    ``weights_path=`` (+ ``model_kwargs``), normalised with the data module's statistics; in eval mode."""
    if cfg.get("checkpoint"):
        return load_checkpoint_model(cfg.checkpoint)
    if cfg.get("model_name"):
        return create_model(
            cfg.model_name,
            num_classes=datamodule.num_classes,
            mean=datamodule.mean,
            std=datamodule.std,
            weights_path=cfg.get("weights_path"),
            **(cfg.get("model_kwargs") or {}),
        ).eval()
    raise ValueError("give `checkpoint=<path to a fragdefense-train .ckpt>` or `model_name=<name> weights_path=<file>`")


def selected_indices(n_dataset: int, n: int, seed: int) -> list[int]:
    """The sorted indices of ``min(n, n_dataset)`` items drawn with ``seed`` (every command's image selection).

    >>> selected_indices(10, 3, 0) == selected_indices(10, 3, 0), len(selected_indices(4, 9, 0))
    (True, 4)
    """
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_dataset, generator=g)[: min(n, n_dataset)].tolist())


def select_images(dataset: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``min(n, len(dataset))`` images drawn with ``seed`` (sorted indices): ``(x, y, indices)``."""
    idx = selected_indices(len(dataset), n, seed)
    items = [dataset[i] for i in idx]
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items]), idx
