"""Experiment loggers: Weights & Biases (automatically offline without an API key or network) beside a
CSV logger. Offline W&B runs are written under ``<run_dir>/wandb/offline-run-*`` and can be uploaded
later with ``wandb sync <that folder>``. The CSV log continues across a resume: the rows of steps before the
checkpoint are kept, the rows of the steps trained again replace the old ones."""

from __future__ import annotations

import csv
import io
import logging
import netrc
import os
import socket
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["make_loggers", "resolve_wandb_mode", "ResumableCSVLogger", "wandb_base_url", "wandb_settings"]

#: seconds of the reachability probe of the W&B server, and wandb's own start-up limit (``init_timeout``)
PROBE_TIMEOUT_S = 3.0
INIT_TIMEOUT_S = 20.0

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = wandb_base_url().split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def wandb_base_url() -> str:
    """The W&B server: ``$WANDB_BASE_URL``, else wandb's configured ``base_url`` setting."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url
    try:
        import wandb

        return str(wandb.Settings().base_url)
    except Exception:  # noqa: BLE001 - wandb missing or its settings unreadable
        return "https://api.wandb.ai"


def _reachable(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """``(reachable, reason)``: a TCP connect to the W&B host. Name resolution has no timeout of its own, so the
    probe runs in a thread and counts as unreachable after ``timeout`` seconds whatever it is waiting for."""
    url = wandb_base_url()
    hostport = url.split("://")[-1].split("/")[0]
    host, _, port = hostport.partition(":")
    port_n = int(port) if port.isdigit() else (443 if url.startswith("https") else 80)
    result: list[str] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port_n), timeout=timeout):
                result.append("")
        except OSError as e:
            result.append(f"{type(e).__name__}: {e.strerror or e}")

    t = threading.Thread(target=probe, daemon=True, name="wandb-reachability-probe")
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return False, f"no answer from {host}:{port_n} within {timeout:g} s"
    return result[0] == "", result[0]


def wandb_settings(**kw: Any) -> Any:
    """``wandb.Settings`` with a start-up limit (``init_timeout``: ``$WANDB_INIT_TIMEOUT`` or 20 s instead of
    wandb's 90 s), so an unreachable server fails fast instead of hanging."""
    import wandb

    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
    return wandb.Settings(init_timeout=timeout, **kw)


def resolve_wandb_mode(mode: str = "auto", save_dir: str | os.PathLike | None = None) -> str:
    """``"online"``, ``"offline"`` or ``"disabled"``. ``auto``: online only with an API key (env
    ``WANDB_API_KEY`` or ``~/.netrc``) *and* a reachable server, else offline; an explicit ``WANDB_MODE``
    environment variable wins over ``auto``. Online (asked for or chosen) is always preceded by a 3 s
    reachability probe of the W&B host: an unreachable server gives offline with a warning saying how to upload the
    run later (``wandb sync <save_dir>/wandb/offline-run-*``) instead of wandb's 90 s hang and error.

    >>> resolve_wandb_mode("disabled"), resolve_wandb_mode("offline")
    ('disabled', 'offline')
    """
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"`mode` must be auto, online, offline or disabled, got {mode!r}")
    asked = mode
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        if env in ("online", "offline", "disabled", "dryrun"):
            mode, asked = ("offline" if env == "dryrun" else env), f"WANDB_MODE={env}"
        elif not _has_api_key():
            return "offline"
        else:
            mode = "online"
    if mode != "online":
        return mode
    ok, why = _reachable()
    if ok:
        return "online"
    where = Path(save_dir) / "wandb" / "offline-run-*" if save_dir is not None else "<dir>/wandb/offline-run-*"
    log.warning(
        "W&B: %s asks for online logging but the W&B server %s is unreachable (%s); logging OFFLINE instead. "
        "Upload the run later with: wandb sync %s",
        "mode=online" if asked == "online" else asked if asked != "auto" else "an API key",
        wandb_base_url(),
        why,
        where,
    )
    return "offline"


class _ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv``: with ``keep_below_step`` (a resume from a
    checkpoint at that global step) the rows of earlier steps are kept and the later ones dropped (they are logged
    again); without it an existing file is moved aside to ``metrics.csv.prev-<time>`` (nothing is deleted)."""

    def __init__(self, log_dir: str, keep_below_step: int | None) -> None:
        self._keep_below_step = keep_below_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._keep_below_step is None:
            os.replace(path, path.with_name(f"{path.name}.prev-{datetime.now().strftime('%Y%m%d-%H%M%S')}"))
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _step_of(r) < self._keep_below_step]
        from fragdefense.utils.io import atomic_write_text

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(path, buf.getvalue())
        self.metrics_keys = sorted(keys)  # the header of the continued file


def _step_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")  # (nan < step is False: an unreadable row is dropped, it is logged again)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/<name>/metrics.csv`` that continues the history of a resumed run (see
    :class:`_ResumableWriter`; ``resume_step``: the global step of the checkpoint resumed from, ``None`` for a
    fresh run) and writes every row at once (a killed run loses no logged row).

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> lg = ResumableCSVLogger(d, name="csv", version="")
    >>> lg.log_metrics({"a": 1.0}, step=0); lg.save()
    >>> (Path(d) / "csv" / "metrics.csv").read_text().splitlines()
    ['a,step', '1.0,0']
    """

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("flush_logs_every_n_steps", 1)
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is not None:
            return self._experiment
        os.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ResumableWriter(self.log_dir, self.resume_step)
        return self._experiment

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        self.save()  # a row per call, written at once (the default waits for 100 steps; a kill loses them)


def make_loggers(
    save_dir: str | os.PathLike,
    wandb: dict[str, Any] | None = None,
    csv: bool = True,
    run_id: str | None = None,
    resume_step: int | None = None,
) -> list[Logger]:
    """Build the run's loggers.

    Args:
        save_dir: the run directory.
        wandb: ``WandbLogger`` options (``project``, ``entity``, ``tags``, ``group``, ``name``, ``mode``
            in auto/online/offline/disabled, ...); ``None`` disables W&B.
        csv: also write ``<save_dir>/csv/metrics.csv``.
        run_id: W&B run id to resume under.
        resume_step: the global step of the checkpoint the run resumes from (``None``: a fresh run); the CSV log
            keeps its rows of earlier steps (:class:`ResumableCSVLogger`).
    """
    save_dir = Path(save_dir)
    loggers: list[Logger] = []
    if csv:
        loggers.append(ResumableCSVLogger(save_dir=str(save_dir), name="csv", version="", resume_step=resume_step))
    if wandb is not None:
        opts = dict(wandb)
        mode = resolve_wandb_mode(opts.pop("mode", "auto"), save_dir)
        if mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            (save_dir / "wandb").parent.mkdir(parents=True, exist_ok=True)
            tags = list(opts.pop("tags", []) or [])
            if run_id is not None:
                opts.setdefault("id", run_id)
                opts.setdefault("resume", "allow")
            opts.setdefault("settings", wandb_settings())
            loggers.append(WandbLogger(save_dir=str(save_dir), offline=(mode == "offline"), tags=tags, **opts))
            log.info("W&B logging %s", mode)
    return loggers
