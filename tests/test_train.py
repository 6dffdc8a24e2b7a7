"""Configs compose and instantiate; train(cfg) end to end; CLI overrides, multirun, errors, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fragdefense.cli._config import compose_config, config_dir
from fragdefense.cli.train import train
from fragdefense.data import SyntheticDataModule
from fragdefense.lit import ClassifierModule
from fragdefense.models import create_model

CONFIGS = Path(config_dir())
GROUPS = ["data", "model", "trainer", "logger", "callbacks", "regularizer", "experiment"]

TINY = [
    "data.n_train=160",
    "data.n_test=64",
    "data.batch_size=32",
    "data.probe_size=8",
    "model.width=8",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_group_has_options():
    for g in GROUPS:
        assert _options(g), f"fragdefense/configs/{g}/ is empty"
    assert "none" in _options("regularizer")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_yaml_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", f"run_dir={tmp_path}"]
    if group == "experiment" or option in ("imagefolder", "imagenet"):
        overrides.append(f"data.root={tmp_path}")  # ImageFolder roots are mandatory (`???`)
    cfg = compose_config("train", overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    node = cfg[group] if group != "experiment" else cfg
    if group == "data" or group == "experiment":
        dm = instantiate(cfg.data)
        assert isinstance(dm, L.LightningDataModule)
    if group == "model" or group == "experiment":
        model = instantiate(cfg.model)
        assert model.num_classes == cfg.data.num_classes
    if group == "trainer" or group == "experiment":
        # GPU configs are instantiated on the CPU here (no GPU in CI) — everything else as written
        tcfg = OmegaConf.merge(cfg.trainer, {"accelerator": "cpu"}) if cfg.trainer.accelerator == "gpu" else cfg.trainer
        trainer = instantiate(tcfg, logger=False, enable_checkpointing=False)
        assert isinstance(trainer, L.Trainer)
    if group == "logger" and "_target_" in node:
        loggers = instantiate(node)
        assert isinstance(loggers, list)
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger":
                lg.experiment.finish()
    if group == "callbacks":
        cbs = [instantiate(c) for c in node.values()]
        assert all(isinstance(c, L.Callback) for c in cbs)
    if group == "regularizer":
        assert "_target_" not in node or instantiate(node) is not None


def test_unknown_key_and_option_fail_with_their_name():
    with pytest.raises(ConfigCompositionException, match="nonexistent_key"):
        compose_config("train", ["trainer.nonexistent_key=1"])
    with pytest.raises(ConfigCompositionException, match="not_a_model"):
        compose_config("train", ["model=not_a_model"])


def test_module_fast_dev_run(tmp_path):
    dm = SyntheticDataModule(n_train=64, n_test=32, batch_size=16, probe_size=4)
    module = ClassifierModule(create_model("small_cnn", width=8), num_classes=10, scheduler={"name": "cosine"})
    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    assert trainer.state.finished
    with pytest.raises(ValueError, match="unknown optimizer"):
        ClassifierModule(create_model("small_cnn", width=8), 10, optimizer={"name": "lbfgsx"}).configure_optimizers()


def test_train_end_to_end_writes_run_dir(tmp_path):
    cfg = compose_config("train", [*TINY, f"run_dir={tmp_path}"])
    summary = train(cfg)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.json").is_file()
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.trainer.max_epochs == 2 and saved.run_dir == str(tmp_path)  # resolved config
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert Path(summary["best_checkpoint"]).is_file()
    assert json.loads((tmp_path / "probe_indices.json").read_text())["indices"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and 0.0 <= metrics["test"]["test/acc"] <= 1.0
    # CSV log beside W&B, and a real offline W&B run directory with its data file
    assert "val/acc" in (tmp_path / "csv" / "metrics.csv").read_text()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert metrics["wandb"]["mode"] == "offline"


def test_train_resume_from_checkpoint(tmp_path):
    # (a one-cycle schedule cannot be extended past its planned length, so this uses cosine)
    common = [*TINY, "logger=none", "module.scheduler.name=cosine"]
    first = train(compose_config("train", [*common, f"run_dir={tmp_path / 'a'}"]))
    cfg2 = compose_config(
        "train",
        [
            *common,
            f"run_dir={tmp_path / 'b'}",
            "trainer.max_epochs=3",
            f"ckpt_path={first['last_checkpoint']}",
        ],
    )
    second = train(cfg2)
    assert second["epochs"] == 3
    assert second["global_step"] == first["global_step"] * 3 // 2  # resumed, not restarted


def test_same_seed_same_result(tmp_path):
    out = [
        train(compose_config("train", [*TINY, f"run_dir={tmp_path / str(i)}", "logger=none", "trainer.max_epochs=1"]))
        for i in range(2)
    ]
    assert out[0]["test"] == out[1]["test"]
    other = train(
        compose_config(
            "train", [*TINY, f"run_dir={tmp_path / 'seed1'}", "logger=none", "trainer.max_epochs=1", "seed=1"]
        )
    )
    assert other["test"]["test/loss"] != out[0]["test"]["test/loss"]  # a different seed gives a different run


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "fragdefense.cli.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_overrides_and_multirun(tmp_path):
    r = _cli([*TINY, "trainer.max_epochs=1", "logger=csv", f"hydra.run.dir={tmp_path / 'single'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "single" / "metrics.json").is_file() and (tmp_path / "single" / ".hydra").is_dir()
    r = _cli(
        [
            "-m",
            *TINY,
            "trainer.max_epochs=1",
            "logger=none",
            "seed=0,1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    accs = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text())["seed"] for i in range(2)]
    assert accs == [0, 1]


def test_cli_unknown_key_names_it(tmp_path):
    r = _cli(["trainer.max_epoch=1"], tmp_path)
    assert r.returncode != 0 and "max_epoch" in (r.stderr + r.stdout)
