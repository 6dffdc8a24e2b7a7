"""Certified attributions as evaluation cells (fragdefense.evaluation.certified), their figure, the CertifiedMonitor
in a real Lightning Trainer, and the thread-local input-range switch of the certification.

References: every row is checked against direct per-image calls of certify_attribution / certified_deletion /
certified_localization with the documented seeds, on a float64 model (rates exactly equal, probabilities to 1e-12);
the aggregate against an independent mean of the rows (1e-12)."""

from __future__ import annotations

import csv
import json
import math
import threading

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from fragdefense.attributions._common import allow_unbounded_inputs, check_x
from fragdefense.callbacks import CertifiedMonitor
from fragdefense.certify import certified_deletion, certified_localization, certify_attribution
from fragdefense.evaluation.certified import (
    check_certify_settings,
    rate_key,
    run_certify,
    run_certify_cell,
)
from fragdefense.evaluation.engine import explainer_specs
from fragdefense.evaluation.figures import plot_certified_maps
from fragdefense.evaluation.store import CellStore
from fragdefense.models import create_model, load_checkpoint_model
from fragdefense.utils.conventions import image_seed

SET = {"sigma": 0.25, "n0": 5, "n": 60, "top_percent": 25.0, "correction": "none", "radii": [0.0, 0.05, 0.1]}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=3, width=4).double().eval()
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    ids = [10, 11, 12, 13, 14]
    masks = torch.rand(5, 8, 8) > 0.5
    return net, x, y, ids, masks


def _batches(x, y, ids, sizes):  # noqa: ANN001
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s], ids[i : i + s]))
        i += s
    return out


def test_rows_and_aggregate_equal_direct_calls(setup):
    net, x, y, ids, masks = setup
    spec = explainer_specs(["saliency"])["saliency"]
    by_id = dict(zip(ids, masks))
    res = run_certify_cell(net, _batches(x, y, ids, [3, 2]), spec, **SET, require_correct=False, masks=by_id)
    assert [r["image"] for r in res.rows] == ids and res.cell.key == "saliency__certify"
    s = {k: v for k, v in SET.items() if k != "radii"}
    certified_any = 0.0
    for j, i in enumerate(ids):
        xi, yi = x[j : j + 1], y[j : j + 1]
        ref = certify_attribution(
            net, xi, "saliency", target=yi, generator=[image_seed(0, "saliency", "certify", i)], **s
        )
        dele = certified_deletion(net, xi, ref, generator=[image_seed(0, "saliency", "certify", i, "deletion")])
        loc = float(certified_localization(ref, masks[j : j + 1])[0])
        row = res.rows[j]
        assert row["label"] == int(yi)
        assert row["certified_rate"] == float(ref.certified_rate[0])
        assert row["certified_important_rate"] == float((ref.labels == 1).double().mean())
        assert row["abstain_rate"] == pytest.approx(float((ref.labels == -1).double().mean()), abs=1e-12)
        for q, r in enumerate(SET["radii"]):
            assert row[rate_key(r)] == float(ref.certified_rate_at(SET["radii"])[0, q])
        assert row["common_radius"] == pytest.approx(0.25 * 0.6744897501960817, abs=1e-9)
        assert row["deletion_drop_certified"] == pytest.approx(float(dele.drop_certified[0]), abs=1e-12)
        assert row["deletion_drop_random"] == pytest.approx(float(dele.drop_random[0]), abs=1e-12)
        assert (row["localization"] is None) if math.isnan(loc) else row["localization"] == pytest.approx(loc, 1e-12)
        certified_any += row["certified_rate"]
    assert certified_any > 0  # the reference comparison is not vacuous
    for k in ("certified_rate", "certified_important_rate", rate_key(0.05), "deletion_drop_certified"):
        assert res.aggregate[k] == pytest.approx(math.fsum(r[k] for r in res.rows) / 5, abs=1e-12)
    assert res.aggregate["n_images"] == 5 and res.aggregate["n_skipped"] == 0


def test_require_correct_skips_misclassified(setup):
    net, x, y, ids, _ = setup
    pred = net(x).argmax(1)
    spec = explainer_specs(["saliency"])["saliency"]
    res = run_certify_cell(net, _batches(x, pred, ids, [5]), spec, **SET)
    assert res.aggregate["n_images"] == 5
    wrong = (pred + 1) % 3
    wrong[0] = pred[0]
    res = run_certify_cell(net, _batches(x, wrong, ids, [5]), spec, **SET)
    assert [r["image"] for r in res.rows] == [10] and res.aggregate["n_skipped"] == 4


@pytest.mark.parametrize("method", ["saliency", "smoothgrad"])
def test_rows_do_not_depend_on_batch_composition(setup, method):
    net, x, y, ids, masks = setup
    spec = explainer_specs({method: {"n_samples": 3} if method == "smoothgrad" else {}})[method]
    a = run_certify_cell(net, _batches(x, y, ids, [5]), spec, **SET, require_correct=False, seed=3)
    b = run_certify_cell(net, _batches(x, y, ids, [2, 1, 2]), spec, **SET, require_correct=False, seed=3)
    assert a.rows == b.rows
    # a dict batch with masks, images in another order: the same rows per image id
    perm = [3, 0, 4, 1, 2]
    c = run_certify_cell(
        net,
        [{"x": x[perm], "y": y[perm], "ids": [ids[p] for p in perm], "mask": masks[perm]}],
        spec,
        **SET,
        require_correct=False,
        seed=3,
    )
    by_id = {r["image"]: {k: v for k, v in r.items() if k != "localization"} for r in c.rows}
    assert all(by_id[r["image"]] == r for r in a.rows)
    assert all("localization" in r for r in c.rows)
    d = run_certify_cell(net, _batches(x, y, ids, [5]), spec, **SET, require_correct=False, seed=4)
    assert d.rows != a.rows  # the seed matters


def test_store_resumes_and_merges(setup, tmp_path):
    net, x, y, ids, _ = setup
    data = _batches(x, y, ids, [3, 2])
    cfg = {"settings": SET, "seed": 0}
    calls = []
    first = list(
        run_certify(net, data, explainers=["saliency", "input_x_gradient"], settings=SET,
                    store=CellStore(tmp_path, cfg), require_correct=False,
                    progress=lambda c, n: calls.append((c.key, n)))
    )  # fmt: skip
    assert [r.cell.key for r in first] == ["saliency__certify", "input_x_gradient__certify"]
    assert calls == [("saliency__certify", 3), ("saliency__certify", 2)] + [("input_x_gradient__certify", 3)] + [
        ("input_x_gradient__certify", 2)
    ]
    store = CellStore(tmp_path, cfg)
    assert store.finished_keys() == ["input_x_gradient__certify", "saliency__certify"]
    calls.clear()
    again = list(
        run_certify(net, data, explainers=["saliency", "input_x_gradient"], settings=SET, store=store,
                    require_correct=False, progress=lambda c, n: calls.append(c.key))
    )  # fmt: skip
    assert calls == [] and all(r.resumed for r in again)
    for f, g in zip(first, again):
        assert json.loads(json.dumps(f.rows)) == g.rows and g.aggregate == pytest.approx(f.aggregate)
    merged = store.merge(first[0].cell)
    assert merged.aggregate["certified_rate"] == pytest.approx(first[0].aggregate["certified_rate"], abs=1e-12)
    with pytest.raises(ValueError, match="different configuration"):
        CellStore(tmp_path, {"settings": {**SET, "sigma": 0.5}, "seed": 0})


def test_settings_are_checked_before_work(setup):
    net, x, y, ids, _ = setup
    data = _batches(x, y, ids, [5])
    for bad, match in (
        ({"sigmas": 1}, "unknown certification setting"),
        ({"sigma": 0}, "sigma"),
        ({"radii": [-0.1]}, "radii"),
        ({"radii": []}, "radii"),
        ({"tau": 0.4}, "tau"),
        ({"correction": "sidak"}, "correction"),
        ({"n": 0}, "n"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            next(run_certify(net, data, explainers=["saliency"], settings=bad))
    assert check_certify_settings({"radii": 0.1})["radii"] == [0.1]


def test_examples_and_figure(setup, tmp_path):
    net, x, y, ids, _ = setup
    spec = explainer_specs(["saliency"])["saliency"]
    res = run_certify_cell(net, _batches(x, y, ids, [2, 3]), spec, **SET, require_correct=False, n_examples=3)
    ex = res.examples
    assert ex["x"].shape == (3, 3, 8, 8) and ex["labels"].shape == ex["clean_map"].shape == ex["radius"].shape
    assert ex["id"].tolist() == ids[:3]
    for j in range(3):  # the kept labels are those of the rows
        assert float((ex["labels"][j] >= 0).double().mean()) == res.rows[j]["certified_rate"]
        kept = ((ex["labels"][j] >= 0) & (ex["radius"][j] >= 0.05)).double().mean()
        assert float(kept) == res.rows[j][rate_key(0.05)]
    from fragdefense.attributions import saliency

    ref = saliency(net, x[:3], y[:3]).abs().sum(1)
    assert torch.allclose(ex["clean_map"], ref, atol=1e-12)
    p = plot_certified_maps(ex, [0.0, 0.1], tmp_path / "maps.png", title="t", row_labels=["saliency"] * 3)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_range_switch_is_local_to_the_thread():
    x = torch.full((1, 3, 2, 2), 1.5)
    inside, done = threading.Event(), threading.Event()
    seen: list[str] = []

    def other() -> None:
        inside.wait(5)
        try:
            check_x(x)
            seen.append("accepted")
        except ValueError:
            seen.append("refused")
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with allow_unbounded_inputs():
        inside.set()
        done.wait(5)
        assert check_x(x) is x  # lifted here ...
    t.join()
    assert seen == ["refused"]  # ... but not in the other thread while the block was open
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_x(x)  # and back after the block


# --- the monitor in a Trainer ------------------------------------------------------------------------------------
DM_KW = {"n_train": 128, "n_test": 32, "batch_size": 64, "probe_size": 8, "num_workers": 0, "image_size": 16}
MODEL_CFG = {"name": "small_cnn", "num_classes": 10, "width": 4, "mean": [0.5] * 3, "std": [0.25] * 3}
MON_KW = {"n_images": 4, "n0": 4, "n": 40, "correction": "none", "radii": [0.0, 0.1]}


def _fit(root, monitor, epochs, ckpt_path=None):  # noqa: ANN001
    from fragdefense.data import SyntheticDataModule
    from fragdefense.lit import ClassifierModule

    L.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(**DM_KW)
    module = ClassifierModule(
        create_model(**MODEL_CFG), 10, optimizer={"name": "sgd", "lr": 0.05}, model_config=MODEL_CFG
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=CSVLogger(root, name="csv", version=0),
        callbacks=[
            ModelCheckpoint(
                dirpath=root / "checkpoints", filename="ep{epoch}", auto_insert_metric_name=False, save_top_k=-1
            ),
            monitor,
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return dm, trainer


def test_monitor_logs_history_and_survives_resume(tmp_path):
    from fragdefense.data import SyntheticDataModule

    mon = CertifiedMonitor(**MON_KW)
    _fit(tmp_path, mon, 2)
    assert [h["epoch"] for h in mon.history] == [0, 1]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("certify/certified_rate")]
    assert len(logged) == 2 and all(r.get("certify/rate_at_0.1") not in (None, "") for r in logged)
    assert float(logged[-1]["certify/certified_rate"]) == pytest.approx(mon.history[-1]["certified_rate"], rel=1e-6)
    assert "localization" in mon.history[-1] or mon.history[-1]["certified_important_rate"] == 0
    saved = json.loads((tmp_path / "certified_history.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [0, 1] and saved["settings"]["n"] == 40
    # the last entry is run_certify_cell on the final weights and the datamodule's probe
    dm = SyntheticDataModule(**DM_KW)
    dm.setup("test")
    probe = dm.probe_batch()
    net = load_checkpoint_model(tmp_path / "checkpoints" / "ep1.ckpt")
    spec = explainer_specs(["saliency"])["saliency"]
    batch = {"x": probe["x"][:4], "y": probe["y"][:4], "ids": probe["indices"][:4], "mask": probe["mask"][:4]}
    direct = run_certify_cell(net, [batch], spec, **{k: v for k, v in MON_KW.items() if k != "n_images"},
                              require_correct=False)  # fmt: skip
    for k in ("certified_rate", "rate_at_0.1", "deletion_drop_random"):
        assert mon.history[-1][k] == pytest.approx(direct.aggregate[k], abs=1e-6), k
    # resume from the epoch-0 checkpoint with a fresh monitor: the history continues
    mon2 = CertifiedMonitor(**MON_KW)
    _fit(tmp_path / "resumed", mon2, 2, ckpt_path=tmp_path / "checkpoints" / "ep0.ckpt")
    assert [h["epoch"] for h in mon2.history] == [0, 1]
    assert mon2.history[0] == mon.history[0]
    saved2 = json.loads((tmp_path / "resumed" / "certified_history.json").read_text())
    assert [h["epoch"] for h in saved2["history"]] == [0, 1]


def test_monitor_validates_arguments():
    with pytest.raises(ValueError, match="every_n_epochs"):
        CertifiedMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="sigma"):
        CertifiedMonitor(sigma=-1)
    with pytest.raises(ValueError, match="unknown attribution|method"):
        CertifiedMonitor(method="no_such_method")
