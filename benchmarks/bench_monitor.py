"""Overhead of the FragilityMonitor at its default settings (``fragdefense/configs/callbacks/default.yaml``) as a
share of a training epoch of ``small_cnn`` on the CIFAR-10 JPEG copy (45 000 training images, batch 128).

The monitor runs on the evaluation engine (:func:`fragdefense.evaluation.run_cell`, one cell per method x attack,
every attack batched with per-image generators); the goal is an overhead of at most 10 % of an epoch.

A full epoch takes minutes on 2 CPU cores, so the epoch is extrapolated from measured parts:

* ``t_step``: mean interval between consecutive ``on_train_batch_start`` hooks of a Lightning ``fit`` (forward,
  backward, optimizer and scheduler step, device-side augmentation, data loading, logging) over
  ``--steps`` batches of 128, after ``--warmup`` batches;
* ``t_val``: one full validation pass (``trainer.validate`` on the 5 000-image validation split);
* epoch = ``ceil(45000 / 128) * t_step + t_val`` (what ``fit`` runs per epoch with the default config);
* ``t_monitor``: :meth:`FragilityMonitor.evaluate` on the probe set (the monitor's ``n_probe=64`` of the
  datamodule's 128 probe images), median of ``--repeat`` runs, (a) with the true labels (only correctly
  classified images are attacked; needs trained weights, ``--ckpt``) and (b) worst case: labels replaced by the
  model's predictions so that every probe image is attacked (the upper bound: the figure to compare with the
  goal). The time of each (method, attack) cell is printed from ``FragilityReport.cells``.

The monitor runs once per epoch at the default ``every_n_epochs=1``; overhead = ``t_monitor / epoch``.

Run: ``OMP_WAIT_POLICY=PASSIVE FRAGDEFENSE_CIFAR10_JPEG=/path/to/cifar10-jpeg python benchmarks/bench_monitor.py
--ckpt runs/.../checkpoints/best-epochNN.ckpt`` (without ``--ckpt`` only the worst case is meaningful).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fragdefense.callbacks import FragilityMonitor
from fragdefense.cli._config import compose_config


class _StepTimer(L.Callback):
    """Wall-clock time at every ``on_train_batch_start``, and at the end of the epoch's last batch."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.t.append(time.perf_counter())

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.t.append(time.perf_counter())


def _median_time(fn, repeat: int) -> tuple[float, object]:  # noqa: ANN001
    ts, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.environ.get("FRAGDEFENSE_CIFAR10_JPEG"), help="cifar10-jpeg folder")
    ap.add_argument("--ckpt", default=None, help="trained small_cnn checkpoint (for the true-label case)")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed first training steps")
    ap.add_argument("--repeat", type=int, default=3, help="monitor runs per case (median)")
    args = ap.parse_args()
    if not args.root:
        raise SystemExit("set FRAGDEFENSE_CIFAR10_JPEG or pass --root (the extracted cifar10-jpeg folder)")
    torch.set_num_threads(2)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()[0]:.2f}"
    )

    cfg = compose_config("train", ["data=imagefolder", f"data.root={args.root}", "run_dir=/tmp/bench_monitor"])
    L.seed_everything(0, verbose=False)
    t = time.perf_counter()
    dm = instantiate(cfg.data)
    dm.setup("fit")
    print(f"data: {len(dm.train_set)} train / {len(dm.val_set)} val images decoded in {time.perf_counter() - t:.1f} s")
    model = instantiate(cfg.model)
    if args.ckpt:
        from fragdefense.models import load_weights

        load_weights(model, args.ckpt)
    mcfg = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
    module = instantiate(cfg.module, model=model, regularizer=None, model_config=mcfg, _convert_="all")
    mon: FragilityMonitor = instantiate(cfg.callbacks.fragility)
    print(
        f"monitor (default config): methods {list(mon.methods)}, attacks {mon.attacks}, eps {mon.eps * 255:g}/255, "
        f"steps {mon.steps}, check_every {mon.check_every}, n_probe {mon.n_probe}, every_n_epochs {mon.every_n_epochs}"
    )

    # --- monitor (on the checkpoint's weights, before any timed training step changes them) ---------------
    probe = dm.probe_batch()
    net = module.model.eval()
    with torch.no_grad():
        pred = net(probe["x"][: mon.n_probe])
    worst = {**probe, "y": torch.cat([pred.argmax(1), probe["y"][mon.n_probe :]])}
    mon.evaluate(net, probe)  # warm-up
    rows = []
    for name, pb in (("true labels", probe), ("worst case (all attacked)", worst)):
        t_mon, rep = _median_time(lambda pb=pb: mon.evaluate(net, pb), args.repeat)
        n_att = sum(1 for r in rep.records if r["attack"] == mon.attacks[-1])
        rows.append((name, t_mon, n_att, rep))

    # --- training steps and a validation pass ----------------------------------------------------------------
    timer = _StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=args.warmup + args.steps,
        limit_val_batches=0,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    iv = [b - a for a, b in zip(timer.t, timer.t[1:])][args.warmup :]
    t_step = sum(iv) / len(iv)
    vtrainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    t_val, _ = _median_time(lambda: vtrainer.validate(module, datamodule=dm, verbose=False), 1)
    n_steps = math.ceil(len(dm.train_set) / dm.batch_size)
    t_epoch = n_steps * t_step + t_val

    print(f"train step (batch {dm.batch_size}): {t_step * 1000:.0f} ms  (mean of {len(iv)} steps after {args.warmup})")
    print(f"validation pass ({len(dm.val_set)} images): {t_val:.1f} s")
    print(f"epoch estimate: {n_steps} steps x {t_step:.3f} s + {t_val:.1f} s = {t_epoch:.1f} s")
    goal = 0.10
    for name, t_mon, n_att, rep in rows:
        cells = ", ".join(f"{m}/{a} {c['seconds']:.2f} s" for (m, a), c in rep.cells.items())
        print(
            f"monitor, {name}: {t_mon:.2f} s for {rep.n_probe} probe images ({n_att} attacked, "
            f"probe acc {rep.metrics['probe_acc']:.3f}, topk top-{min(mon.k, 1024)} intersection "
            f"{rep.metrics['saliency/topk/topk_intersection']:.3f}; cells: {cells}) -> overhead "
            f"{100 * t_mon / t_epoch:.1f}% of an epoch"
        )
    ratio = rows[-1][1] / t_epoch
    print(
        f"overhead ratio (worst case, every probe image attacked): {ratio:.4f} = {100 * ratio:.1f}% of an epoch; "
        f"goal <= {100 * goal:.0f}%: {'met' if ratio <= goal else 'NOT met'}"
    )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
