"""The CUDA device paths, each compared with the CPU result where the two must agree: every attribution method,
the interpretation attacks (top-k, random sign) and PGD, the rank metrics, the FragilityMonitor on CUDA tensors,
and ``fragdefense-train trainer=gpu`` + ``fragdefense-eval device=cuda`` against ``device=cpu`` on the same
checkpoint. Skipped without a GPU.

Comparisons run in float64 where the code allows it (attributions, attacks, PGD), so CPU and CUDA agree to
rounding and a sign-gradient step cannot flip; float32 paths (the monitor, the CLIs) are compared with
tolerances that allow a few pixels' gradient signs to differ, and TF32 is switched off (in-process through
``torch.backends``, in the CLI processes through ``NVIDIA_TF32_OVERRIDE=0``). The random attacks draw from a
generator on the device, whose stream differs from the CPU's: for them the test checks the budget and that the
reported metrics equal the CPU's metrics recomputed from the returned maps.

Dry run without a GPU: ``FRAGDEFENSE_TEST_DEVICE=cpu pytest tests/test_cuda.py`` runs the same tests with the CPU as
the device under test (the comparisons are then trivial; it checks the test code itself).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fragdefense.attacks import attack_interpretation, pgd_attack
from fragdefense.attributions import attribute, list_attributions, supports_create_graph, to_map
from fragdefense.callbacks import FragilityMonitor
from fragdefense.metrics import functional as MF
from fragdefense.models import create_model

DEV = os.environ.get("FRAGDEFENSE_TEST_DEVICE", "cuda")
ON_CUDA = DEV.startswith("cuda")
pytestmark = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs CUDA")

EPS = 8 / 255


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 precision for cuBLAS / cuDNN (TF32 would put CUDA 1e-3 away from the CPU)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _net(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, width=8).to(dtype).eval()


def _on_dev(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEV).type


def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


# ------------------------------------------------------------------------------------------------ attributions
@pytest.mark.parametrize("name", list_attributions())
def test_attribution_matches_cpu(name):
    net = _net()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 4, 7])
    opts: dict = {}
    if name == "integrated_gradients":
        opts = {"steps": 8}
    elif name == "smoothgrad":  # the same noise on both devices (generators' streams differ between devices)
        opts = {"n_samples": 4, "sigma": 0.1, "noise": torch.randn(4, 3, 3, 32, 32, generator=g, dtype=torch.float64)}
    ref = attribute(name, net, x, t, **opts)
    net_d = copy.deepcopy(net).to(DEV)
    out = attribute(name, net_d, x.to(DEV), t.to(DEV), **{k: _to(v, DEV) for k, v in opts.items()})
    assert _on_dev(out) and out.dtype == torch.float64 and out.shape == ref.shape
    assert ref.abs().max() > 0
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-7, atol=1e-10 * float(ref.abs().max()))

    if supports_create_graph(name):  # the differentiable path (attacks and regularisers back-propagate through it)
        xs = [x.clone().requires_grad_(True), x.to(DEV).requires_grad_(True)]
        grads = []
        for xx, nn_, dev in zip(xs, (net, net_d), ("cpu", DEV)):
            a = attribute(name, nn_, xx, t.to(dev), create_graph=True, **{k: _to(v, dev) for k, v in opts.items()})
            (gx,) = torch.autograd.grad((a * a).sum(), xx)
            grads.append(gx)
        assert _on_dev(grads[1])
        torch.testing.assert_close(grads[1].cpu(), grads[0], rtol=1e-6, atol=1e-10 * float(grads[0].abs().max() + 1))


# ------------------------------------------------------------------------------------------------ metrics
def _maps(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated map pairs with ties (quantised values, a zero block) and a constant row (degenerate case)."""
    g = torch.Generator().manual_seed(2)
    a = torch.rand(shape, generator=g, dtype=dtype)
    b = a + 0.5 * torch.rand(shape, generator=g, dtype=dtype)
    b = (b * 40).round() / 40  # many ties
    a[:, :3] = 0.0
    a[-1] = 0.25  # constant map
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 32, 32), (2, 224, 224)])
def test_rank_metrics_match_cpu(dtype, shape):
    a, b = _maps(dtype, shape)
    for name, fn in (
        ("topk_intersection", lambda u, v: MF.topk_intersection(u, v, 100)),
        ("spearman", MF.spearman),
        ("kendall_tau", MF.kendall_tau),
    ):
        ref = fn(a, b)
        out = fn(a.to(DEV), b.to(DEV))
        assert _on_dev(out), name
        torch.testing.assert_close(out.cpu().double(), ref.double(), rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ attacks
def _batch(dtype: torch.dtype = torch.float64):
    net = _net(dtype)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=dtype)
    with torch.no_grad():
        y = net(x).argmax(1)  # every image "correct": all are attacked
    return net, x, y


def test_topk_attack_matches_cpu():
    net, x, y = _batch()
    kw = {"attack": "topk", "eps": EPS, "steps": 4, "k": 50, "beta": 10.0, "check_every": 1}
    ref = attack_interpretation(net, x, y, **kw)
    res = attack_interpretation(copy.deepcopy(net).to(DEV), x.to(DEV), y.to(DEV), **kw)
    assert _on_dev(res.x_adv) and _on_dev(res.clean_map) and _on_dev(res.adv_map)
    assert res.n_attacked == ref.n_attacked == 4
    assert bool(ref.perturbed.any())  # the attack moved something (not a vacuous comparison)
    torch.testing.assert_close(res.x_adv.cpu(), ref.x_adv, rtol=0, atol=1e-7)
    torch.testing.assert_close(res.clean_map.cpu(), ref.clean_map, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(res.adv_map.cpu(), ref.adv_map, rtol=1e-6, atol=1e-12)
    assert torch.equal(res.label_kept.cpu(), ref.label_kept) and torch.equal(res.best_iter.cpu(), ref.best_iter)
    for name, v in ref.metrics.items():
        torch.testing.assert_close(res.metrics[name].cpu().double(), v.double(), rtol=0, atol=1e-6, msg=name)


def test_random_sign_attack_on_device():
    net, x, y = _batch()
    net_d = copy.deepcopy(net).to(DEV)
    kw = {"attack": "random_sign", "eps": EPS, "steps": 3, "k": 50, "check_every": 1}
    ref = attack_interpretation(net, x, y, generator=0, **kw)
    res = attack_interpretation(net_d, x.to(DEV), y.to(DEV), generator=0, **kw)
    assert _on_dev(res.x_adv)
    xa = res.x_adv.cpu()
    assert float((xa - x).abs().max()) <= EPS + 1e-7 and float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    # the clean maps do not depend on the random stream
    torch.testing.assert_close(res.clean_map.cpu(), ref.clean_map, rtol=1e-7, atol=1e-12)
    # the reported metrics are the CPU's metrics of the returned maps
    clean, adv = res.clean_map.cpu(), res.adv_map.cpu()
    for name, fn in (
        ("topk_intersection", lambda u, v: MF.topk_intersection(u, v, 50)),
        ("spearman", MF.spearman),
        ("kendall", MF.kendall_tau),
    ):
        torch.testing.assert_close(res.metrics[name].cpu().double(), fn(clean, adv).double(), rtol=0, atol=1e-6)
    # the returned adversarial maps are the CPU saliency maps of the returned images
    idx = res.index.cpu()
    maps_cpu = to_map(attribute("saliency", net, xa[idx], y[idx]), "abs_sum")
    torch.testing.assert_close(adv, maps_cpu, rtol=1e-6, atol=1e-12)


def test_pgd_matches_cpu():
    net, x, _ = _batch()
    y = torch.tensor([0, 3, 5, 9])
    kw = {"eps": EPS, "steps": 5, "random_start": False}
    ref = pgd_attack(net, x, y, **kw)
    out = pgd_attack(copy.deepcopy(net).to(DEV), x.to(DEV), y.to(DEV), **kw)
    assert _on_dev(out)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-7)
    assert not torch.equal(ref, x)
    # random start from a device generator: within the ball, and the loss went up
    net_d = copy.deepcopy(net).to(DEV)
    xr = pgd_attack(net_d, x.to(DEV), y.to(DEV), eps=EPS, steps=5, random_start=True, generator=0)
    assert _on_dev(xr) and float((xr.cpu() - x).abs().max()) <= EPS + 1e-7
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert ce(net_d(xr), y.to(DEV), reduction="none").ge(ce(net_d(x.to(DEV)), y.to(DEV), reduction="none")).all()


# ------------------------------------------------------------------------------------------------ monitor
def test_fragility_monitor_on_device_tensors():
    net, x, _ = _batch(torch.float32)  # (the monitor evaluates in float32)
    x = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        y = net(x).argmax(1)
    mask = torch.zeros(8, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True
    probe = {"x": x, "y": y, "mask": mask, "indices": list(range(100, 108))}
    mon = FragilityMonitor(
        methods={"saliency": {}, "integrated_gradients": {"steps": 4}},
        attacks=["random_sign", "topk"],
        eps="8/255",
        steps=3,
        check_every=1,
        k=50,
        n_probe=8,
        batch_size=4,
        maps_png=None,
    )
    ref = mon.evaluate(net, probe)
    net_d = copy.deepcopy(net).to(DEV)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if ON_CUDA else None
    rep = mon.evaluate(net_d, {**probe, "x": x.to(DEV), "y": y.to(DEV), "mask": mask.to(DEV)})
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    if ON_CUDA:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)  # the device's RNG is restored too
    assert set(rep.metrics) == set(ref.metrics)
    assert rep.metrics["probe_acc"] == ref.metrics["probe_acc"] == 1.0
    assert len(rep.records) == len(ref.records) == 2 * 2 * 8
    for m in ("saliency", "integrated_gradients"):
        # clean maps do not depend on the attack: equal up to float32 rounding
        assert rep.metrics[f"{m}/mask_mass_clean"] == pytest.approx(ref.metrics[f"{m}/mask_mass_clean"], abs=1e-5)
        pre = f"{m}/topk/"  # deterministic attack: the same up to a few pixels' gradient signs
        for name in ("topk_intersection", "spearman", "kendall", "lens_recall"):
            assert rep.metrics[pre + name] == pytest.approx(ref.metrics[pre + name], abs=0.05), pre + name
        assert rep.metrics[pre + "center_shift"] == pytest.approx(ref.metrics[pre + "center_shift"], abs=0.5)
        pre = f"{m}/random_sign/"  # device generator: only the valid ranges
        assert 0.0 <= rep.metrics[pre + "topk_intersection"] <= 1.0
        assert -1.0 <= rep.metrics[pre + "spearman"] <= 1.0
        assert 0.0 <= rep.metrics[pre + "label_kept_rate"] <= 1.0
    for r in rep.records:
        assert r["linf_distance"] <= EPS + 1e-6
    ex = rep.examples[("saliency", "topk")]
    assert ex["x"][0].device.type == "cpu" and ex["clean_map"][0].shape == (32, 32)


# ------------------------------------------------------------------------------------------------ CLIs
def _cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "NVIDIA_TF32_OVERRIDE": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, f"{module} {' '.join(args)} failed:\n{r.stderr[-4000:]}"
    return r


def test_train_gpu_and_eval_cuda_match_cpu(tmp_path):
    """``fragdefense-train trainer=gpu`` (with the default light fragility callback on the GPU), then
    ``fragdefense-eval device=cuda`` and ``device=cpu`` on the same checkpoint: same images, same clean accuracy,
    top-k attack metrics within float32 tolerance, random-sign metrics in range."""
    run = tmp_path / "train"
    _cli(
        "fragdefense.cli.train",
        [
            "data.n_train=160",
            "data.n_test=64",
            "data.batch_size=32",
            "data.probe_size=8",
            "model.width=8",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            f"trainer={'gpu' if ON_CUDA else 'cpu'}",
            "logger=none",
            "callbacks.fragility.steps=3",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    m = json.loads((run / "metrics.json").read_text())
    assert m["device"].split(":")[0] == torch.device(DEV).type  # (recorded "cpu" before train.py used root_device)
    assert m["epochs"] == 1 and 0.0 <= m["fragility"]["probe_acc"] <= 1.0
    ckpt = m["best_checkpoint"]

    results = {}
    for dev in (DEV, "cpu"):
        out = tmp_path / f"eval_{dev.replace(':', '_')}"
        _cli(
            "fragdefense.cli.evaluate",
            [
                f"checkpoint={ckpt}",
                f"device={dev}",
                "data.n_train=160",
                "data.n_test=64",
                "n_images=16",
                "batch_size=8",
                "~methods.integrated_gradients",
                "attacks=[topk,random_sign]",
                "eps=[8/255]",
                "protocol.steps=4",
                "protocol.check_every=1",
                "protocol.k=50",
                "figures=false",
                f"hydra.run.dir={out}",
            ],
            tmp_path,
        )
        results[dev] = json.loads((out / "results.json").read_text())
    d, c = results[DEV], results["cpu"]
    assert d["device"].split(":")[0] == torch.device(DEV).type and c["device"] == "cpu"
    assert d["image_indices"] == c["image_indices"] and d["clean_accuracy"] == c["clean_accuracy"]
    assert d["clean_accuracy"] > 0  # something is attacked
    recs = {r["attack"]: r for r in d["records"]}
    refs = {r["attack"]: r for r in c["records"]}
    assert set(recs) == {"topk", "random_sign"}
    for attack in recs:
        assert recs[attack]["n_images"] == refs[attack]["n_images"] > 0
        assert recs[attack]["n_skipped"] == refs[attack]["n_skipped"]
    for name in ("topk_intersection", "spearman", "kendall", "lens_recall"):
        assert recs["topk"][name] == pytest.approx(refs["topk"][name], abs=0.05), name
    r = recs["random_sign"]
    assert 0.0 <= r["topk_intersection"] <= 1.0 and -1.0 <= r["spearman"] <= 1.0
    assert all(row["linf_distance"] <= EPS + 1e-6 for cell in d["per_image"] for row in cell["images"])
