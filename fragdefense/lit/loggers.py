"""Experiment loggers: Weights & Biases (automatically offline without an API key or network) beside a
CSV logger. Offline W&B runs are written under ``<run_dir>/wandb/offline-run-*`` and can be uploaded
later with ``wandb sync <that folder>``."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

__all__ = ["make_loggers", "resolve_wandb_mode"]

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def _reachable(timeout: float = 2.0) -> bool:
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = url.split("://")[-1].split("/")[0].split(":")[0]
    port = 443 if url.startswith("https") else 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``"online"``, ``"offline"`` or ``"disabled"``. ``auto``: online only with an API key (env
    ``WANDB_API_KEY`` or ``~/.netrc``) *and* a reachable server (2 s probe), else offline; an explicit
    ``WANDB_MODE`` environment variable wins over ``auto``."""
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"`mode` must be auto, online, offline or disabled, got {mode!r}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    if _has_api_key() and _reachable():
        return "online"
    return "offline"


def make_loggers(
    save_dir: str | os.PathLike,
    wandb: dict[str, Any] | None = None,
    csv: bool = True,
    run_id: str | None = None,
) -> list[Logger]:
    """Build the run's loggers.

    Args:
        save_dir: the run directory.
        wandb: ``WandbLogger`` options (``project``, ``entity``, ``tags``, ``group``, ``name``, ``mode``
            in auto/online/offline/disabled, ...); ``None`` disables W&B.
        csv: also write ``<save_dir>/csv/metrics.csv``.
        run_id: W&B run id to resume under.
    """
    save_dir = Path(save_dir)
    loggers: list[Logger] = []
    if csv:
        loggers.append(CSVLogger(save_dir=str(save_dir), name="csv", version=""))
    if wandb is not None:
        opts = dict(wandb)
        mode = resolve_wandb_mode(opts.pop("mode", "auto"))
        if mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            (save_dir / "wandb").parent.mkdir(parents=True, exist_ok=True)
            tags = list(opts.pop("tags", []) or [])
            if run_id is not None:
                opts.setdefault("id", run_id)
                opts.setdefault("resume", "allow")
            loggers.append(WandbLogger(save_dir=str(save_dir), offline=(mode == "offline"), tags=tags, **opts))
            log.info("W&B logging %s", mode)
    return loggers
