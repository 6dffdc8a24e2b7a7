"""Pieces the commands share: device choice, the model from a config, a seeded image subset."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from fragdefense.models import create_model, load_checkpoint_model

__all__ = ["resolve_device", "load_model", "selected_indices", "select_images", "import_plugins"]


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
