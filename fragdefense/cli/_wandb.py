"""One W&B run per command (``fragdefense-eval``, ``-influence``, ``-hessian``), with the training's rule: online
with an API key and a reachable server, else offline (``wandb sync <out_dir>/wandb/offline-run-*`` uploads
later); ``wandb.mode=disabled`` turns it off. A rerun in the same ``out_dir`` continues the same run (its id is
kept in ``<out_dir>/wandb_id.txt``). An unreachable server never hangs a command: online is preceded by a 3 s
reachability probe, wandb's own start-up is limited (``init_timeout``), and either failure logs offline with a
warning saying how to upload later."""

from __future__ import annotations

import logging
import numbers
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fragdefense.lit.loggers import resolve_wandb_mode, wandb_settings

__all__ = [
    "start_wandb_run",
    "wandb_run",
    "flat_scalars",
    "log_scalars",
    "log_figure",
    "log_artifact_file",
    "log_markdown_table",
]

log = logging.getLogger(__name__)


def start_wandb_run(
    out_dir: str | os.PathLike,
    job_type: str,
    config: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """Start (or resume) the command's W&B run in ``out_dir``; returns the run, or ``None`` when disabled.

    Args:
        out_dir: the command's output directory (the run lives in ``<out_dir>/wandb``).
        job_type: ``"eval"``, ``"influence"``, ``"hessian"``.
        config: the resolved command config (stored with the run).
        options: the config's ``wandb`` node: ``project``, ``entity``, ``group``, ``name``, ``tags``, ``mode``
            (auto | online | offline | disabled).
    """
    opts = dict(options or {})
    mode = resolve_wandb_mode(str(opts.pop("mode", "auto")), out_dir)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    id_file = out / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    if not id_file.is_file():
        id_file.write_text(run_id)
    tags = [str(t) for t in (opts.pop("tags", None) or [])]
    kw = dict(
        dir=str(out),
        id=run_id,
        resume="allow",
        job_type=job_type,
        config=dict(config or {}),
        tags=tags,
        project=opts.pop("project", None) or "fragdefense",
        **{k: v for k, v in opts.items() if v is not None},
    )
    kw.setdefault("settings", wandb_settings())
    try:
        run = wandb.init(mode=mode, **kw)
    except Exception as e:  # noqa: BLE001 - wandb raises its own error types (CommError, timeouts)
        if mode != "online":
            raise
        log.warning(
            "W&B: the online start failed (%s: %s); logging OFFLINE instead. Upload later with: wandb sync %s",
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
            out / "wandb" / "offline-run-*",
        )
        mode = "offline"
        wandb.teardown()  # the failed start still holds the run id in wandb's service
        run = wandb.init(mode=mode, **kw)
    log.info("W&B run %s (%s) in %s", run.id, mode, out / "wandb")
    return run


@contextmanager
def wandb_run(
    out_dir: str | os.PathLike,
    job_type: str,
    config: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """:func:`start_wandb_run` as a context manager: yields the run (``None`` when ``options`` is ``None`` or its
    mode is ``disabled``) and finishes it on exit, with exit code 1 when the body raised (the run shows as failed)."""
    run = None if options is None else start_wandb_run(out_dir, job_type, config, options)
    failed = False
    try:
        yield run
    except BaseException:
        failed = True
        raise
    finally:
        if run is not None:
            run.finish(exit_code=1 if failed else None)


def flat_scalars(payload: Mapping[str, Any], skip: tuple[str, ...] = ("config",), prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) results dict, keyed by their ``/``-joined path (``attacks/gradient/spearman``);
    values in lists, strings and booleans are left out, and so are the top-level keys in ``skip``."""
    out: dict[str, float] = {}
    for k, v in payload.items():
        if not prefix and k in skip:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_scalars(v, skip, f"{key}/"))
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            out[key] = int(v) if isinstance(v, numbers.Integral) else float(v)
    return out


def log_scalars(
    run: Any, payload: Mapping[str, Any], skip: tuple[str, ...] = ("config",), commit: bool | None = None
) -> dict[str, float]:
    """Log :func:`flat_scalars` of ``payload`` (they also become the run's summary); returns them."""
    scalars = flat_scalars(payload, skip)
    if run is not None and scalars:
        run.log(scalars, commit=commit)
    return scalars


def log_figure(run: Any, key: str, path: str | os.PathLike, commit: bool | None = None) -> None:
    """Log a PNG file as a W&B image (nothing when ``run`` is ``None`` or the file is missing); ``commit=False``
    adds it to the current step instead of closing one."""
    if run is None or not Path(path).is_file():
        return
    import wandb

    run.log({key: wandb.Image(str(path))}, commit=commit)


def log_artifact_file(run: Any, name: str, kind: str, *paths: str | os.PathLike) -> None:
    """Log files as one W&B artifact (e.g. ``results.json``)."""
    if run is None:
        return
    import wandb

    art = wandb.Artifact(name, type=kind)
    for p in paths:
        if Path(p).is_file():
            art.add_file(str(p))
    run.log_artifact(art)


def log_markdown_table(run: Any, key: str, rows: list[Mapping[str, Any]], commit: bool | None = None) -> None:
    """Log a list of flat dicts as a ``wandb.Table`` (columns from the union of their keys, in first-seen order;
    lists and other values as text); ``commit=False`` adds it to the current step instead of closing one."""
    if run is None or not rows:
        return
    import wandb

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    data = [[_plain(r.get(c)) for c in cols] for r in rows]
    # mixed types in a column (a number in one row, None or text in another) must not fail the command at its end
    run.log({key: wandb.Table(columns=cols, data=data, allow_mixed_types=True)}, commit=commit)


def _plain(v: Any) -> Any:
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, numbers.Integral):  # also numpy / torch integer scalars
        return int(v)
    if isinstance(v, numbers.Real):  # also numpy floats
        return float(v)
    return str(v)
