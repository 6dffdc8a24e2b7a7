"""Run directories that cannot clash or lose history: config checks before any work, an unwritable run_dir named,
a corrupt last.ckpt, the CSV and Hessian histories across a resume, a finished run's missing end-of-run outputs,
the run-directory lock, a OneCycle resume with another length, W&B online without a network, Hessian progress."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fragdefense.cli._config import compose_config
from fragdefense.cli.train import train

TINY = [
    "data.n_train=128",
    "data.n_test=32",
    "data.batch_size=32",
    "data.probe_size=8",
    "model.width=4",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "logger=csv",
]
NO_FRAGILITY = ["~callbacks.fragility"]
HESSIAN = [
    "callbacks=hessian",
    "callbacks.hessian.every_n_epochs=1",
    "callbacks.hessian.n_param_samples=8",
    "callbacks.hessian.n_input=4",
    "+callbacks.hessian.lanczos_iters=6",
    "+callbacks.hessian.trace_matvecs=3",
    "+callbacks.hessian.input_iters=6",
]


def _cfg(run_dir: Path, *extra: str):
    return compose_config("train", [*TINY, f"run_dir={run_dir}", *extra])


# (wide enough that some probe images are classified correctly, so the fragility monitor attacks and draws them)
FRAGILITY = [
    "model.width=8",
    "data.n_train=160",
    "data.probe_size=16",
    "callbacks.fragility.n_probe=16",
    "callbacks.fragility.steps=2",
]


@pytest.fixture(scope="module")
def onecycle_run(tmp_path_factory) -> Path:
    """A finished 2-epoch run (OneCycle, 5 steps per epoch, FragilityMonitor on the probe images, CSV log)."""
    d = tmp_path_factory.mktemp("onecycle") / "run"
    train(_cfg(d, *FRAGILITY))
    assert (d / "fragility_maps.png").is_file()
    return d


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> dict:
    """A 2-epoch cosine run with the HessianMonitor, its files kept, then resumed to 3 epochs after a fake row of
    a killed session (a step after the checkpoint) was appended to its CSV log."""
    d = tmp_path_factory.mktemp("resumed") / "run"
    common = [*NO_FRAGILITY, *HESSIAN, "module.scheduler.name=cosine"]
    train(_cfg(d, *common))
    first_csv = (d / "csv" / "metrics.csv").read_text()
    first_hessian = json.loads((d / "hessian_history.json").read_text())["history"]
    step = torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    header = first_csv.splitlines()[0].split(",")
    with open(d / "csv" / "metrics.csv", "a", newline="") as f:  # a row the killed session wrote after the checkpoint
        csv.DictWriter(f, fieldnames=header).writerow({"epoch": 2, "lr-SGD": 0.5, "step": step + 1})
    fake = {"epoch": "2", "lr-SGD": "0.5", "step": str(step + 1)}
    assert fake.items() <= _rows(d / "csv" / "metrics.csv")[-1].items()
    summary = train(_cfg(d, *common, "trainer.max_epochs=3"))
    return {"dir": d, "first_csv": first_csv, "first_hessian": first_hessian, "ckpt_step": step, "summary": summary}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- 1. config keys checked before any work


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("trainer.log_every_n_steps=-3", "trainer.log_every_n_steps"),
        ("+trainer.limit_train_batches=1.5", "trainer.limit_train_batches"),
        ("module.optimizer.lr=-0.1", "module.optimizer.lr"),
        ("module.scheduler.name=linear", "module.scheduler.name"),
        ("data.batch_size=0", "data.batch_size"),
        ("seed=abc", "seed"),
    ],
)
def test_bad_numeric_key_fails_before_any_work_naming_it(tmp_path, monkeypatch, override, key):
    from fragdefense.data import SyntheticDataModule

    def boom(*a, **k):
        raise AssertionError("the data was touched before the config was checked")

    monkeypatch.setattr(SyntheticDataModule, "__init__", boom)
    with pytest.raises((TypeError, ValueError), match=f"`{key}`"):  # TypeError for a wrong type, as everywhere
        train(_cfg(tmp_path / "r", override))
    assert not (tmp_path / "r").exists()  # nothing written


# ---------------------------------------------------------------- 2. unwritable run_dir


def test_unwritable_run_dir_is_named_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PermissionError, match="`run_dir`=.*not writable"):
        train(_cfg(tmp_path / "a_file" / "run"))  # (a path under a file: unwritable even for root)
    if os.geteuid() != 0:  # root writes into read-only directories
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(PermissionError, match="`run_dir`"):
                train(_cfg(ro / "run"))
        finally:
            ro.chmod(0o755)


@pytest.mark.slow
def test_cli_unwritable_run_dir_is_named_not_hydra_handler(tmp_path):
    (tmp_path / "a_file").write_text("x")
    bad = tmp_path / "a_file" / "run"
    r = subprocess.run(
        [sys.executable, "-m", "fragdefense.cli.train", *TINY, f"run_dir={bad}", f"hydra.run.dir={bad}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert r.returncode != 0
    assert "`run_dir`=" in r.stderr and "not writable" in r.stderr, r.stderr[-2000:]
    assert "Unable to configure handler" not in r.stderr


# ---------------------------------------------------------------- 3. truncated last.ckpt


def test_truncated_last_ckpt_falls_back_to_newest_readable_and_keeps_it(onecycle_run, tmp_path, caplog):
    d = tmp_path / "run"
    shutil.copytree(onecycle_run, d)
    last = d / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a kill during the write
    caplog.set_level(logging.WARNING, logger="fragdefense.train")
    with pytest.warns(RuntimeWarning, match="RESUME FALLBACK"):
        summary = train(_cfg(d, *FRAGILITY))
    kept = list((d / "checkpoints").glob("last.ckpt.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == data[: len(data) // 2]  # nothing lost
    assert kept[0].name in caplog.text and "best-epoch" in caplog.text
    assert summary["epochs"] == 2 and summary["global_step"] == 10  # 5 batches x 2 epochs, as uninterrupted
    torch.load(last, map_location="cpu", weights_only=False)  # a whole last.ckpt again
    with pytest.raises(ValueError, match="`ckpt_path`=.*cannot be read"):
        train(_cfg(tmp_path / "other", f"ckpt_path={kept[0]}"))


# ---------------------------------------------------------------- 4. CSV history across a resume


def test_csv_history_continues_across_resume_without_loss_or_duplicates(resumed_run):
    d, step = resumed_run["dir"], resumed_run["ckpt_step"]
    rows = _rows(d / "csv" / "metrics.csv")
    val = [int(r["epoch"]) for r in rows if r.get("val/acc")]
    tr = [int(r["epoch"]) for r in rows if r.get("train/loss")]
    assert sorted(val) == [0, 1, 2] and sorted(tr) == [0, 1, 2]  # every epoch once
    assert sum(1 for r in rows if r.get("test/acc")) == 1  # the first run's test row (after the checkpoint) replaced
    assert not [r for r in rows if r.get("lr-SGD") == "0.5"]  # the killed session's row after the checkpoint
    # the rows of the first run before the checkpoint are kept verbatim
    first = [r for r in csv.DictReader(resumed_run["first_csv"].splitlines()) if float(r["step"]) < step]
    for r in first:
        assert any(all(r[k] == n.get(k, "") for k in r) for n in rows), r
    assert resumed_run["summary"]["epochs"] == 3
    ck = torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert len(ck["callbacks"]["EpochTimer"]["epoch_seconds"]) == 3  # every epoch's time, across the resume


# ---------------------------------------------------------------- 9. Hessian history across a resume


def test_hessian_history_continues_across_resume(resumed_run):
    from fragdefense.callbacks import HessianMonitor
    from fragdefense.models import load_checkpoint_model

    d = resumed_run["dir"]
    hist = json.loads((d / "hessian_history.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    for old, new in zip(resumed_run["first_hessian"], hist[:2]):
        assert old == new  # carried over from the checkpoint, not recomputed
    # independent reference: the epoch-2 evaluation is that of the final weights (no step after it)
    mon = HessianMonitor(n_param_samples=8, n_input=4, lanczos_iters=6, trace_matvecs=3, input_iters=6)
    probe = json.loads((d / "probe_indices.json").read_text())["indices"]
    from fragdefense.data import SyntheticDataModule

    dm = SyntheticDataModule(n_train=128, n_test=32, batch_size=32, probe_size=8)
    dm.setup("fit")
    batch = dm.probe_batch()
    assert list(batch["indices"]) == probe  # the run's probe images
    net = load_checkpoint_model(d / "checkpoints" / "last.ckpt").eval()
    ref = mon.evaluate(net, batch["x"], batch["y"])
    for k in ("param_top_eig", "param_trace", "input_lambda_max_mean"):
        assert hist[2][k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k


# ---------------------------------------------------------------- 5. finished run, end-of-run outputs missing


def test_relaunch_of_finished_run_completes_missing_outputs(onecycle_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(onecycle_run, d)
    before = json.loads((d / "metrics.json").read_text())
    (d / "metrics.json").unlink()
    (d / "fragility_maps.png").unlink()
    summary = train(_cfg(d, *FRAGILITY))
    assert (d / "metrics.json").is_file() and (d / "fragility_maps.png").is_file()
    after = json.loads((d / "metrics.json").read_text())
    assert "fragility" in after and after["fragility"]["epoch"] == before["fragility"]["epoch"]
    assert after["fragility"]["probe_acc"] == before["fragility"]["probe_acc"]
    assert summary["global_step"] == before["global_step"]  # nothing trained again
    assert after["test"] == pytest.approx(before["test"])


# ---------------------------------------------------------------- 6. one process per run directory

_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("fd_io", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
m.RunDirLock(sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_process_on_a_run_dir_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    from fragdefense.utils import io as fio
    from fragdefense.utils.io import RunDirLock, RunDirLockedError

    d = tmp_path / "run"
    spec = importlib.util.find_spec("fragdefense.utils.io")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, spec.origin, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLockedError, match=rf"`run_dir`=.*{d.name}.*in use by process {holder.pid}"):
            train(_cfg(d, "seed=7"))
        assert not (d / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunDirLock(d) as lock:  # the OS released the killed holder's lock: a relaunch proceeds
        assert lock.holder_pid() == os.getpid()
        with RunDirLock(d):  # re-entrant within one process (main() locks early, train() again)
            pass
    assert not fio._HELD


@pytest.mark.slow
def test_cli_on_a_locked_run_dir_is_refused_before_hydra_writes(tmp_path):
    d = tmp_path / "run"
    spec = importlib.util.find_spec("fragdefense.utils.io")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, spec.origin, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run(
            [sys.executable, "-m", "fragdefense.cli.train", *TINY, f"run_dir={d}", f"hydra.run.dir={d}"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "WANDB_MODE": "offline"},
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert r.returncode != 0 and f"in use by process {holder.pid}" in r.stderr, r.stderr[-2000:]
    assert not (d / ".hydra").exists() and not (d / "config.yaml").exists()


# ---------------------------------------------------------------- 7. OneCycle resumed with another length


def test_onecycle_resume_with_more_epochs_is_refused_before_training(onecycle_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(onecycle_run, d)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"`trainer.max_epochs`=3.*OneCycle|OneCycle.*`trainer.max_epochs`=3"):
        train(_cfg(d, *FRAGILITY, "trainer.max_epochs=3"))
    assert time.perf_counter() - t0 < 5.0
    # a checkpoint without the recorded lengths (older versions): refused by the module, before any step
    ck = torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    del ck["fragdefense_schedule"]
    torch.save(ck, d / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"planned for 10 optimizer steps.*needs 15 \(`trainer.max_epochs`=3\)"):
        train(_cfg(d, *FRAGILITY, "trainer.max_epochs=3"))
    assert torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10  # untouched


# ---------------------------------------------------------------- 8. W&B online without a network


def test_wandb_online_without_network_falls_back_to_offline_quickly(tmp_path, monkeypatch, caplog):
    from fragdefense.cli._wandb import start_wandb_run
    from fragdefense.lit import make_loggers

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    caplog.set_level(logging.WARNING)
    t0 = time.perf_counter()
    lg = make_loggers(tmp_path / "train", wandb={"project": "t", "mode": "auto"})[-1]
    run = lg.experiment
    assert run.offline
    run.log({"x": 1.0})
    run.finish()
    assert time.perf_counter() - t0 < 15.0, "an unreachable W&B server must not hang the start"
    assert list((tmp_path / "train" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "unreachable" in caplog.text and f"wandb sync {tmp_path / 'train' / 'wandb'}" in caplog.text

    t0 = time.perf_counter()
    run = start_wandb_run(tmp_path / "eval", "eval", {"a": 1}, {"mode": "online"})
    assert run.offline
    run.finish()
    assert time.perf_counter() - t0 < 15.0
    assert list((tmp_path / "eval" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_wandb_online_start_that_times_out_is_retried_offline(tmp_path, monkeypatch, caplog):
    """The second guard: a server that passes the probe but does not answer; wandb's init_timeout ends the wait."""
    import fragdefense.lit.loggers as lg_mod
    from fragdefense.cli._wandb import start_wandb_run
    from fragdefense.cli.train import _start_wandb
    from fragdefense.lit import make_loggers

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.setattr(lg_mod, "_reachable", lambda timeout=3.0: (True, ""))
    import wandb

    wandb.teardown()  # (wandb's settings singleton keeps the mode an earlier test's run read)
    caplog.set_level(logging.WARNING)
    lg = make_loggers(tmp_path / "train", wandb={"project": "t", "mode": "online"})[-1]
    _start_wandb(lg)
    assert lg.experiment.offline and "logging OFFLINE instead" in caplog.text
    lg.experiment.finish()
    run = start_wandb_run(tmp_path / "eval", "eval", {}, {"mode": "online"})
    assert run.offline
    run.finish()


# ---------------------------------------------------------------- 10. Hessian progress lines


def test_hessian_monitor_reports_progress_per_stage(caplog):
    from fragdefense.callbacks import HessianMonitor
    from fragdefense.models import create_model

    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=4).eval()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    kw = dict(n_param_samples=8, n_input=4, lanczos_iters=12, trace_matvecs=6, input_iters=6, tol=0.0)
    caplog.set_level(logging.INFO, logger="fragdefense.callbacks.hessian")
    out = HessianMonitor(progress_every=0.05, **kw).evaluate(net, x, y, label="epoch 3")
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Hessian probe (epoch 3): parameter Hessian") and m.endswith("...") for m in lines)
    assert any("input Hessian lambda_max of 4 images" in m and "done in" in m for m in lines)
    assert any(m.endswith(" s") and "... " in m for m in lines), lines  # a heartbeat while a stage ran
    # the staged evaluation gives the values of one hessian_snapshot call
    from fragdefense.hessian.summary import hessian_snapshot

    ref = hessian_snapshot(net, x, y, **kw)
    assert {k: out[k] for k in ref} == pytest.approx(ref, rel=1e-6)
    caplog.clear()
    HessianMonitor(progress_every=None, n_param_samples=4, n_input=0, lanczos_iters=3, trace_matvecs=0).evaluate(
        net, x, y
    )
    assert not caplog.records
