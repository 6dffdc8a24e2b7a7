"""Attacks on interpretations and PGD: effect, invariants, surrogate gradients, batching, errors; and the
fragdefense-eval grid end to end. The model is trained inside the test on synthetic data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fragdefense.attacks import (
    PROTOCOLS,
    L2Threat,
    LinfThreat,
    attack_interpretation,
    beta_schedule,
    pgd_attack,
)
from fragdefense.attributions import attribute, to_map
from fragdefense.data import generate_synthetic
from fragdefense.models import create_model, to_softplus


@pytest.fixture(scope="module")
def trained():
    """small_cnn (width 8) trained for a few epochs on 1500 synthetic 32x32 images (~10-20 s on 2 cores)."""
    torch.manual_seed(0)
    x, y, m = generate_synthetic(1500, 32, seed=11)
    xt, yt, mt = generate_synthetic(96, 32, seed=12)
    model = create_model("small_cnn", num_classes=10, width=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    assert acc > 0.5, f"test model failed to train (acc={acc})"
    return model, xt, yt, mt


def test_topk_attack_far_stronger_than_random_sign(trained):
    model, x, y, _ = trained
    common = dict(eps=8 / 255, k=80, generator=0)
    rnd = attack_interpretation(model, x[:48], y[:48], attack="random_sign", **common)
    top = attack_interpretation(model, x[:48], y[:48], attack="topk", step_size=1 / 255, steps=15, beta=10.0, **common)
    assert rnd.n_attacked == top.n_attacked > 20
    assert bool(top.label_kept.all()) and bool(rnd.label_kept.all())
    r, t = rnd.summary(), top.summary()
    assert t["topk_intersection"] < r["topk_intersection"] - 0.1, (t, r)
    assert t["spearman"] < r["spearman"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    eps=st.floats(0.0, 16 / 255),
    attack=st.sampled_from(["topk", "mass_center", "random_walk", "random_sign"]),
    threat=st.sampled_from(["linf", "l2"]),
    random_start=st.booleans(),
)
def test_budget_range_and_label_invariants(trained, eps, attack, threat, random_start):
    model, x, y, _ = trained
    xb = x[:8]
    res = attack_interpretation(
        model,
        xb,
        None,
        attack=attack,
        eps=eps if threat == "linf" else eps * 20,
        steps=3,
        k=30,
        beta=5.0,
        threat=threat,
        random_start=random_start,
        generator=1,
    )
    d = res.x_adv - xb
    budget = eps if threat == "linf" else eps * 20
    if threat == "linf":
        assert float(d.abs().max()) <= budget + 1e-6
    else:
        assert float(d.flatten(1).norm(dim=1).max()) <= budget + 1e-5
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    with torch.no_grad():
        assert torch.equal(model(res.x_adv).argmax(1), model(xb).argmax(1))
    assert bool(res.label_kept.all())


def test_surrogate_gradient_nonzero_where_relu_gradient_is_zero(trained):
    model, x, _, _ = trained
    xb = x[:4].clone().requires_grad_(True)
    target = model(xb).argmax(1).detach()

    def objective(net):
        m = to_map(attribute("saliency", net, xb, target, create_graph=True))
        return (m * torch.linspace(0, 1, m[0].numel()).view_as(m[0])).sum()

    (g_relu,) = torch.autograd.grad(objective(model), xb, allow_unused=True)
    assert g_relu is None or float(g_relu.abs().max()) == 0.0  # piecewise-constant map
    (g_soft,) = torch.autograd.grad(objective(to_softplus(model, 10.0)), xb)
    assert float(g_soft.abs().max()) > 0.0 and float((g_soft != 0).float().mean()) > 0.5


def test_single_image_equals_batch(trained):
    model, x, y, _ = trained
    m64 = create_model("small_cnn", num_classes=10, width=8, mean=(0.5,) * 3, std=(0.25,) * 3).double().eval()
    m64.load_state_dict(model.state_dict())
    xb = x[:5].double()
    kw = dict(attack="topk", eps=8 / 255, step_size=1 / 255, steps=4, k=40, beta=10.0)
    full = attack_interpretation(m64, xb, **kw)
    for i in range(5):
        one = attack_interpretation(m64, xb[i : i + 1], **kw)
        torch.testing.assert_close(one.x_adv[0], full.x_adv[i], atol=1e-9, rtol=0)
        for k in ("topk_intersection", "spearman", "kendall"):
            torch.testing.assert_close(one.metrics[k][0], full.metrics[k][i], atol=1e-9, rtol=0)


def test_misclassified_images_are_skipped_and_counted(trained):
    model, x, _, _ = trained
    xb = x[:6]
    with torch.no_grad():
        pred = model(xb).argmax(1)
    wrong = pred.clone()
    wrong[[1, 4]] = (pred[[1, 4]] + 1) % 10
    res = attack_interpretation(model, xb, wrong, attack="topk", steps=2, k=20, eps=4 / 255)
    assert res.n_skipped == 2 and res.n_attacked == 4
    assert res.index.tolist() == [0, 2, 3, 5]
    assert torch.equal(res.x_adv[[1, 4]], xb[[1, 4]])
    assert {r["index"] for r in res.records()} == {0, 2, 3, 5}


def test_targeted_and_manipulate_move_the_map(trained):
    model, x, _, masks = trained
    xb = x[:12]
    region = torch.zeros(12, 32, 32)
    region[:, :10, :10] = 1.0  # move saliency into the top-left corner
    tgt = attack_interpretation(
        model, xb, attack="targeted", target_mask=region, eps=8 / 255, step_size=1 / 255, steps=10, k=50, beta=10.0
    )
    clean_mass = float((tgt.clean_map * region).sum((1, 2)).mean())
    assert tgt.summary()["target_mass"] > clean_mass + 0.02
    target_map = torch.roll(tgt.clean_map, shifts=1, dims=0)  # another image's map
    man = attack_interpretation(
        model,
        xb,
        attack="manipulate",
        target_map=target_map,
        eps=8 / 255,
        step_size=1 / 255,
        steps=10,
        k=50,
        beta=(10.0, 50.0),
    )
    clean_mse = float(((man.clean_map - target_map) ** 2).flatten(1).mean(1).mean())
    assert man.summary()["target_mse"] < clean_mse
    assert bool(man.label_kept.all())


def test_ifia_protocol_preset_runs(trained):
    model, x, y, _ = trained
    proto = {**PROTOCOLS["ifia"], "method_opts": {"steps": 8}, "steps": 3, "k": 50}
    res = attack_interpretation(model, x[:4], y[:4], generator=0, **proto)
    assert res.protocol["criterion"] == "kendall" and res.protocol["random_start"]
    assert bool(res.label_kept.all())


def test_pgd_lowers_accuracy_and_respects_budget(trained):
    model, x, y, _ = trained
    xa = pgd_attack(model, x, y, eps=8 / 255, step_size=2 / 255, steps=7, generator=0)
    assert float((xa - x).abs().max()) <= 8 / 255 + 1e-6 and float(xa.min()) >= 0 and float(xa.max()) <= 1
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
        adv = float((model(xa).argmax(1) == y).float().mean())
    assert adv < clean - 0.2
    xa2 = pgd_attack(model, x, y, eps=0.5, threat="l2", steps=3, restarts=2, generator=0)
    assert float((xa2 - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
    assert all(p.grad is None for p in model.parameters())


def test_threat_models_and_beta_schedule():
    x0 = torch.rand(3, 3, 5, 5)
    for t in (LinfThreat(0.1), L2Threat(0.3)):
        z = t.random_start(x0, torch.Generator().manual_seed(0))
        assert float(z.min()) >= 0 and float(z.max()) <= 1
        assert torch.allclose(t.project(z, x0), z, atol=1e-6)  # projection is idempotent
    b = beta_schedule((10.0, 100.0), 5)
    assert b[0] == pytest.approx(10.0) and b[-1] == pytest.approx(100.0) and b == sorted(b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"attack": "nope"}, "`attack`"),
        ({"eps": -0.1}, "`eps`"),
        ({"k": 0}, "`k`"),
        ({"k": 10_000}, "`k`"),
        ({"method": "deeplift"}, "create_graph"),
        ({"method": "nope"}, "nope"),
        ({"attack": "targeted"}, "target_mask"),
        ({"criterion": "best"}, "criterion"),
        ({"threat": "l1"}, "threat"),
    ],
)
def test_bad_arguments(kwargs, match):
    net = create_model("small_cnn", width=4).eval()
    with pytest.raises((ValueError, TypeError), match=match):
        attack_interpretation(net, torch.rand(2, 3, 16, 16), **{"steps": 1, "k": 10, **kwargs})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack_interpretation(net, torch.rand(2, 3, 16, 16) * 3, steps=1, k=10)


def test_eval_grid_end_to_end(trained, tmp_path):
    from fragdefense.cli._config import compose_config
    from fragdefense.cli.evaluate import evaluate

    model, *_ = trained
    torch.save(model.state_dict(), tmp_path / "w.pt")
    cfg = compose_config(
        "eval",
        [
            f"out_dir={tmp_path / 'out'}",
            "model_name=small_cnn",
            f"weights_path={tmp_path / 'w.pt'}",
            "+model_kwargs.width=8",
            "n_images=12",
            "batch_size=8",
            "attacks=[random_sign,topk]",
            "eps=[2/255,8/255]",
            "methods={saliency:{},integrated_gradients:{steps:4}}",
            "protocol.steps=3",
            "protocol.k=40",
            "data.n_train=32",
            "data.n_test=64",
        ],
    )
    payload = evaluate(cfg)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["records"]) == 2 * 2 * 2 == len(payload["records"])
    needed = {
        "method",
        "attack",
        "epsilon",
        "topk_intersection",
        "spearman",
        "kendall",
        "center_shift",
        "lens_recall",
        "label_kept_rate",
        "n_images",
        "protocol",
    }
    for r in saved["records"]:
        assert needed <= set(r) and r["label_kept_rate"] == 1.0
        assert {"k", "steps", "step_size", "beta"} <= set(r["protocol"])
    assert saved["per_image"][0]["images"] and "kendall" in saved["per_image"][0]["images"][0]
    assert (out / "results.md").read_text().startswith("| method")
    assert (out / "metrics_vs_eps.png").stat().st_size > 1000
    assert list(out.glob("examples_*.png"))


def test_parse_eps_and_eval_errors(tmp_path):
    from fragdefense.cli._config import compose_config
    from fragdefense.cli.evaluate import evaluate, parse_eps

    assert parse_eps("8/255") == pytest.approx(8 / 255) and parse_eps("0.5/255") == pytest.approx(0.5 / 255)
    assert parse_eps(0.1) == 0.1
    with pytest.raises(ValueError, match="8/0"):
        parse_eps("8/0")
    with pytest.raises(ValueError, match=">= 0"):
        parse_eps(-1)
    cfg = compose_config("eval", [f"out_dir={tmp_path}", "data.n_train=16", "data.n_test=16"])
    with pytest.raises(ValueError, match="checkpoint="):
        evaluate(cfg)
