"""The evaluation engine and fragdefense-eval on it: per-image seeding independent of batch size and processes,
streamed data, kill-and-rerun resume, refused config changes, errors before work, zero attacked images, W&B read
back from the offline run, 2-process ddp_cpu equal to one process, and the defense comparison."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from wandb_offline import history_keys, load_table, read_offline_run

from fragdefense.cli._config import compose_config
from fragdefense.cli.evaluate import evaluate
from fragdefense.cli.train import train
from fragdefense.evaluation import CellStore, aggregate_rows, run_grid
from fragdefense.evaluation.figures import plot_metrics_vs_eps
from fragdefense.evaluation.report import grid_table
from fragdefense.models import create_model

DATA = ["data.n_train=320", "data.n_test=128"]
GRID = [
    "n_images=24",
    "batch_size=8",
    "eps=[4/255,8/255]",
    "attacks=[random_sign,topk]",
    "protocol.steps=3",
    "protocol.step_size=1/255",
    "protocol.k=40",
    "~methods",
    "+methods={saliency:{}}",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train")
    os.environ.setdefault("WANDB_MODE", "offline")
    cfg = compose_config(
        "train",
        [
            *DATA,
            "data.batch_size=32",
            "data.probe_size=4",
            "model.width=8",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "callbacks.fragility.n_probe=2",
            "callbacks.fragility.steps=1",
            "logger=csv",
            f"run_dir={run}",
        ],
    )
    train(cfg)
    return run / "checkpoints" / "last.ckpt"


def _read_run(out: Path, timeout: float = 60.0) -> dict:
    """The offline run, once W&B's service has written its exit record (it flushes after ``finish`` returns)."""
    deadline = time.time() + timeout
    while True:
        run = read_offline_run(out)
        if run["exit_code"] is not None or time.time() > deadline:
            return run
        time.sleep(0.2)


def _eval_cfg(ckpt: Path, out: Path, *extra: str):
    return compose_config("eval", [f"checkpoint={ckpt}", f"out_dir={out}", *DATA, *GRID, *extra])


def _cli(*args: str, env_extra: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "fragdefense.cli.evaluate", *args]


def _per_image(payload: dict) -> dict:
    return {(c["method"], c["attack"], c["epsilon"]): c["images"] for c in payload["per_image"]}


def _assert_same_rows(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        ra, rb = a[key], b[key]
        assert [r["image"] for r in ra] == [r["image"] for r in rb], key
        for x, y in zip(ra, rb):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], float):
                    assert abs(x[k] - y[k]) <= atol, (key, k, x[k], y[k])
                else:
                    assert x[k] == y[k], (key, k)


# --- the engine -----------------------------------------------------------------------------------------------
def test_engine_records_do_not_depend_on_batch_size():
    """Per-image seeding: the same images in batches of 3 or 8 give the same per-image rows (random and gradient
    attacks; exact on this CPU, tolerance 1e-6 allowed for batched-convolution rounding)."""
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=4, width=4).eval()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    kw = dict(
        explainers={"saliency": {}},
        attacks=["random_sign", "random_walk", "topk"],
        eps=["8/255"],
        protocol={"k": 20, "steps": 3},
        require_correct=False,
    )
    ids = list(range(100, 108))
    a = list(run_grid(net, [(x[i : i + 3], y[i : i + 3], ids[i : i + 3]) for i in range(0, 8, 3)], **kw))
    b = list(run_grid(net, [(x, y, ids)], **kw))
    for ca, cb in zip(a, b):
        assert [r["image"] for r in ca.rows] == ids
        _assert_same_rows({0: ca.rows}, {0: cb.rows}, atol=1e-6)


def test_zero_attacked_images_give_a_defined_record(tmp_path):
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=4, width=4).eval()
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        wrong = (net(x).argmax(1) + 1) % 4  # every image misclassified
    (res,) = run_grid(net, [(x, wrong)], explainers=["saliency"], attacks=["topk"], eps=["8/255"], protocol={"k": 10})
    agg = res.aggregate
    assert agg["n_images"] == 0 and agg["n_skipped"] == 5
    assert agg["label_kept_rate"] is None and "topk_intersection" not in agg
    rec = {"method": "saliency", "attack": "topk", "epsilon": 8 / 255, "epsilon_255": 8.0, **agg}
    assert "attacked no image" in grid_table([rec]) and "| 0 / 0 |" in grid_table([rec])
    assert plot_metrics_vs_eps([rec], tmp_path / "m.png").is_file()  # no crash, one "no attacked images" panel
    assert aggregate_rows([])["n_images"] == 0


# --- fragdefense-eval -----------------------------------------------------------------------------------------
def test_eval_end_to_end_resume_and_wandb_table(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "ev"
    payload = evaluate(_eval_cfg(ckpt, out))
    assert len(payload["records"]) == 4 and payload["clean_accuracy"] is not None
    md = (out / "results.md").read_text()
    assert "**Protocol**" in md and "- steps: 3" in md and "- step_size: 1/255" in md and "- k: 40" in md
    assert (out / "metrics_vs_eps.png").is_file()
    n_attacked = sum(r["n_images"] for r in payload["records"])
    assert n_attacked > 0

    # W&B: read the offline run back (no mock): per-cell metrics and one table row per attacked image
    run = _read_run(out)
    keys = history_keys(run)
    assert "saliency/topk/eps=8/topk_intersection" in keys
    entry = next(h["attacked_images"] for h in run["history"] if "attacked_images" in h)
    table = load_table(run, entry)
    assert len(table["data"]) == n_attacked
    assert entry["nrows"] == n_attacked
    col = table["columns"].index("attacked")
    cell = table["data"][0][col]  # the image itself is a file of the table's run_table artifact
    assert cell == "Image" or cell.get("_type") == "image-file"
    art = next(a for a in run["artifacts"] if a["type"] == "run_table" and "attacked_images" in a["name"])
    assert sum(f.startswith("media/images/") and f.endswith(".png") for f in art["files"]) >= 2
    assert any(a["type"] == "results" for a in run["artifacts"])

    # a rerun with the same out_dir reads every cell back and ends with the same results
    again = evaluate(_eval_cfg(ckpt, out))
    _assert_same_rows(_per_image(payload), _per_image(again))
    assert [r["topk_intersection"] for r in again["records"]] == [r["topk_intersection"] for r in payload["records"]]

    # a changed config in the same out_dir is refused, naming the differing key
    with pytest.raises(ValueError, match=r"protocol\.steps: 3 -> 4"):
        evaluate(_eval_cfg(ckpt, out, "protocol.steps=4"))


def test_errors_before_any_work(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="`out_dir`"):
        evaluate(_eval_cfg(ckpt, blocker / "sub"))
    # a 3-class checkpoint evaluated on 10-class data: an error before any work
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["hyper_parameters"]["model_config"]["num_classes"] = 3
    sd = state["state_dict"]
    for k in [k for k in sd if k.endswith("head.weight") or k.endswith("head.bias")]:
        sd[k] = sd[k][:3].clone()
    three = tmp_path / "three.ckpt"
    torch.save(state, three)
    out = tmp_path / "mismatch"
    with pytest.raises(ValueError, match="3 output classes but the data has 10"):
        evaluate(_eval_cfg(three, out))
    assert not (out / "cells").exists() and not (out / "eval_config.json").exists()
    for bad, match in (("n_images=0", "`n_images`"), ("batch_size=0", "`batch_size`"), ("attacks=[nope]", "nope")):
        with pytest.raises(ValueError, match=match):
            evaluate(_eval_cfg(ckpt, tmp_path / "bad", bad))


def test_kill_mid_grid_and_rerun_recomputes_no_finished_cell(ckpt, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    args = [f"checkpoint={ckpt}", *DATA, *GRID, "protocol.steps=12", "n_images=48", "figures=false", "save_images=true"]
    ref = tmp_path / "ref"
    subprocess.run(_cli(*args, f"out_dir={ref}"), env=env, check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, f"out_dir={out}"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    done: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        done = sorted((out / "cells").glob("saliency__*/shard-0-of-1.json")) if (out / "cells").is_dir() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("saliency__*/shard-0-of-1.json")}
    assert 2 <= len(finished) < 4
    assert not (out / "results.json").exists()
    r = subprocess.run(_cli(*args, f"out_dir={out}"), env=env, check=True, capture_output=True, text=True, timeout=600)
    assert r.stderr.count("resumed (finished before)") == len(finished) or "resumed" in r.stderr + r.stdout
    for p, mtime in finished.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was recomputed"
    a = json.loads((ref / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    _assert_same_rows(_per_image(a), _per_image(b))
    # the saved images of every cell are exactly its attacked images, once each (a cell cut by the kill and
    # computed again does not keep the killed run's chunks)
    import numpy as np

    for cell in b["per_image"]:
        key = f"{cell['method']}__{cell['attack']}__{round(cell['epsilon'] * 255)}_255"
        chunks = sorted((out / "cells" / key / "images-0-of-1").glob("batch-*.npz"))
        ids = [int(i) for f in chunks for i in np.load(f)["ids"]]
        assert sorted(ids) == sorted(r["image"] for r in cell["images"]), key


def test_ddp_cpu_two_processes_equal_one_process(ckpt, tmp_path):
    """``trainer=ddp_cpu``: two gloo processes (Lightning Fabric) split the images; the merged per-image records
    equal the one-process run: every discrete field (image ids, labels, label kept, best iteration) exactly, every
    metric within 1e-5 (the shards batch different images together, and batched convolutions round in the last
    bits differently for different batch contents)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    args = [f"checkpoint={ckpt}", *DATA, *GRID, "figures=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(*args, f"out_dir={one}"), env=env, check=True, capture_output=True, timeout=600)
    r = subprocess.run(
        _cli(*args, f"out_dir={two}", "trainer=ddp_cpu"), env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert sorted((two / "cells" / "saliency__topk__8_255").glob("shard-*.json"))[-1].name == "shard-1-of-2.json"
    _assert_same_rows(_per_image(a), _per_image(b), atol=1e-5)
    assert [r["n_images"] for r in a["records"]] == [r["n_images"] for r in b["records"]]


def test_defense_comparison_one_command(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    other = tmp_path / "defense_b" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copy(ckpt, other / "last.ckpt")
    out = tmp_path / "cmp"
    cfg = compose_config(
        "eval",
        [
            f"checkpoints=[{ckpt},{other / 'last.ckpt'}]",
            f"out_dir={out}",
            *DATA,
            *GRID,
            "figures=false",
            "quality.scores=[deletion_auc,road_morf]",
            "quality.opts={deletion_auc:{steps:4},road_morf:{percentages:[20,50]}}",
            "robust_accuracy.attacks=[pgd]",
            "robust_accuracy.steps=3",
        ],
    )
    payload = evaluate(cfg)
    names = [r["name"] for r in payload["defenses"]]
    assert len(names) == 2 and names[1] == "defense_b"
    assert payload["attack"] == "topk" and [r["method"] for r in payload["defenses"]] == ["saliency", "saliency"]
    r0, r1 = payload["defenses"]
    assert r0["clean_accuracy"] == r1["clean_accuracy"] and r0["robustness"] == r1["robustness"]  # same model
    # the comparison shows robust accuracy and the clean maps' faithfulness beside map robustness
    assert set(r0["robust_accuracy"]) == {"pgd@8/255"} and set(r0["quality"]) == {"deletion_auc", "road_morf"}
    assert r0["robust_accuracy"] == r1["robust_accuracy"] and r0["quality"] == r1["quality"]
    res0 = json.loads((out / "defenses" / r0["name"] / "results.json").read_text())
    assert res0["robust_accuracy"][0]["robust_accuracy"] == r0["robust_accuracy"]["pgd@8/255"]
    assert res0["robust_accuracy"][0]["robust_accuracy"] <= res0["robust_accuracy"][0]["clean_accuracy"]
    assert 0.0 <= r0["quality"]["deletion_auc"] <= 1.0
    md = (out / "comparison.md").read_text()
    assert "robust acc pgd@8/255 (%)" in md and "deletion AUC ↓" in md and "ROAD MoRF ↓" in md
    assert (out / "comparison.md").read_text().count("|") > 10 and (out / "comparison.png").is_file()
    assert (out / "defenses" / "defense_b" / "results.json").is_file()
    run = _read_run(out)
    assert "defense_comparison" in history_keys(run)


def test_cell_store_merges_shards(tmp_path):
    from fragdefense.evaluation import Cell, CellResult
    from fragdefense.utils.conventions import Budget

    cell = Cell("saliency", "topk", Budget("8/255"))
    for rank, rows in (
        (0, [{"image": 0, "label_kept": True, "spearman": 0.2}]),
        (1, [{"image": 1, "label_kept": True, "spearman": 0.4}]),
    ):
        st = CellStore(tmp_path, {"a": 1}, rank, 2)
        st.write(CellResult(cell, rows, aggregate_rows(rows, 1)))
    merged = CellStore(tmp_path, {"a": 1}, 0, 2).merge(cell)
    assert [r["image"] for r in merged.rows] == [0, 1]
    assert merged.aggregate["n_skipped"] == 2 and abs(merged.aggregate["spearman"] - 0.3) < 1e-12


def test_eval_certify_section(ckpt, tmp_path, monkeypatch):
    """`certify.enabled=true`: per explainer a resumable certification cell, its table, the certified-maps figure
    (and its W&B image); the record equals the library's run_certify on the same images and settings."""
    from fragdefense.evaluation.certified import rate_key

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "cert"
    over = [
        f"checkpoint={ckpt}",
        f"out_dir={out}",
        *DATA,
        "n_images=6",
        "batch_size=6",
        "methods=[saliency]",
        "attacks=[random_sign]",
        "eps=[8/255]",
        "protocol.steps=1",
        "n_figure_images=2",
        "certify.enabled=true",
        "certify.n0=4",
        "certify.n=24",
        "certify.sigma=0.12",
        "certify.radii=[0.0,0.05]",
    ]
    payload = evaluate(compose_config("eval", over))
    rec = payload["certify"][0]
    assert rec["method"] == "saliency" and rec["n_images"] >= 1
    assert 0.0 <= rec[rate_key(0.05)] <= rec[rate_key(0.0)] <= 1.0  # fewer pixels hold at a larger radius
    rows = payload["certify_per_image"][0]["images"]
    assert len(rows) == rec["n_images"]
    assert (out / "certified_saliency.png").is_file()
    assert "Certified attributions" in (out / "results.md").read_text()
    assert any(k.startswith("figures/certified_saliency") for k in history_keys(_read_run(out)))
    # rerun: the finished cell is read back, same numbers
    again = evaluate(compose_config("eval", over))
    assert again["certify"][0] == pytest.approx(rec)
    with pytest.raises(ValueError, match="`certify.tau`"):
        evaluate(compose_config("eval", [*over, "certify.tau=0.4"]))
