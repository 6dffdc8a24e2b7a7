"""FragilityMonitor: metrics on the probe set, no side effects on training (bitwise), W&B offline run read back,
CSV, the fragdefense-train summary, and 2-process DDP equal to 1 process. Real torch / Lightning / W&B (offline)."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from fragdefense.callbacks import FragilityMonitor, parse_eps
from fragdefense.cli._config import compose_config
from fragdefense.cli.train import train
from fragdefense.data import SyntheticDataModule
from fragdefense.lit import ClassifierModule
from fragdefense.models import create_model

DM_KW = {"n_train": 1280, "n_test": 128, "batch_size": 64, "probe_size": 32, "num_workers": 0}
FAST = {"steps": 3, "step_size": "3/255", "check_every": 3, "k": 50, "n_images_logged": 2}


def _dm(**kw) -> SyntheticDataModule:
    return SyntheticDataModule(**{**DM_KW, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """small_cnn (width 8) trained for 5 epochs on the synthetic train split (~80% probe accuracy, ~5 s)."""
    torch.manual_seed(0)
    dm = _dm()
    dm.setup()
    model = create_model("small_cnn", num_classes=10, width=8, mean=dm.mean, std=dm.std)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(dm.train_set, batch_size=64, shuffle=True)
    model.train()
    for _ in range(5):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("trained") / "model.pt"
    torch.save(model.state_dict(), path)
    return model, dm, path


# --- construction -----------------------------------------------------------------------------------------
def test_constructor_parses_and_validates():
    m = FragilityMonitor(eps="8/255", step_size="1/255", methods=["saliency", "input_x_gradient"])
    assert m.eps == 8 / 255 and m.step_size == 1 / 255 and m.methods == {"saliency": {}, "input_x_gradient": {}}
    m = FragilityMonitor(methods=OmegaConf.create({"integrated_gradients": {"steps": 4}}), attacks=["topk"])
    assert m.methods == {"integrated_gradients": {"steps": 4}}  # Hydra containers without _convert_
    assert parse_eps("0.5") == 0.5 and parse_eps(0.25) == 0.25
    with pytest.raises(ValueError, match="unknown monitor attack 'targeted'"):
        FragilityMonitor(attacks=["targeted"])
    with pytest.raises(ValueError, match="does not support create_graph"):
        FragilityMonitor(methods={"deeplift": {}}, attacks=["topk"])
    FragilityMonitor(methods={"deeplift": {}}, attacks=["random_sign"])  # no gradient through the map: fine
    with pytest.raises(ValueError, match="every_n_epochs"):
        FragilityMonitor(every_n_epochs=-1)
    with pytest.raises(ValueError, match="8/x"):
        FragilityMonitor(eps="8/x")
    with pytest.raises(ValueError, match="methods"):
        FragilityMonitor(methods={})


def test_configs_default_and_fragility_option(tmp_path):
    cfg = compose_config("train", [f"run_dir={tmp_path}"])
    assert cfg.callbacks.fragility._target_ == "fragdefense.callbacks.FragilityMonitor"
    thorough = compose_config("train", [f"run_dir={tmp_path}", "callbacks=fragility"]).callbacks
    assert set(cfg.callbacks) == set(thorough)  # the default callbacks plus the (thorough) monitor
    assert thorough.model_checkpoint == cfg.callbacks.model_checkpoint
    from hydra.utils import instantiate

    mon = instantiate(thorough.fragility)
    assert isinstance(mon, FragilityMonitor) and set(mon.attacks) == {"random_sign", "topk", "mass_center"}
    assert "integrated_gradients" in mon.methods and mon.eps == 8 / 255


# --- the evaluation ---------------------------------------------------------------------------------------
def test_evaluate_metrics_records_and_shard_invariance(trained):
    model, dm, _ = trained
    probe = dm.probe_batch()
    mon = FragilityMonitor(attacks=["random_sign", "topk"], **FAST)
    rep = mon.evaluate(model, probe)
    names = [n for n in mon.metric_names(with_mask=True) if n != "fragility/seconds"]
    assert list(rep.scalars())[:-1] == names  # logging order, mask metrics on synthetic data
    n_correct = round(rep.metrics["probe_acc"] * 32)
    assert 8 <= n_correct <= 32, "the fixture model should classify a fair share of the probe correctly"
    for a in ("random_sign", "topk"):
        rows = [r for r in rep.records if r["attack"] == a]
        assert len(rows) == n_correct
        for metric in ("topk_intersection", "spearman", "kendall", "center_shift", "lens_recall"):
            mean = math.fsum(r[metric] for r in rows) / len(rows)  # the logged means are those of the records
            assert rep.metrics[f"saliency/{a}/{metric}"] == mean
        assert rep.metrics[f"saliency/{a}/label_kept_rate"] == 1.0
        assert 0.0 <= rep.metrics[f"saliency/{a}/mask_mass_attacked"] <= 1.0
    # the targeted attack is stronger than the random baseline at the same eps (Ghorbani et al.)
    assert rep.metrics["saliency/topk/topk_intersection"] < rep.metrics["saliency/random_sign/topk_intersection"]
    ex = rep.examples[("saliency", "topk")]
    assert ex["x"].shape == (2, 3, 32, 32) and ex["adv_map"].shape == (2, 32, 32)
    assert (ex["x_adv"] - ex["x"]).abs().max() <= 8 / 255 + 1e-6  # within eps of the clean images
    # deterministic, and every image's result is independent of the sharding / batch size (random attacks
    # draw from per-image generators, also in batches): shards 0::2 and 1::2 together give exactly the
    # 1-process records, and equal records give equal means (float64, summed exactly)
    again = FragilityMonitor(attacks=["random_sign", "topk"], **{**FAST, "batch_size": 5}).evaluate(model, probe)
    assert again.metrics == rep.metrics and again.records == rep.records
    shards = [mon.evaluate(model, probe, rank=r, world_size=2, keep_examples=r == 0) for r in range(2)]
    merged = sorted(shards[0].records + shards[1].records, key=lambda r: (r["attack"], r["probe_pos"]))
    assert merged == sorted(rep.records, key=lambda r: (r["attack"], r["probe_pos"]))
    assert shards[0].examples and not shards[1].examples  # examples are kept only where asked (rank 0)
    assert FragilityMonitor(n_probe=8, **FAST).evaluate(model, probe).n_probe == 8


def test_evaluate_has_no_side_effects(trained):
    model, dm, _ = trained
    module = ClassifierModule(model, num_classes=10)
    module.train()
    bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.eval()  # a frozen BatchNorm inside a training model: its own flag must come back
    modes = {n: m.training for n, m in module.named_modules()}
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in module.parameters()]
    req = [p.requires_grad for p in module.parameters()]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    rng = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    mon = FragilityMonitor(
        methods={"saliency": {}, "smoothgrad": {"n_samples": 2}}, attacks=["random_sign", "topk"], **FAST
    )
    mon.evaluate(module.model, dm.probe_batch())
    assert {n: m.training for n, m in module.named_modules()} == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(module.parameters(), grads))
    assert [p.requires_grad for p in module.parameters()] == req
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())  # BN running stats too
    assert torch.equal(torch.random.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])


def test_records_are_the_engine_rows_of_fragdefense_eval(trained):
    """The monitor runs the evaluation engine: its records are ``run_grid``'s rows for the same images (ids = test
    indices), seed and protocol, so a random attack perturbs every image as ``fragdefense-eval`` does."""
    from fragdefense.evaluation import run_grid

    model, dm, _ = trained
    probe = dm.probe_batch()
    mon = FragilityMonitor(attacks=["random_sign", "topk"], seed=3, **FAST)
    rep = mon.evaluate(model, probe)
    data = [
        (probe["x"][:20], probe["y"][:20], probe["indices"][:20]),
        (probe["x"][20:], probe["y"][20:], probe["indices"][20:]),
    ]
    protocol = {k: v for k, v in mon._attack_kwargs().items() if k != "eps"} | {"k": mon.k}
    for res in run_grid(
        model, data, explainers=["saliency"], attacks=mon.attacks, eps=["8/255"], protocol=protocol, seed=3
    ):
        mine = [
            {k: v for k, v in r.items() if not k.startswith("mask_mass")}
            for r in rep.records
            if r["attack"] == res.cell.attack
        ]
        assert len(mine) == len(res.rows) > 0
        for r, e in zip(mine, res.rows):
            assert r["test_index"] == e["image"] == probe["indices"][r["probe_pos"]]
            assert {k: v for k, v in r.items() if k not in ("method", "attack", "eps", "probe_pos", "test_index")} == {
                k: v for k, v in e.items() if k != "image"
            }
        assert rep.cells[("saliency", res.cell.attack)]["n_images"] == res.aggregate["n_images"]
        for name in ("spearman", "topk_intersection", "label_kept_rate", "perturbed_rate"):
            assert rep.metrics[f"saliency/{res.cell.attack}/{name}"] == res.aggregate[name]


def test_cells_without_attacked_or_perturbed_images_are_flagged(tmp_path):
    """NaN is logged where no probe image was attacked; the summary says why instead of giving numbers, and flags
    cells where nothing was perturbed or the ascent gradient was zero (a similarity of 1 there is not robustness)."""
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=4).eval()
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        pred = net(x).argmax(1)
    probe = {"x": x, "y": (pred + 1) % 10, "mask": None, "indices": list(range(10, 16))}  # all misclassified
    kw = {"attacks": ["random_sign", "topk"], "steps": 2, "check_every": 1, "k": 20, "maps_png": None}
    mon = FragilityMonitor(**kw)
    rep = mon.evaluate(net, probe)
    assert rep.metrics["probe_acc"] == 0.0 and rep.records == [] and rep.examples == {}
    names = [n for n in mon.metric_names(with_mask=False) if n != "fragility/seconds"]
    assert list(rep.scalars())[:-1] == names  # still every scalar (checkpoint monitors may read them) ...
    assert all(math.isnan(v) for k, v in rep.metrics.items() if k != "probe_acc")  # ... as NaN
    mon.final = rep
    for v in mon.summary()["methods"]["saliency"]["attacks"].values():
        assert v["n_attacked"] == 0 and v["acc_attacked"] == 0.0
        assert "spearman" not in v and "topk_intersection" not in v  # no numbers ...
        assert v["text"] == "acc 0.00%: no probe image attacked (all misclassified)"  # ... but the reason
        assert any("no probe image attacked (all misclassified)" in n for n in v["notes"])
    assert "acc 0.00%: no probe image attacked" in json.dumps(mon.summary())  # JSON-ready

    # eps 0: every image attacked, none perturbed -> the similarities (1.0) are not reported as robustness
    mon0 = FragilityMonitor(**{**kw, "eps": 0, "step_size": 0})
    mon0.final = mon0.evaluate(net, {**probe, "y": pred})
    for a, v in mon0.summary()["methods"]["saliency"]["attacks"].items():
        assert mon0.final.metrics[f"saliency/{a}/perturbed_rate"] == 0.0 and v["n_attacked"] == 6
        assert "no image perturbed" in v["text"] and "1.000" not in v["text"] and v["notes"]

    # a linear model: its saliency map does not depend on the input, the top-k ascent gradient is zero
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10)).eval()
    monl = FragilityMonitor(**kw)
    with pytest.warns(RuntimeWarning, match="identically zero"):
        monl.final = monl.evaluate(lin, {**probe, "y": lin(x).argmax(1)})
    topk = monl.summary()["methods"]["saliency"]["attacks"]["topk"]
    assert topk["zero_gradient_rate"] == 1.0 and "zero ascent gradient" in topk["text"] and "1.000" not in topk["text"]
    assert any("zero ascent gradient" in n for n in topk["notes"])
    assert all(r["zero_gradient"] for r in monl.final.records if r["attack"] == "topk")

    # in a trainer, the global-zero process warns about such cells at every evaluation
    dm = SyntheticDataModule(n_train=64, n_test=32, batch_size=32, probe_size=4, image_size=16)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[FragilityMonitor(**kw, probe=(x, lin(x).argmax(1)))],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(RuntimeWarning, match="FragilityMonitor, saliency / topk: .*zero ascent gradient"):
        trainer.validate(ClassifierModule(lin, num_classes=10), datamodule=dm, verbose=False)


# --- training is not disturbed ----------------------------------------------------------------------------
def _fit(tmp: Path, monitor: FragilityMonitor | None) -> tuple[dict[str, torch.Tensor], list[dict[str, str]]]:
    L.seed_everything(0, workers=True, verbose=False)
    dm = SyntheticDataModule(
        n_train=256, n_test=64, batch_size=32, probe_size=16, augment={"crop_padding": 2, "hflip": True}
    )
    module = ClassifierModule(
        create_model("small_cnn", num_classes=10, width=8, mean=dm.mean, std=dm.std),
        num_classes=10,
        scheduler={"name": "onecycle"},
    )
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        check_val_every_n_epoch=2,  # epochs 0 and 2 without validation: the on_train_epoch_end fallback
        num_sanity_val_steps=2,  # the sanity check must not trigger the monitor
        logger=CSVLogger(tmp, name="csv", version=""),
        callbacks=[monitor] if monitor is not None else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    trainer.fit(module, datamodule=dm)
    rows = list(csv.DictReader((tmp / "csv" / "metrics.csv").open()))
    return {k: v.clone() for k, v in module.state_dict().items()}, rows


def test_monitor_does_not_change_training(tmp_path):
    mon = FragilityMonitor(
        methods={"saliency": {}, "smoothgrad": {"n_samples": 2}},
        attacks=["random_sign", "topk"],
        random_start=False,
        maps_png=None,
        **FAST,
    )
    w_off, rows_off = _fit(tmp_path / "off", None)
    w_on, rows_on = _fit(tmp_path / "on", mon)
    assert w_off.keys() == w_on.keys()
    assert all(torch.equal(w_off[k], w_on[k]) for k in w_off), "weights differ with the monitor on"

    def losses(rows):
        return [(r["epoch"], r["train/loss"]) for r in rows if r.get("train/loss")]

    assert losses(rows_off) == losses(rows_on) and len(losses(rows_on)) == 3
    frag_epochs = sorted(int(r["epoch"]) for r in rows_on if r.get("fragility/probe_acc"))
    assert frag_epochs == [0, 1, 2]  # every epoch: fallback (0, 2) and end-of-epoch validation (1)
    assert not any(k.startswith("fragility/") for k in rows_off[0])
    assert mon.final is mon.last and mon.final.epoch == 2  # the end of fit reuses the last epoch's result


def test_checkpoint_can_select_on_a_fragility_metric(tmp_path):
    """The evaluation runs in on_validation_epoch_end, so ModelCheckpoint (on_validation_end) sees its metrics."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = SyntheticDataModule(n_train=256, n_test=64, batch_size=32, probe_size=16)
    module = ClassifierModule(create_model("small_cnn", num_classes=10, width=8, mean=dm.mean, std=dm.std), 10)
    ck = ModelCheckpoint(dirpath=tmp_path, monitor="fragility/saliency/topk/spearman", mode="max", save_top_k=1)
    mon = FragilityMonitor(steps=2, check_every=2, maps_png=None)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        callbacks=[ck, mon],  # the checkpoint callback first: the order does not matter
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert ck.best_model_score is not None and Path(ck.best_model_path).is_file()
    assert float(ck.best_model_score) == max(
        float(trainer.callback_metrics["fragility/saliency/topk/spearman"]), float(ck.best_model_score)
    )


# --- W&B (offline, read back), CSV, metrics.json, printed summary, PNG ----------------------------------------
def _wandb_records(path: Path):
    """Records of a W&B ``run-*.wandb`` file (LevelDB-log framing: 32 KiB blocks of 7-byte-header chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 2):  # full / first
            buf = chunk
        else:  # middle / last
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_train_logs_fragility_to_wandb_csv_and_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich: no wrapping of the summary table
    overrides = [
        "data.n_train=1280",
        "data.n_test=128",
        "data.batch_size=64",
        "data.probe_size=32",
        "model.width=8",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "callbacks.fragility.steps=3",
        "callbacks.fragility.check_every=3",
        "callbacks.fragility.log_images_every_n_epochs=1",
        "callbacks.fragility.n_images_logged=2",
        "module.optimizer.name=adam",
        "module.optimizer.lr=0.003",
        "~module.optimizer.momentum",
        "~module.optimizer.nesterov",
        f"run_dir={tmp_path}",
    ]
    summary = train(compose_config("train", overrides))
    # metrics.json and the printed table
    f = json.loads((tmp_path / "metrics.json").read_text())["fragility"]
    assert f == json.loads(json.dumps(summary["fragility"])) and f["epoch"] == 1 and f["n_probe"] == 32
    topk = f["methods"]["saliency"]["attacks"]["topk"]
    assert {"topk_intersection", "spearman", "acc_attacked", "mask_mass_attacked"} <= set(topk)
    assert f["probe_acc"] > 0 and math.isclose(topk["acc_attacked"], f["probe_acc"] * topk["label_kept_rate"])
    assert topk["n_attacked"] == round(f["probe_acc"] * 32) and topk["text"].startswith("acc ")
    png = Path(f["maps_png"])
    assert png == tmp_path / "fragility_maps.png" and png.stat().st_size > 1000
    out = capsys.readouterr().out
    assert "fragility probe" in out and "saliency / topk" in out and "fragility_maps.png" in out
    # CSV: every fragility metric, once per epoch
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    frag = [r for r in rows if r.get("fragility/saliency/topk/spearman")]
    assert [int(r["epoch"]) for r in frag] == [0, 1]
    names = FragilityMonitor(attacks=["random_sign", "topk"]).metric_names(with_mask=True)
    assert set(names) <= set(rows[0])
    # W&B offline run: history, metric definitions (x axis = epoch), images, the per-image table, config
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    history, defined, config = [], {}, {}
    for rec in _wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "metric":
            defined[rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
        elif kind == "config":
            config.update({i.key: i.value_json for i in rec.config.update})
    scal = [h for h in history if "fragility/saliency/topk/topk_intersection" in h]
    assert [h["epoch"] for h in scal] == [0, 1]
    assert all(n in scal[-1] for n in names)
    assert scal[-1]["fragility/saliency/topk/spearman"] == pytest.approx(topk["spearman"], abs=1e-6)
    assert defined["fragility/saliency/topk/spearman"] == "epoch" and defined["fragility/*"] == "epoch"
    imgs = [h for h in history if "fragility/saliency/topk/examples/_type" in h]
    assert [h["epoch"] for h in imgs] == [0, 1] and imgs[0]["fragility/saliency/topk/examples/count"] == 2
    tables = [h for h in history if h.get("fragility/per_image/_type") == "table-file"]
    assert len(tables) == 1 and any("fragility/maps/_type" in h for h in history)
    table = json.loads((run_dir / "files" / tables[0]["fragility/per_image/path"]).read_text())
    cols = {"method", "attack", "eps", "test_index", "label", "zero_gradient", "topk_intersection", "spearman"}
    assert cols <= set(table["columns"])
    assert len(table["data"]) == 2 * round(f["probe_acc"] * 32)  # attacked images x 2 attacks
    assert "fragility_monitor" in config and "saliency" in config["fragility_monitor"]


# --- DDP: 2 CPU processes give the metrics of 1 process ------------------------------------------------------
_DDP_SCRIPT = """
import json, sys
import lightning as L, torch
from lightning.pytorch.loggers import CSVLogger
from fragdefense.callbacks import FragilityMonitor
from fragdefense.data import SyntheticDataModule
from fragdefense.lit import ClassifierModule
from fragdefense.models import create_model

DM_KW, FAST, ckpt, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
dm = SyntheticDataModule(**DM_KW)
module = ClassifierModule(create_model("small_cnn", num_classes=10, width=8, mean=dm.mean, std=dm.std), 10)
module.model.load_state_dict(torch.load(ckpt))
mon = FragilityMonitor(attacks=["random_sign", "topk"], **FAST)
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=CSVLogger(out, name="csv", version=""),
                    callbacks=[mon], max_epochs=1, limit_train_batches=2, default_root_dir=out,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.validate(module, datamodule=dm, verbose=False)
rep = mon.last
result = {"world": trainer.world_size, "metrics": rep.metrics, "records": rep.records,
          "examples": len(rep.examples), "threads": torch.get_num_threads()}
trainer.fit(module, datamodule=dm)  # and a short fit: per-epoch logging, end-of-fit gather, PNG on rank 0
result["fit_records"] = len(mon.final.records)
result["png"] = str(mon.png_path) if mon.png_path else None
with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
    json.dump(result, f)
"""


def test_ddp_two_processes_match_one_process(trained, tmp_path):
    """Lightning's DDP (subprocess launcher, gloo) in a script run by ``subprocess``; the same fixed weights are
    evaluated by ``trainer.validate``. Per-image records are bitwise equal, and so are the means (computed on every
    process from the gathered records, float64, summed exactly: independent of the order)."""
    _, _, ckpt = trained
    script = tmp_path / "ddp_monitor.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run(
        [sys.executable, str(script), json.dumps(DM_KW), json.dumps(FAST), str(ckpt), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["examples"] > 0 and ranks[1]["examples"] == 0  # images: rank 0
    assert ranks[0]["png"] and Path(ranks[0]["png"]).is_file() and ranks[1]["png"] is None
    assert ranks[0]["fit_records"] == ranks[1]["fit_records"] > 0  # gathered on every process
    rows = list(csv.DictReader((tmp_path / "out" / "csv" / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("fragility/saliency/topk/spearman")) == 2  # validate + the fit epoch

    # reference: one process, same weights, the same hook (trainer.validate)
    dm = _dm()
    module = ClassifierModule(create_model("small_cnn", num_classes=10, width=8, mean=dm.mean, std=dm.std), 10)
    module.model.load_state_dict(torch.load(ckpt))
    mon = FragilityMonitor(attacks=["random_sign", "topk"], **FAST)
    L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[mon],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).validate(module, datamodule=dm, verbose=False)
    ref = mon.last
    for rk in ranks:  # every process holds the same metrics and all the records
        assert rk["records"] == json.loads(json.dumps(ref.records))
        assert rk["metrics"] == json.loads(json.dumps(ref.metrics))  # exactly (no NaN: images are attacked)
    assert len(ref.records) == 2 * round(ref.metrics["probe_acc"] * DM_KW["probe_size"]) > 0
