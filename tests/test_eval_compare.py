"""fragdefense-eval comparison mode (fragdefense/configs/eval_compare.yaml) end to end on tiny synthetic settings, the
PGD-evidence check against a direct recomputation, and config errors. The model is trained inside the test."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fragdefense.attacks import pgd_attack
from fragdefense.attributions import attribute, to_map
from fragdefense.cli._config import compose_config
from fragdefense.cli.evaluate import _pgd_evidence, _seed_check, evaluate, explainer_specs
from fragdefense.data import generate_synthetic
from fragdefense.metrics import functional as MF
from fragdefense.models import create_model

# `~explainers` + `+explainers=`: replace the configured set (a plain `explainers=` override merges into it)
EXPLAINERS = (
    "+explainers={saliency:{},"
    "beta_smooth:{opts:{beta:3.0}},"
    "uniform_grad:{opts:{n_samples:2,generator:0}},"
    "local_smooth:{opts:{n_samples:2,iters:2,generator:0},surrogate:saliency},"
    "local_smooth_unrolled:{method:local_smooth,opts:{n_samples:2,iters:2,generator:0}}}"
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """small_cnn (width 8) trained briefly on synthetic 32x32 images; returns the weights file."""
    torch.manual_seed(0)
    x, y, _ = generate_synthetic(1000, 32, seed=11)
    model = create_model("small_cnn", num_classes=10, width=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(5):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("w") / "w.pt"
    torch.save(model.state_dict(), path)
    return path


def _cfg(weights, out, *extra):
    return compose_config(
        "eval_compare",
        [
            f"out_dir={out}",
            "model_name=small_cnn",
            f"weights_path={weights}",
            "+model_kwargs.width=8",
            "n_images=12",
            "batch_size=8",
            "attacks=[random_sign,topk]",
            "eps=[8/255]",
            "protocol.steps=2",
            "protocol.k=40",
            "pgd_check.steps=3",
            "data.n_train=32",
            "data.n_test=64",
            *extra,
        ],
    )


def test_compare_mode_end_to_end(weights, tmp_path):
    out = tmp_path / "out"
    payload = evaluate(_cfg(weights, out, "~explainers", EXPLAINERS))
    saved = json.loads((out / "results.json").read_text())
    assert saved["mode"] == "compare" and len(saved["records"]) == 5 * 2 == len(payload["records"])
    by = {(r["method"], r["attack"]): r for r in saved["records"]}
    assert payload["clean_accuracy"] > 0.3
    for r in saved["records"]:
        assert r["n_images"] > 0 and r["label_kept_rate"] == 1.0
        assert r["seconds_per_image"] > 0 and r["cpu_seconds_per_image"] > 0
        assert {"topk_intersection", "spearman", "kendall", "center_shift", "lens_recall", "protocol"} <= set(r)
        assert 0 <= r["topk_intersection"] <= 1 and -1 <= r["spearman"] <= 1
    # the attack path is explicit: surrogate vs own (unrolled / exact) path
    assert by[("local_smooth", "topk")]["surrogate"] == "saliency"
    assert "surrogate gradient: saliency" in by[("local_smooth", "topk")]["attack_path"]
    assert by[("local_smooth", "topk")]["protocol"]["surrogate"] == "saliency"
    assert "unrolled" in by[("local_smooth_unrolled", "topk")]["attack_path"]
    assert by[("local_smooth_unrolled", "topk")]["attribution"] == "local_smooth"
    assert "exact" in by[("beta_smooth", "topk")]["attack_path"]
    assert by[("saliency", "random_sign")]["attack_path"].startswith("no gradient")
    # the explainer is timed: local_smooth (2 x 2 x 2 passes) costs more than saliency (1 pass)
    ex = saved["explainers"]
    assert ex["local_smooth"]["seconds_per_image"] > ex["saliency"]["seconds_per_image"]
    # PGD-evidence check
    pgd = saved["pgd_check"]
    assert pgd["n_correct"] > 0 and 0 <= pgd["n_flipped"] <= pgd["n_correct"]
    if pgd["n_flipped"]:
        assert set(pgd["explainers"]) == set(ex)
        for row in pgd["explainers"].values():
            assert 0 <= row["orig_class_topk_intersection"] <= 1 and 0 <= row["adv_class_rate_topk_ge_threshold"] <= 1
    # seed check: only the seeded explainers, each below perfect overlap across seeds
    chk = saved["seed_check"]["explainers"]
    assert set(chk) == {"uniform_grad", "local_smooth", "local_smooth_unrolled"}
    assert all(0 <= r["topk_intersection"] < 1 and r["spearman"] < 1 for r in chk.values())
    md = (out / "results.md").read_text()
    assert md.startswith("| explainer") and "PGD evidence check" in md and "CPU s / explanation" in md
    assert "| local_smooth | local_smooth | n_samples=2, iters=2, generator=0 | surrogate gradient: saliency" in md
    assert (out / "robustness_vs_cost.png").stat().st_size > 1000
    assert list(out.glob("examples_*_topk.png"))


def test_pgd_evidence_matches_a_direct_computation(weights):
    model = create_model("small_cnn", num_classes=10, width=8, mean=(0.5,) * 3, std=(0.25,) * 3, weights_path=weights)
    model.eval()
    x, y, _ = generate_synthetic(16, 32, seed=12)
    specs = explainer_specs({"saliency": {}, "bs": {"method": "beta_smooth", "opts": {"beta": 2.0}}})
    pcfg = {"eps": "8/255", "step_size": "2/255", "steps": 3, "threshold": 0.3}
    proto = {"k": 50, "lens_window": 1, "reduce": "abs_sum"}
    res = _pgd_evidence(model, specs, x, y, pcfg, proto, 5, torch.device("cpu"), torch.Generator().manual_seed(3))
    # direct: one batch, same generator seed; batches of 5 draw the random starts in the same order
    gen = torch.Generator().manual_seed(3)
    ok_all, adv_all, lab_all = [], [], []
    for xb, yb in zip(x.split(5), y.split(5)):
        ok = model(xb).argmax(1) == yb
        if ok.any():
            xa = pgd_attack(model, xb[ok], yb[ok], eps=8 / 255, step_size=2 / 255, steps=3, generator=gen)
            ok_all.append(xb[ok]), adv_all.append(xa), lab_all.append(yb[ok])
    x0, xa, y0 = torch.cat(ok_all), torch.cat(adv_all), torch.cat(lab_all)
    with torch.no_grad():
        pa = model(xa).argmax(1)
    flip = pa != y0
    assert res["n_correct"] == len(y0) and res["n_flipped"] == int(flip.sum())
    if not flip.any():
        pytest.skip("no PGD success on this tiny model")
    clean = to_map(attribute("beta_smooth", model, x0[flip], y0[flip], beta=2.0))
    orig = to_map(attribute("beta_smooth", model, xa[flip], y0[flip], beta=2.0))
    advc = to_map(attribute("beta_smooth", model, xa[flip], pa[flip], beta=2.0))
    row = res["explainers"]["bs"]
    topk = MF.topk_intersection(orig, clean, 50)
    assert row["orig_class_topk_intersection"] == pytest.approx(float(topk.double().mean()), abs=1e-6)
    assert row["orig_class_rate_topk_ge_threshold"] == pytest.approx(float((topk >= 0.3).double().mean()))
    assert row["adv_class_spearman"] == pytest.approx(float(MF.spearman(advc, clean).double().mean()), abs=1e-6)


def test_seed_check_matches_a_direct_computation(weights):
    model = create_model("small_cnn", num_classes=10, width=8, mean=(0.5,) * 3, std=(0.25,) * 3, weights_path=weights)
    model.eval()
    x, y, _ = generate_synthetic(6, 32, seed=13)
    specs = explainer_specs({"saliency": {}, "ug": {"method": "uniform_grad", "opts": {"n_samples": 3, "seed": 4}}})
    res = _seed_check(model, specs, x, y, {"k": 30, "lens_window": 1, "reduce": "abs_sum"}, 4)
    assert set(res["explainers"]) == {"ug"} and res["n_images"] == 6
    a = to_map(attribute("uniform_grad", model, x[:4], y[:4], n_samples=3, seed=4))
    a = torch.cat([a, to_map(attribute("uniform_grad", model, x[4:], y[4:], n_samples=3, seed=4))])
    b = to_map(attribute("uniform_grad", model, x[:4], y[:4], n_samples=3, seed=5))
    b = torch.cat([b, to_map(attribute("uniform_grad", model, x[4:], y[4:], n_samples=3, seed=5))])
    want = float(MF.topk_intersection(a, b, 30).double().mean())
    assert res["explainers"]["ug"]["topk_intersection"] == pytest.approx(want, abs=1e-9)


def test_default_mode_is_unchanged_and_mode_is_checked(tmp_path):
    cfg = compose_config("eval", [f"out_dir={tmp_path}"])
    assert cfg.mode == "grid" and "explainers" not in cfg
    cfg = compose_config("eval", [f"out_dir={tmp_path}", "mode=sweep", "data.n_train=16", "data.n_test=16"])
    with pytest.raises(ValueError, match="`mode`"):
        evaluate(cfg)


@pytest.mark.parametrize(
    ("explainers", "match"),
    [
        ("explainers={local_smooth:{iters:2}}", r"unknown key\(s\) \['iters'\].*under `opts`"),
        ("explainers={relex:{}}", "unknown attribution method"),
        ("explainers={saliency:{surrogate:nope}}", "unknown attribution method"),
        ("explainers={deeplift:{}}", "differentiable path.*set `surrogate`"),
        ("explainers={}", "non-empty"),
    ],
)
def test_compare_config_errors(explainers, match, tmp_path):
    overrides = [f"out_dir={tmp_path}", "~explainers", "+" + explainers, "data.n_train=16", "data.n_test=16"]
    cfg = compose_config("eval_compare", overrides)
    with pytest.raises(ValueError, match=match):
        evaluate(cfg)
