"""HessianMonitor in a real Lightning Trainer (logged values, no side effects on training) and the
fragdefense-hessian command end to end (hessian(cfg) and `python -m fragdefense.cli.hessian`)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from fragdefense.callbacks.hessian import HessianMonitor, hessian_snapshot
from fragdefense.cli._config import compose_config
from fragdefense.cli.hessian import hessian
from fragdefense.data import SyntheticDataModule
from fragdefense.lit import ClassifierModule
from fragdefense.models import create_model, load_checkpoint_model

DM_KW = {"n_train": 256, "n_test": 64, "batch_size": 64, "probe_size": 16, "num_workers": 0}
MON_KW = {"n_param_samples": 16, "lanczos_iters": 12, "trace_matvecs": 6, "n_input": 8, "input_iters": 12}
MODEL_CFG = {"name": "small_cnn", "num_classes": 10, "width": 4, "mean": [0.5] * 3, "std": [0.25] * 3}


def _fit(root, monitor: HessianMonitor | None, epochs: int = 2):  # noqa: ANN001
    L.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(**DM_KW)
    model = create_model(**MODEL_CFG)
    module = ClassifierModule(model, 10, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, model_config=MODEL_CFG)
    cbs: list[L.Callback] = [ModelCheckpoint(dirpath=root / "checkpoints", filename="epoch{epoch:02d}", save_top_k=-1)]
    if monitor is not None:
        cbs.append(monitor)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=CSVLogger(root, name="csv", version=0),
        callbacks=cbs,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        deterministic=True,
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    root = tmp_path_factory.mktemp("hessian_run")
    mon = HessianMonitor(every_n_epochs=1, **MON_KW)
    module, trainer = _fit(root, mon)
    return root, mon, module, trainer


def test_monitor_logs_every_epoch_and_matches_a_direct_evaluation(monitored):
    root, mon, module, trainer = monitored
    assert [h["epoch"] for h in mon.history] == [0, 1]
    with open(root / "csv" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("hessian/param_top_eig")]
    assert len(logged) == 2
    for key in ("param_top_eig", "param_trace", "input_lambda_max_mean", "input_lambda_max_median", "seconds"):
        assert all(math.isfinite(float(r[f"hessian/{key}"])) for r in logged)
    assert float(logged[-1]["hessian/param_top_eig"]) == pytest.approx(mon.history[-1]["param_top_eig"], rel=1e-6)
    # the history file for fragdefense-hessian run_dir=...
    hist = json.loads((root / "hessian_history.json").read_text())
    assert len(hist["history"]) == 2 and hist["settings"]["n_input"] == 8
    # the last evaluation equals hessian_snapshot of the final weights (same probe, same seeds)
    dm = SyntheticDataModule(**DM_KW)
    dm.setup("test")
    probe = dm.probe_batch()
    net = load_checkpoint_model(root / "checkpoints" / "epochepoch=01.ckpt")
    direct = hessian_snapshot(net, probe["x"], probe["y"], **MON_KW)
    for k, v in direct.items():
        assert mon.history[-1][k] == pytest.approx(v, rel=1e-4), k


def test_monitor_does_not_change_training(monitored, tmp_path):
    _, _, module_on, _ = monitored
    module_off, _ = _fit(tmp_path, None)
    for (n, a), (_, b) in zip(module_on.state_dict().items(), module_off.state_dict().items()):
        assert torch.equal(a, b), n
    assert module_on.training  # mode preserved (Lightning leaves the module in train mode after fit)


def test_monitor_validates_arguments():
    with pytest.raises(ValueError, match="every_n_epochs"):
        HessianMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="beta"):
        HessianMonitor(beta=0)
    with pytest.raises(RuntimeError, match="probe_batch"):
        HessianMonitor()._get_probe(L.Trainer(logger=False))


TINY_CLI = [
    "data.n_train=64",
    "data.n_test=64",
    "data.probe_size=8",
    "n_images=12",
    "batch_size=6",
    "param.n_samples=12",
    "param.lanczos_iters=10",
    "param.trace_matvecs=6",
    "param.density_iters=8",
    "param.density_runs=2",
    "directions.radii=[0.05,0.5]",
    "directions.n_random=2",
    "directions.topk=20",
    "directions.max_iter=10",
    "beta_sweep.betas=[1,10]",
    "beta_sweep.max_iter=10",
    "fragility.steps=2",
    "fragility.k=20",
    "fragility.max_iter=10",
]


def test_command_end_to_end_with_a_run_dir(monitored, tmp_path):
    root, *_ = monitored
    out = tmp_path / "out"
    cfg = compose_config("hessian", [*TINY_CLI, f"run_dir={root}", f"out_dir={out}", "compare.fragility=true"])
    p = hessian(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_images"] == 12 and saved["model"].endswith(".ckpt")
    assert len(saved["param"]["top_eigenvalues"]) == 3 and saved["param"]["n_params"] > 0
    assert saved["directions"]["per_radius"][0]["radius"] == 0.05
    assert set(saved["beta_sweep"]) == {"logit", "loss"}
    fr = saved["fragility"]
    assert len(fr["lambda_max"]) == len(fr["topk_intersection"]) == fr["n_attacked"]
    ck = saved["checkpoints"]["checkpoints"]
    assert [r["epoch"] for r in ck] == [0, 1] and all("mean_topk_intersection" in r for r in ck)
    assert len(saved["checkpoints"]["monitor_history"]) == 2
    names = {
        "density.png",
        "map_change.png",
        "eigen_vs_beta.png",
        "lambda_vs_fragility.png",
        "eigen_over_checkpoints.png",
        "lambda_vs_topk_across_models.png",
    }
    assert names <= {f.name for f in out.iterdir()}
    assert "Parameter Hessian" in (out / "results.md").read_text()
    assert p["figures"] and all(f.endswith(".png") for f in p["figures"])
    # the parameter top eigenvalue agrees with an independent Lanczos run's value within its tolerance
    net = load_checkpoint_model(ck[-1]["path"])
    direct = hessian_snapshot(
        net, *_cli_images(), n_param_samples=12, lanczos_iters=80, trace_matvecs=0, n_input=0, tol=1e-8
    )
    assert saved["param"]["top_eigenvalues"][0] == pytest.approx(direct["param_top_eig"], rel=1e-3)


def _cli_images() -> tuple[torch.Tensor, torch.Tensor]:
    from fragdefense.cli.hessian import _select_images

    dm = SyntheticDataModule(n_train=64, n_test=64, probe_size=8)
    dm.setup("test")
    x, y, _ = _select_images(dm.test_set, 12, 0)
    return x, y


def test_checkpoints_of_several_runs_are_named_by_their_run(monitored, tmp_path):
    import shutil

    from fragdefense.cli.hessian import _checkpoint_list

    root, *_ = monitored
    paths = []
    for run in ("natural", "pgd_at"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        paths.append(tmp_path / run / "checkpoints" / "best-epoch00.ckpt")
        shutil.copy(root / "checkpoints" / "epochepoch=01.ckpt", paths[-1])
    cfg = compose_config("hessian", [f"checkpoints=[{paths[0]},{paths[1]}]"])
    assert [r["name"] for r in _checkpoint_list(cfg)] == ["natural/best-epoch00", "pgd_at/best-epoch00"]
    cfg = compose_config("hessian", [f"checkpoints=[{paths[0]}]"])
    assert [r["name"] for r in _checkpoint_list(cfg)] == ["best-epoch00"]


def test_command_needs_a_model(tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        hessian(compose_config("hessian", [*TINY_CLI, f"out_dir={tmp_path}"]))


@pytest.mark.slow
def test_python_m_entry_point(monitored, tmp_path):
    root, *_ = monitored
    ckpt = root / "checkpoints" / "epochepoch=01.ckpt"
    stages = ["directions.enabled=false", "beta_sweep.enabled=false", "fragility.enabled=false", "figures=false"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fragdefense.cli.hessian",
            *TINY_CLI,
            *stages,
            f"checkpoint='{ckpt}'",
            f"out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())["param"]["n_params"] > 0
