"""``fragdefense-train``: train a classifier (optionally with a defense) from a Hydra config.

``train(cfg)`` is a plain function (tests call it with a composed config); ``main`` is the Hydra shell.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf

from fragdefense.callbacks import FragilityMonitor, HessianMonitor
from fragdefense.cli._common import import_plugins
from fragdefense.cli._config import config_dir
from fragdefense.models import model_config_for_checkpoint
from fragdefense.utils.checks import (
    check_bool,
    check_choice,
    check_finite_float,
    check_int_in_range,
    check_positive_int,
    check_probability,
    optional,
    validate_config,
)
from fragdefense.utils.io import RunDirLock, atomic_write_json, atomic_write_text

__all__ = ["train", "main", "validate_train_config"]

log = logging.getLogger("fragdefense.train")


def _resolve_run_dir(cfg: DictConfig) -> Path:
    try:
        rd = cfg.run_dir
    except Exception:  # noqa: BLE001 - ${hydra:...} is unresolvable outside @hydra.main
        rd = None
    if not rd:
        rd = os.path.join("runs", str(cfg.get("task_name", "train")), datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    return Path(rd).absolute()


def _is_set(node: Any) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) else v


def _read_checkpoint(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint's contents (tensors memory-mapped, not read) or ``(None, reason)`` when it cannot be read
    (truncated or corrupted by a kill during the write, not a zip archive, unpicklable)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # CRC of every member: catches truncation and torn writes
        if bad is not None:
            return None, f"member {bad!r} fails its CRC check"
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - zipfile, pickle and torch raise many types for a broken file
        return None, f"{type(e).__name__}: {e}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return None, "not a Lightning checkpoint (no state_dict)"
    return ckpt, ""


def _resume_checkpoint(cfg: DictConfig, run_dir: Path) -> tuple[str | None, dict[str, Any] | None]:
    """``(path, contents)`` of the checkpoint to resume from: ``ckpt_path`` when given; with ``resume=auto`` the
    run directory's ``checkpoints/last.ckpt`` if present. An unreadable ``last.ckpt`` (a kill during its write) is
    renamed ``last.ckpt.corrupt-<time>`` (kept, not deleted) and the newest readable checkpoint of ``checkpoints/``
    is used instead, with a warning naming both; an unreadable ``ckpt_path`` is an error naming it."""
    if cfg.get("ckpt_path"):
        path = Path(str(cfg.ckpt_path))
        if not path.is_file():
            raise FileNotFoundError(f"`ckpt_path`={str(path)!r} does not exist; give a fragdefense-train .ckpt file")
        ckpt, why = _read_checkpoint(path)
        if ckpt is None:
            raise ValueError(
                f"`ckpt_path`={str(path)!r} cannot be read ({why}); it is truncated or corrupted. Give another "
                "checkpoint (e.g. a best-*.ckpt of the same run) or start from scratch without ckpt_path"
            )
        return str(path), ckpt
    mode = cfg.get("resume", "never")
    if mode not in ("auto", "never"):
        raise ValueError(f"`resume` must be 'auto' or 'never', got {mode!r}")
    last = run_dir / "checkpoints" / "last.ckpt"
    if mode != "auto" or not last.is_file():
        return None, None
    ckpt, why = _read_checkpoint(last)
    if ckpt is not None:
        log.info("resuming from %s (resume=auto)", last)
        return str(last), ckpt
    kept = last.with_name(f"last.ckpt.corrupt-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    os.replace(last, kept)
    candidates = []
    for p in (run_dir / "checkpoints").glob("*.ckpt"):
        c, _ = _read_checkpoint(p)
        if c is not None:
            candidates.append((int(c.get("global_step", -1)), p.stat().st_mtime, p, c))
    if not candidates:
        raise RuntimeError(
            f"cannot resume: {last} is unreadable ({why}; kept as {kept.name}) and {last.parent} holds no other "
            "readable checkpoint. Start over in this run_dir with resume=never (the old files stay), or give "
            "ckpt_path=<a readable checkpoint>"
        )
    step, _, path, c = max(candidates, key=lambda t: (t[0], t[1]))
    msg = (
        f"RESUME FALLBACK: {last} is unreadable ({why}); it is kept as {kept}. Resuming from the newest readable "
        f"checkpoint {path} (epoch {int(c.get('epoch', -1)) + 1} done, step {step}): the epochs after it are trained "
        "again"
    )
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return str(path), c


def _check_schedule_resume(cfg: DictConfig, ckpt: dict[str, Any]) -> None:
    """Refuse, before any data is read, to resume a OneCycle schedule planned for another length (its shape
    depends on the total number of steps; the checkpoint records the trainer's max_epochs / max_steps)."""
    name = (cfg.module.get("scheduler") or {}).get("name")
    planned = ckpt.get("fragdefense_schedule") or {}
    if name != "onecycle" or planned.get("name") != "onecycle":
        return
    for key in ("max_epochs", "max_steps"):
        old, new = planned.get(key), cfg.trainer.get(key, -1 if key == "max_steps" else None)
        if old is not None and new is not None and int(old) != int(new):
            raise ValueError(
                f"cannot resume: the checkpoint's OneCycle learning-rate schedule (`module.scheduler.name`="
                f"'onecycle') was planned for trainer.{key}={old} ({planned.get('total_steps')} steps), this run asks "
                f"`trainer.{key}`={new}. OneCycle's shape depends on the total length, so it cannot be extended or "
                f"shortened. Resume with trainer.{key}={old}, start a new run_dir (or resume=never), or train with "
                "an epoch-count-independent schedule (module.scheduler.name=step, or cosine, which is re-stretched "
                "over the new length)"
            )


class _FitStarted(L.Callback):
    """Records whether ``Trainer.fit`` trained at all (it skips every hook when the checkpoint is already at
    ``max_epochs``)."""

    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = True


# ----------------------------------------------------------------------------------- config checks (up front)


def _int_or(*allowed: int, lo: int = 1, hint: str = "") -> Any:
    """``check(v, key)``: an int ``>= lo`` or one of ``allowed`` (e.g. -1: no limit)."""

    def check(v: Any, key: str) -> Any:
        if v in allowed and not isinstance(v, bool):
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"`{key}` must be an int >= {lo}{hint}, got {v!r} ({type(v).__name__})")
        return check_int_in_range(v, key, lo)

    return check


def _batches(lo: int) -> Any:
    """Lightning's int-or-fraction keys (``limit_*_batches``, ``val_check_interval``)."""

    def check(v: Any, key: str) -> Any:
        if isinstance(v, float):
            return check_probability(v, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"`{key}` must be an int >= {lo} (batches) or a float in [0, 1] (fraction), got {v!r}")
        return v

    return check


_SCHEDULERS = ("onecycle", "cosine", "step", "none")
_POS = {"lo": 0.0, "lo_open": True}


def _float(**bounds: Any) -> Any:
    return optional(lambda v, key: check_finite_float(v, key, **bounds))


def _train_spec(cfg: DictConfig) -> dict[str, Any]:
    """The check of every numeric / choice key of the train config (for :func:`validate_config`)."""
    spec: dict[str, Any] = {
        "seed": lambda v, k: check_int_in_range(v, k, 0),
        "trainer.max_epochs": optional(_int_or(-1, hint=" (or -1: no limit)")),
        "trainer.min_epochs": optional(lambda v, k: check_int_in_range(v, k, 0)),
        "trainer.max_steps": optional(_int_or(-1, hint=" (or -1: no limit)")),
        "trainer.min_steps": optional(lambda v, k: check_int_in_range(v, k, 0)),
        "trainer.log_every_n_steps": optional(check_positive_int),
        "trainer.check_val_every_n_epoch": optional(check_positive_int),
        "trainer.num_sanity_val_steps": optional(_int_or(-1, lo=0, hint=" (or -1: all)")),
        "trainer.accumulate_grad_batches": optional(check_positive_int),
        "trainer.num_nodes": optional(check_positive_int),
        "trainer.gradient_clip_val": _float(lo=0.0),
        "trainer.limit_train_batches": optional(_batches(0)),
        "trainer.limit_val_batches": optional(_batches(0)),
        "trainer.limit_test_batches": optional(_batches(0)),
        "trainer.val_check_interval": optional(_batches(1)),
        "module.optimizer.lr": _float(**_POS),
        "module.optimizer.momentum": _float(lo=0.0, hi=1.0),
        "module.optimizer.weight_decay": _float(lo=0.0),
        "module.label_smoothing": _float(lo=0.0, hi=1.0),
        "module.scheduler.name": optional(lambda v, k: check_choice(v, k, _SCHEDULERS)),
        "data.val_fraction": _float(lo=0.0, hi=1.0),
        "test": check_bool,
        **{f"data.{k}": optional(check_positive_int) for k in ("batch_size", "eval_batch_size", "n_train", "n_test")},
        **{f"data.{k}": optional(lambda v, k: check_int_in_range(v, k, 0)) for k in ("num_workers", "probe_size")},
    }
    name = OmegaConf.select(cfg, "module.scheduler.name", default=None)
    if name == "cosine":
        spec["module.scheduler.warmup_epochs"] = _float(lo=0.0)
    if name == "step":
        spec["module.scheduler.step_size"] = check_positive_int
        spec["module.scheduler.gamma"] = _float(**_POS)
    if name == "onecycle":
        spec["module.scheduler.pct_start"] = _float(lo=0.0, hi=1.0, lo_open=True)
        spec["module.scheduler.div_factor"] = _float(**_POS)
        spec["module.scheduler.final_div_factor"] = _float(**_POS)
    return spec


def validate_train_config(cfg: DictConfig) -> None:
    """Check the type and range of the training config's trainer, optimizer, scheduler, data and seed keys before
    any work (the shared checks of :mod:`fragdefense.utils.checks`), with an error naming the key and the expected
    form (instead of a failure after the data is set up).

    >>> from fragdefense.cli._config import compose_config
    >>> validate_train_config(compose_config("train", ["trainer.max_epochs=abc"]))
    Traceback (most recent call last):
    ...
    TypeError: `trainer.max_epochs` must be an int >= 1 (or -1: no limit), got 'abc' (str)
    """
    validate_config(cfg, _train_spec(cfg))
    if "trainer" in cfg and cfg.trainer.get("max_epochs") == -1 and cfg.trainer.get("max_steps", -1) == -1:
        raise ValueError("`trainer.max_epochs`=-1 (no limit) needs `trainer.max_steps` >= 1")
    sch = OmegaConf.select(cfg, "module.scheduler", default=None) or {}
    if sch.get("name") == "step" and "step_size" not in sch:
        raise ValueError("`module.scheduler.step_size` (epochs between decays, an int >= 1) is required for step")


def _check_run_dir_writable(path: Path, name: str = "run_dir") -> None:
    from fragdefense.evaluation.store import check_writable

    try:
        check_writable(path)
    except OSError as e:
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
        raise PermissionError(
            f"`{name}`={str(path)!r} is not writable ({cause.strerror or cause}); the run writes its config, "
            f"checkpoints and logs there. Choose another {name} (e.g. {name}=$HOME/runs/<name>)"
        ) from e


def _is_rank_zero_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _takes_run_id(node: DictConfig) -> bool:
    return str(node.get("_target_", "")).endswith("make_loggers")


def _wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B id (created once, reused on resume so W&B continues the same run)."""
    f = run_dir / "wandb_id.txt"
    if f.is_file():
        return f.read_text().strip()
    import secrets

    rid = secrets.token_hex(4)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        atomic_write_text(f, rid + "\n")  # only rank 0 logs to W&B
    return rid


def _reap_orphaned_wandb_services() -> int:
    """SIGTERM ``wandb-core`` services whose client process (``--pid``) no longer exists (Linux ``/proc``).

    W&B runs its service in its own session, so killing a training job's process (``kill -9 <pid>``) leaves the
    service alive, still holding the run id; a relaunch that resumes the same W&B run then fails with "run ID is
    in use" until it exits. Services of live processes are never touched."""
    import signal

    proc = Path("/proc")
    if not proc.is_dir():
        return 0
    n = 0
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not args or not args[0].endswith(b"wandb-core") or b"--pid" not in args:
            continue
        try:
            client = int(args[args.index(b"--pid") + 1])
        except (ValueError, IndexError):
            continue
        if _alive(client):
            continue
        try:
            os.kill(int(d.name), signal.SIGTERM)
            n += 1
        except OSError:
            pass
    return n


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is dead


def _start_wandb(lg: Any, attempts: int = 10, wait_s: float = 1.0) -> None:
    """Start the W&B run. After a crash the killed process's W&B service can still hold the run id ("run ID ...
    is in use"): a service orphaned by the kill is stopped, a service inherited from a live parent process
    (``WANDB_SERVICE``) is left for an own one, and the start is retried, so the run resumes under the same id.
    An online start that fails otherwise (server unreachable, ``init_timeout``) is retried offline, with a warning
    saying how to upload the run later."""
    for i in range(attempts):
        try:
            lg.experiment  # noqa: B018 - creates the run
            return
        except Exception as e:  # noqa: BLE001 - wandb raises its own error types
            if "in use" not in str(e) and not getattr(lg, "_offline", True):
                # online start failed (server unreachable past the probe, init timeout): log offline instead
                where = Path(str(lg._wandb_init.get("dir") or ".")) / "wandb" / "offline-run-*"
                log.warning(
                    "W&B: the online start failed (%s: %s); logging OFFLINE instead. Upload later with: wandb sync %s",
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                    where,
                )
                import wandb

                wandb.teardown()  # the failed start still holds the run id in wandb's service
                lg._offline = True
                lg._wandb_init["mode"] = "offline"  # (wandb's settings singleton already read WANDB_MODE)
                continue
            if "in use" not in str(e) or i == attempts - 1:
                raise
            n = _reap_orphaned_wandb_services()
            if i >= 1 and os.environ.pop("WANDB_SERVICE", None) is not None:
                # the service was inherited from a parent process (WANDB_SERVICE) that is still alive, so it still
                # lists the killed run as active: detach from it and start an own service
                import wandb

                wandb.teardown()
                log.info("W&B: detached from the inherited service (WANDB_SERVICE) that holds the run id")
            log.info("W&B run id held by a killed run's service (%d stopped); retrying in %.1f s", n, wait_s)
            time.sleep(wait_s)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (and test) as described by ``cfg``; returns the summary that is also written to
    ``<run_dir>/metrics.json``.

    Writes ``config.yaml`` (resolved), ``probe_indices.json``, ``checkpoints/{last,best-*}.ckpt``,
    ``metrics.json``, the CSV log and the W&B run into the run directory. Before any work: the config's numeric
    keys are checked, the run directory must be writable and is locked (``<run_dir>/.lock``: a second process on
    the same run directory is refused, naming the holder's pid). A relaunch with ``resume=auto`` continues from
    ``checkpoints/last.ckpt`` (from the newest readable checkpoint when it is corrupt) and, when training had
    already finished, writes the missing end-of-run outputs (``metrics.json``, the fragility summary and figure).
    """
    t_start = time.perf_counter()
    import_plugins(cfg)
    validate_train_config(cfg)
    run_dir = _resolve_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    _check_run_dir_writable(run_dir)
    lock = RunDirLock(run_dir) if _is_rank_zero_process() else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(cfg, run_dir, t_start)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run_dir: Path, t_start: float) -> dict[str, Any]:
    ckpt_path, ckpt = _resume_checkpoint(cfg, run_dir)
    if ckpt is not None:
        _check_schedule_resume(cfg, ckpt)
    resume_step = int(ckpt.get("global_step", 0)) if ckpt is not None else None
    del ckpt
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    regularizer = instantiate(cfg.regularizer, _convert_="all") if _is_set(cfg.get("regularizer")) else None
    # what the checkpoint stores to rebuild the model: create_model arguments, or the `_target_` node of any nn.Module
    model_config = model_config_for_checkpoint(OmegaConf.to_container(cfg.model, resolve=True))
    if regularizer is not None:
        model = regularizer.prepare_model(model)
        model_config.update(regularizer.model_config_update())
    # (_partial_: the objects and model_config are passed as they are; Hydra would instantiate a nested `_target_`)
    module = instantiate(cfg.module, _partial_=True, _convert_="all")(
        model=model, regularizer=regularizer, model_config=model_config
    )

    logger_kw = (
        {"run_id": _wandb_run_id(run_dir), "resume_step": resume_step}
        if _is_set(cfg.get("logger")) and _takes_run_id(cfg.logger)
        else {}
    )
    loggers = instantiate(cfg.logger, **logger_kw) if _is_set(cfg.get("logger")) else []
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if _is_set(c)]
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    started = _FitStarted()
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, started], logger=loggers or False)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
            _start_wandb(lg)
        lg.log_hyperparams(resolved)

    datamodule.setup("fit")
    if trainer.is_global_zero and hasattr(datamodule, "save_probe"):  # (any LightningDataModule can be trained on)
        datamodule.save_probe(run_dir / "probe_indices.json")

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if not started.started and ckpt_path is not None:
        # the checkpoint is already at max_epochs (killed after its last checkpoint, before metrics.json): fit
        # skipped every hook, so complete the end-of-run outputs the killed process never wrote
        log.info("training already finished in %s; writing the missing end-of-run outputs", ckpt_path)
        for cb in trainer.callbacks:
            if isinstance(cb, (FragilityMonitor, HessianMonitor)):
                cb.on_train_end(trainer, module)

    train_metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items() if not k.startswith("test/")}
    ckpt_cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    test_metrics: dict[str, Any] = {}
    if cfg.get("test", True):
        res = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        test_metrics = {k: _scalar(v) for k, v in (res[0] if res else {}).items()}

    timer = next((c for c in trainer.callbacks if type(c).__name__ == "EpochTimer"), None)
    epoch_s = list(getattr(timer, "epoch_seconds", []))
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": cfg.model.get("name") or cfg.model.get("_target_"),
        "data": getattr(datamodule, "name", type(datamodule).__name__),
        "regularizer": regularizer.name if regularizer is not None else None,
        "seed": int(cfg.seed),
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "seconds_per_epoch": (sum(epoch_s) / len(epoch_s)) if epoch_s else None,
        "train_seconds": sum(epoch_s) if epoch_s else None,
        "total_seconds": time.perf_counter() - t_start,
        "best_val_acc": _scalar(ckpt_cb.best_model_score)
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None
        else None,
        "best_checkpoint": best,
        "last_checkpoint": str(Path(ckpt_cb.dirpath) / "last.ckpt")
        if ckpt_cb is not None and ckpt_cb.dirpath
        else None,
        "final_epoch_metrics": train_metrics,
        "test": test_metrics,
        # (not module.device: Lightning moves the module back to the CPU when fit / test end)
        "device": str(trainer.strategy.root_device),
        "torch": torch.__version__,
    }
    monitor = next((c for c in trainer.callbacks if isinstance(c, FragilityMonitor)), None)
    fragility = monitor.summary() if monitor is not None else None
    if fragility is not None:
        summary["fragility"] = fragility
    wandb_loggers = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
    if wandb_loggers and trainer.is_global_zero:
        run = wandb_loggers[0].experiment
        summary["wandb"] = {
            "id": run.id,
            "dir": str(Path(run.dir).parent),
            "mode": "offline" if run.offline else "online",
        }
        run.summary.update({f"final/{k}": v for k, v in test_metrics.items()})
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "metrics.json", summary)
        _print_summary(summary)
    for lg in wandb_loggers:
        lg.experiment.finish()
    return summary


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="fragdefense-train summary", show_header=False)
    t.add_column(style="bold")
    t.add_column()

    def pct(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "-"

    t.add_row("model / data", f"{s['model']} / {s['data']}")
    t.add_row("epochs", str(s["epochs"]))
    t.add_row("test accuracy", pct(s["test"].get("test/acc")))
    t.add_row("best val accuracy", pct(s["best_val_acc"]))
    if s["seconds_per_epoch"] is not None:
        t.add_row("seconds / epoch", f"{s['seconds_per_epoch']:.1f}")
    t.add_row("total time", f"{s['total_seconds']:.1f} s")
    if s.get("fragility"):
        _fragility_rows(t, s["fragility"], pct)
    t.add_row("best checkpoint", str(s["best_checkpoint"]))
    t.add_row("run directory", s["run_dir"])
    if "wandb" in s:
        w = s["wandb"]
        hint = f"  (upload: wandb sync {w['dir']})" if w["mode"] == "offline" else ""
        t.add_row("W&B run", escape(f"{w['id']} [{w['mode']}]{hint}"))
    Console().print(t)


def _fragility_rows(t: Any, f: dict[str, Any], pct: Any) -> None:
    """Rows of the fragility summary: probe accuracy clean -> attacked, top-k intersection and Spearman
    between the clean and the attacked maps per method / attack, mass on the object (synthetic data), figure."""
    from rich.markup import escape

    k = f["protocol"].get("k")
    t.add_row(
        "fragility probe",
        f"{f['n_probe']} test images, eps {f['eps_255']:.3g}/255, after {f['epoch'] + 1} epochs "
        f"(acc clean -> attacked; top-{k} intersection, Spearman: clean vs attacked map)",
    )
    for method, entry in f["methods"].items():
        for attack, v in entry["attacks"].items():
            if v.get("text"):  # the monitor's own line: says so when nothing was attacked / perturbed
                t.add_row(escape(f"  {method} / {attack}"), escape(str(v["text"])))
                continue
            topk, rho = v.get("topk_intersection", float("nan")), v.get("spearman", float("nan"))
            t.add_row(
                escape(f"  {method} / {attack}"),
                f"acc {pct(f['probe_acc'])} -> {pct(v.get('acc_attacked'))}, top-{k} {topk:.3f}, Spearman {rho:.3f}",
            )
        if "mask_mass_clean" in entry:
            atk = ", ".join(
                f"{a} {v['mask_mass_attacked']:.3f}" for a, v in entry["attacks"].items() if "mask_mass_attacked" in v
            )
            t.add_row(escape(f"  {method}: mass on object"), f"clean {entry['mask_mass_clean']:.3f}, {atk}")
    if f.get("maps_png"):
        t.add_row("fragility maps", escape(str(f["maps_png"])))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    train(cfg)


_EARLY_LOCK: RunDirLock | None = None


def _early_run_dir_checks(argv: list[str]) -> None:
    """Before Hydra starts (it configures its log file in ``hydra.run.dir`` and writes ``.hydra/`` there): a
    ``run_dir=`` / ``hydra.run.dir=`` given on the command line must be writable, and the run directory is
    locked for the whole process (a single run; multirun jobs are checked by :func:`train`)."""
    global _EARLY_LOCK
    if "-m" in argv or "--multirun" in argv:
        return
    given: dict[str, str] = {}
    for a in argv:
        key, eq, val = a.lstrip("+").partition("=")
        if eq and key in ("run_dir", "hydra.run.dir") and val and "${" not in val and "," not in val:
            given[key] = val
    for key, val in given.items():
        _check_run_dir_writable(Path(val).absolute(), key)
    rd = given.get("run_dir") or given.get("hydra.run.dir")
    if rd and _is_rank_zero_process():
        _EARLY_LOCK = RunDirLock(Path(rd).absolute()).acquire()  # re-entered by train(), released at exit


def main() -> None:
    """Console script ``fragdefense-train``."""
    from fragdefense.utils.io import RunDirLockedError

    try:
        _early_run_dir_checks(sys.argv[1:])
    except (OSError, RunDirLockedError) as e:
        sys.exit(f"fragdefense-train: {e}")
    _hydra_main()


if __name__ == "__main__":
    main()
