"""Locating the packaged YAML configs (``fragdefense/configs``) and composing them outside of ``@hydra.main``
(tests, notebooks)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

__all__ = ["config_dir", "compose_config"]


def config_dir() -> str:
    """Absolute path of the packaged ``fragdefense/configs/`` folder (``$FRAGDEFENSE_CONFIG_DIR`` overrides).

    The YAML files ship inside the package (wheel and editable installs alike), so the commands find them
    from any working directory.
    """
    env = os.environ.get("FRAGDEFENSE_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1] / "configs")
    for c in candidates:
        if (c / "train.yaml").is_file():
            return str(c)
    raise FileNotFoundError(
        f"cannot find the fragdefense configs (train.yaml) in {', '.join(str(c) for c in candidates)}; "
        "the installed package is incomplete (reinstall fragdefense) or FRAGDEFENSE_CONFIG_DIR points elsewhere"
    )


def compose_config(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config exactly as the command line would (without changing directory or logging).

    >>> cfg = compose_config("train", ["trainer.max_epochs=1"])
    >>> cfg.trainer.max_epochs
    1
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
