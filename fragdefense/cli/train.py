"""``fragdefense-train``: train a classifier (optionally with a defense) from a Hydra config.

``train(cfg)`` is a plain function (tests call it with a composed config); ``main`` is the Hydra shell.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf

from fragdefense.callbacks import FragilityMonitor
from fragdefense.cli._common import import_plugins
from fragdefense.cli._config import config_dir
from fragdefense.models import model_config_for_checkpoint
from fragdefense.utils.io import atomic_write_json, atomic_write_text

__all__ = ["train", "main"]

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


def _resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``ckpt_path`` when given; with ``resume=auto`` the run directory's ``checkpoints/last.ckpt`` if present."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    mode = cfg.get("resume", "never")
    if mode not in ("auto", "never"):
        raise ValueError(f"`resume` must be 'auto' or 'never', got {mode!r}")
    last = run_dir / "checkpoints" / "last.ckpt"
    if mode == "auto" and last.is_file():
        log.info("resuming from %s (resume=auto)", last)
        return str(last)
    return None


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
    (``WANDB_SERVICE``) is left for an own one, and the start is retried, so the run resumes under the same id."""
    for i in range(attempts):
        try:
            lg.experiment  # noqa: B018 - creates the run
            return
        except Exception as e:  # noqa: BLE001 - wandb raises its own error types
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
    ``metrics.json``, the CSV log and the W&B run into the run directory.
    """
    t_start = time.perf_counter()
    import_plugins(cfg)
    run_dir = _resolve_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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

    ckpt_path = _resume_checkpoint(cfg, run_dir)
    logger_kw = {"run_id": _wandb_run_id(run_dir)} if _is_set(cfg.get("logger")) and _takes_run_id(cfg.logger) else {}
    loggers = instantiate(cfg.logger, **logger_kw) if _is_set(cfg.get("logger")) else []
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if _is_set(c)]
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

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


def main() -> None:
    """Console script ``fragdefense-train``."""
    _hydra_main()


if __name__ == "__main__":
    main()
