"""fragdefense-influence and fragdefense-hessian each log one W&B run in their out_dir: the offline run is read
back from its ``.wandb`` file (tests/wandb_offline.py, no mocking) and checked against results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from wandb_offline import history_keys, iter_records, load_table, read_offline_run

from fragdefense.cli._config import compose_config
from fragdefense.cli._wandb import flat_scalars
from fragdefense.cli.hessian import hessian
from fragdefense.cli.influence import influence

SMALL_MODEL = ["model_name=small_cnn", "+model_kwargs.width=4", "device=cpu"]
INFLUENCE = [
    *SMALL_MODEL,
    "data.n_train=200",
    "data.n_test=60",
    "classes=[0,1]",
    "n_train=20",
    "n_test=3",
    "n_figure_images=2",
]
HESSIAN = [
    *SMALL_MODEL,
    "data.n_train=32",
    "data.n_test=32",
    "n_images=4",
    "batch_size=4",
    "param.n_samples=8",
    "param.lanczos_iters=5",
    "param.trace_matvecs=3",
    "param.density_iters=4",
    "param.density_runs=1",
    "directions.radii=[0.1,0.5]",
    "directions.n_random=1",
    "directions.topk=20",
    "directions.max_iter=5",
    "beta_sweep.betas=[1,10]",
    "beta_sweep.max_iter=5",
    "fragility.steps=2",
    "fragility.k=20",
    "fragility.max_iter=5",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _same(a, b) -> bool:  # noqa: ANN001
    return (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and math.isnan(a) else a == pytest.approx(b)


def _check_common(run: dict, out: Path, job_type: str, payload: dict) -> dict:
    """One finished run in out/wandb with the resolved config, every flat number of results.json in one step and
    results.json + results.md as the results artifact; returns that step."""
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert run["run"]["job_type"] == job_type and run["run"]["project"] == "fragdefense"
    assert run["run"]["id"] == (out / "wandb_id.txt").read_text().strip()
    assert run["exit_code"] == 0
    assert run["config"]["out_dir"] == str(out) and run["config"]["seed"] == 0
    assert run["config"]["wandb"]["mode"] == "auto"
    saved = json.loads((out / "results.json").read_text())
    scalars = flat_scalars(saved)
    assert scalars and "config/seed" not in scalars
    steps = [row for row in run["history"] if set(scalars) <= set(row)]
    assert len(steps) == 1, history_keys(run)
    step = steps[0]
    for k, v in scalars.items():
        assert _same(step[k], v), k
        assert _same(run["summary"][k], v), k
    art = [a for a in run["artifacts"] if a["name"] == f"{job_type}-results"]
    assert len(art) == 1 and art[0]["type"] == "results" and set(art[0]["files"]) == {"results.json", "results.md"}
    return step


def _table(run: dict, step: dict, key: str) -> dict:
    assert step[key]["_type"] == "table-file", key
    return load_table(run, step[key])


def _image(run: dict, step: dict, key: str) -> None:
    assert step[key]["_type"] == "image-file", key
    assert (run["dir"] / "files" / step[key]["path"]).stat().st_size > 1000


def test_influence_logs_one_wandb_run(tmp_path):
    out = tmp_path / "influence"
    payload = influence(compose_config("influence", [*INFLUENCE, f"out_dir={out}"]))
    run = read_offline_run(out)
    step = _check_common(run, out, "influence", payload)
    assert {"n_test", "test_accuracy", "eps_255", "attacks/gradient/spearman", "attacks/random_sign/topk_kept"} <= set(
        step
    )
    assert run["config"]["n_train"] == 20 and run["config"]["classes"] == [0, 1]
    for attack in ("gradient", "random_sign"):
        t = _table(run, step, f"attacks/{attack}/images")
        recs = payload["attacks"][attack]["images"]
        assert len(t["data"]) == len(recs) == 3
        assert {"test_index", "spearman", "topk_kept", "topk_clean", "label_kept"} <= set(t["columns"])
        col = t["columns"].index("spearman")
        assert [r[col] for r in t["data"]] == pytest.approx([r["spearman"] for r in recs])
        col = t["columns"].index("topk_clean")
        assert t["data"][0][col] == str(recs[0]["topk_clean"])
    _image(run, step, "figures/top_influential")


def test_hessian_logs_one_wandb_run(tmp_path):
    out = tmp_path / "hessian"
    payload = hessian(compose_config("hessian", [*HESSIAN, f"out_dir={out}"]))
    run = read_offline_run(out)
    step = _check_common(run, out, "hessian", payload)
    assert {
        "clean_accuracy",
        "param/trace",
        "param/n_params",
        "directions/abs_lambda_max_median",
        "beta_sweep/logit/loglog_slope",
        "fragility/spearman_abs_lambda_vs_topk",
        "timings/param",
    } <= set(step)
    assert step["param/top_eigenvalue"] == pytest.approx(payload["param"]["top_eigenvalues"][0])
    t = _table(run, step, "param/eigenvalues")
    assert [r[t["columns"].index("eigenvalue")] for r in t["data"]] == pytest.approx(
        payload["param"]["top_eigenvalues"]
    )
    t = _table(run, step, "directions/per_radius")
    assert [r[t["columns"].index("radius")] for r in t["data"]] == [0.1, 0.5]
    assert len(_table(run, step, "directions/per_image")["data"]) == 4
    for obj in ("logit", "loss"):
        t = _table(run, step, f"beta_sweep/{obj}/per_beta")
        assert [r[t["columns"].index("beta")] for r in t["data"]] == [1.0, 10.0]
    t = _table(run, step, "fragility/images")
    fr = payload["fragility"]
    assert len(t["data"]) == fr["n_attacked"] == len(fr["lambda_max"])
    assert [r[t["columns"].index("lambda_max")] for r in t["data"]] == pytest.approx(fr["lambda_max"])
    assert {r[t["columns"].index("image_index")] for r in t["data"]} <= set(payload["image_indices"])
    assert len(payload["figures"]) == 4
    for f in payload["figures"]:
        _image(run, step, f"figures/{Path(f).stem}")


def test_a_failing_command_finishes_its_run_with_exit_code_1(tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="not a class name"):
        influence(compose_config("influence", [*INFLUENCE, f"out_dir={out}", "classes=[cat,dog]"]))
    run = read_offline_run(out)
    assert run["run"]["job_type"] == "influence" and run["exit_code"] == 1 and not run["artifacts"]
    # wandb.mode=disabled: no run at all
    off = tmp_path / "off"
    with pytest.raises(ValueError, match="not a class name"):
        influence(
            compose_config("influence", [*INFLUENCE, f"out_dir={off}", "classes=[cat,dog]", "wandb.mode=disabled"])
        )
    assert off.is_dir() and not (off / "wandb").exists() and not (off / "wandb_id.txt").exists()


def test_reader_joins_records_spanning_blocks(tmp_path):
    """A record larger than the 32 KiB block of the transaction log (FIRST / MIDDLE / LAST chunks) reads back whole,
    and so do the records after it."""
    import wandb

    big = "x" * 100_000
    run = wandb.init(dir=str(tmp_path), mode="offline", project="fragdefense", config={"big": big})
    run.log({"a": 1.0, "nested": {"b": 2}})
    run.log({"a": 3.0, "text": big})
    run.finish()
    r = read_offline_run(tmp_path)
    assert r["exit_code"] == 0 and len(r["history"]) == 2
    assert [h["a"] for h in r["history"]] == [1.0, 3.0] and r["history"][0]["nested"] == {"b": 2}
    assert r["config"]["big"] == big, "the 100 kB config value differs"
    assert r["history"][1]["text"] == big, "the 100 kB history value differs"
    assert r["summary"]["a"] == 3.0
    assert sum(1 for _ in iter_records(tmp_path)) > 5
