"""InfluenceMonitor in a tiny real Lightning run (synthetic data): metrics logged, PNGs / W&B images, no side
effects on training (bitwise), and the fragdefense-influence command end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from fragdefense.callbacks.influence import InfluenceMonitor
from fragdefense.cli._config import compose_config
from fragdefense.cli.influence import influence
from fragdefense.data import SyntheticDataModule
from fragdefense.influence import LastLayerInfluence, feature_extractor
from fragdefense.lit import ClassifierModule
from fragdefense.models import create_model

DM_KW = {"n_train": 192, "n_test": 64, "batch_size": 32, "probe_size": 8, "num_workers": 0, "val_fraction": 0.125}
MON_KW = {"n_probe": 4, "n_train": 48, "k": 3, "n_images_logged": 2}


def _fit(tmp_path: Path, callbacks: list, logger=False, epochs: int = 2):
    L.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(**DM_KW)
    module = ClassifierModule(create_model("small_cnn", num_classes=10, width=4), num_classes=10)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module, dm


def test_monitor_in_a_lightning_run_logs_metrics_pngs_and_has_no_side_effects(tmp_path):
    mon = InfluenceMonitor(every_n_epochs=1, **MON_KW)
    trainer, module, dm = _fit(tmp_path / "on", [mon], logger=CSVLogger(tmp_path / "on", name="csv"))
    names = {f"influence/{a}/{m}" for a in ("gradient", "random_sign") for m in ("spearman", "topk_kept")}
    assert names | {"influence/self_influence_mean", "influence/seconds"} <= set(trainer.callback_metrics)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("influence/gradient/spearman")]
    assert len(logged) == 2  # every epoch
    for r in logged:
        assert -1.0 <= float(r["influence/gradient/spearman"]) <= 1.0
        assert 0.0 <= float(r["influence/random_sign/topk_kept"]) <= 3.0
    assert [p.name for p in mon.png_paths] == ["epoch_000.png", "epoch_001.png"]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in mon.png_paths)
    # the last evaluation equals an independent recomputation with the final weights
    net = module.model.eval()
    data = mon._data
    feats = feature_extractor(net)
    with torch.no_grad():
        phi = feats(data["x_train"])
    inf = LastLayerInfluence(net.backbone.head.weight, net.backbone.head.bias, damping=1e-3).fit(phi, data["y_train"])
    torch.testing.assert_close(
        mon.last["metrics"]["self_influence_mean"], float(inf.self_influence().mean()), rtol=1e-6, atol=1e-9
    )
    # training is bitwise unaffected by the monitor (weights after 2 epochs, with and without)
    _, plain, _ = _fit(tmp_path / "off", [])
    for (n, a), (_, b) in zip(module.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n


class _ModeProbe(L.Callback):
    """Records every submodule's train flag and the RNG state right after the monitor's on_train_epoch_end."""

    def __init__(self) -> None:
        self.modes: list[list[bool]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.modes.append([m.training for m in pl_module.modules()])


def test_monitor_without_validation_runs_at_train_epoch_end_and_restores_train_mode(tmp_path):
    mon, probe = InfluenceMonitor(**MON_KW), _ModeProbe()
    L.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(**DM_KW)
    module = ClassifierModule(create_model("small_cnn", num_classes=10, width=4), num_classes=10)
    trainer = L.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[mon, probe],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert mon.last is not None and mon.last["epoch"] == 0  # the fallback hook evaluated
    assert probe.modes and all(probe.modes[0])  # everything back in train mode after the (eval-mode) evaluation


def test_monitor_every_n_epochs_and_wandb_image_panels(tmp_path):
    wb = WandbLogger(project="fragdefense-tests", save_dir=str(tmp_path), offline=True)
    mon = InfluenceMonitor(every_n_epochs=2, attacks=["gradient"], **MON_KW)
    trainer, _, _ = _fit(tmp_path, [mon], logger=wb, epochs=3)
    run_dir = Path(wb.experiment.dir)
    wb.experiment.finish()
    assert mon.last is not None and mon.last["epoch"] == 1  # only after epoch index 1 (every 2 epochs, 3 epochs)
    assert mon.png_paths == []  # a W&B logger is present and save_png is off
    media = list((run_dir / "media" / "images").glob("influence/top_influential*.png"))
    assert len(media) == 2 * MON_KW["n_images_logged"]  # clean + attacked strip per logged probe image
    assert "influence/random_sign/spearman" not in trainer.callback_metrics


def test_monitor_bad_arguments():
    with pytest.raises(ValueError, match="unknown influence attack 'topk'"):
        InfluenceMonitor(attacks=["topk"])
    with pytest.raises(ValueError, match="every_n_epochs"):
        InfluenceMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="damping"):
        InfluenceMonitor(damping=-1.0)
    with pytest.raises(ValueError, match="8/x"):
        InfluenceMonitor(eps="8/x")
    with pytest.raises(ValueError, match="rank_by"):
        InfluenceMonitor(rank_by="top")


# --- the command --------------------------------------------------------------------------------------------
TINY = [
    "model_name=small_cnn",
    "+model_kwargs.width=4",
    "data.n_train=300",
    "data.n_test=100",
    "classes=[disc_stripes,disc_checks]",
    "n_train=40",
    "n_test=6",
    "n_figure_images=2",
    "device=cpu",
]


def test_influence_command_end_to_end(tmp_path):
    cfg = compose_config("influence", [*TINY, f"out_dir={tmp_path}"])
    payload = influence(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["attacks"].keys() == {"gradient", "random_sign"} and saved["classes"] == [
        "disc_stripes",
        "disc_checks",
    ]
    assert saved["binary_logistic"] is True and saved["n_head_params"] == 4 * 4 + 1  # small_cnn width 4: 16 features
    assert saved["n_test"] == 6 and len(saved["attacks"]["gradient"]["images"]) == 6
    for a in ("gradient", "random_sign"):
        r = saved["attacks"][a]
        assert -1 <= r["spearman"] <= 1 and 0 <= r["topk_kept"] <= 5 and sum(r["topk_kept_hist"]) == 6
        assert r["protocol"]["eps"] == pytest.approx(8 / 255) and r["protocol"]["label_enforced"] is False
        img = r["images"][0]
        assert set(img["topk_clean"]) <= set(saved["train_indices"]) and img["test_index"] in saved["test_indices"]
    assert payload["attacks"]["gradient"]["spearman"] == saved["attacks"]["gradient"]["spearman"]
    assert (tmp_path / "top_influential.png").stat().st_size > 1000 and (tmp_path / "results.md").is_file()
    # the model's own head (two of its ten rows): a softmax over two logits needs damping
    cfg = compose_config("influence", [*TINY, f"out_dir={tmp_path / 'own'}", "head_mode=model", "damping=1e-3", "l2=0"])
    own = influence(cfg)
    assert own["binary_logistic"] is False and own["n_head_params"] == 2 * 17


def test_influence_command_bad_config(tmp_path):
    with pytest.raises(ValueError, match="head_mode"):
        influence(compose_config("influence", [*TINY, f"out_dir={tmp_path}", "head_mode=nope"]))
    with pytest.raises(ValueError, match="not a class name"):
        influence(compose_config("influence", [*TINY, f"out_dir={tmp_path}", "classes=[cat,dog]"]))
    with pytest.raises(ValueError, match="classes"):
        influence(compose_config("influence", [*TINY, f"out_dir={tmp_path}", "classes=[1,1]"]))
    with pytest.raises(ValueError, match="checkpoint"):
        influence(compose_config("influence", [*TINY[1:], f"out_dir={tmp_path}"]))
