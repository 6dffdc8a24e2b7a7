"""Robustness scores of explanations (fragdefense.metrics.robustness) against Quantus 0.6 and a per-image loop.

Quantus draws its noise with numpy; both sides get the *same* perturbed images: ours through ``perturbations=``,
Quantus through a ``perturb_func`` that returns the precomputed sample ``i`` at its ``i``-th call. Tolerance:
float32 maps and logits, ``rtol=1e-5`` (Quantus computes some ratios in float64 and explains B images per call
where we explain B * n at once).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fragdefense.metrics import robustness as R
from fragdefense.models import create_model

RTOL, ATOL = 1e-5, 1e-7
B, N, SIDE = 5, 4, 16


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=8).eval()
    g = torch.Generator().manual_seed(1)
    # a colour per image plus texture: an untrained network then predicts classes that noise can flip
    x = (torch.rand(B, 3, 1, 1, generator=g) + 0.15 * torch.rand(B, 3, SIDE, SIDE, generator=g)).clamp(0, 1)
    x[:, :, 0, :5] = 0.0  # exact zeros: the relative input stability's eps_min replacement is exercised
    y = torch.randint(0, 10, (B,), generator=g)
    explain = R.make_explain(net, "saliency")
    xp = R.sample_perturbations(x, N, radius=0.05, generator=2)
    return net, x, y, explain, xp


class _Replay:
    """Quantus ``perturb_func``: the ``i``-th call returns the precomputed perturbed batch ``i``."""

    def __init__(self, xp: torch.Tensor) -> None:
        self.xp = xp.numpy()
        self.i = 0

    def __call__(self, arr: np.ndarray, **kwargs) -> np.ndarray:
        out = self.xp[self.i].reshape(arr.shape).astype(arr.dtype)
        self.i += 1
        return out


def _quantus(metric_cls, net, x, y, explain, xp, **kwargs) -> np.ndarray:
    quantus = pytest.importorskip("quantus")

    def qexplain(model, inputs, targets, **kw):
        return explain(torch.from_numpy(np.asarray(inputs)), torch.from_numpy(np.asarray(targets))).numpy()[:, None]

    metric = getattr(quantus, metric_cls)(
        nr_samples=xp.shape[0],
        perturb_func=_Replay(xp),
        normalise=False,
        abs=False,
        disable_warnings=True,
        return_nan_when_prediction_changes=False,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric(model=net, x_batch=x.numpy(), y_batch=y.numpy(), explain_func=qexplain, batch_size=64)
    assert metric.perturb_func.func.i == xp.shape[0]  # every precomputed sample consumed, in order
    return np.asarray(out, dtype=np.float64)


QUANTUS_CASES = [
    ("max_sensitivity", "MaxSensitivity", {}, {}),
    ("avg_sensitivity", "AvgSensitivity", {}, {}),
    ("local_lipschitz_estimate", "LocalLipschitzEstimate", {}, {}),
    ("relative_input_stability", "RelativeInputStability", {"keep_prediction": False}, {}),
    ("relative_output_stability", "RelativeOutputStability", {"keep_prediction": False}, {}),
    # default layer: the input of the last nn.Linear = the output of the Flatten before the head
    (
        "relative_representation_stability",
        "RelativeRepresentationStability",
        {"keep_prediction": False},
        {"layer_names": ["backbone.features.18"]},
    ),
    (
        "relative_representation_stability",
        "RelativeRepresentationStability",
        {"keep_prediction": False, "layer": "backbone.features.16"},
        {"layer_names": ["backbone.features.16"]},
    ),
]


@pytest.mark.parametrize(
    "name,cls,ours_kw,q_kw", QUANTUS_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(QUANTUS_CASES)]
)
def test_matches_quantus(setup, name, cls, ours_kw, q_kw):
    net, x, y, explain, xp = setup
    ours = getattr(R, name)(net, x, y, explain, perturbations=xp, chunk_size=7, **ours_kw)
    ref = _quantus(cls, net, x, y, explain, xp, **q_kw)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=RTOL, atol=ATOL)


def _banded(explain):
    """The explanation with rows 2..4 zeroed: the maps' zero entries (divided by eps_min) are exercised."""

    def f(xx, yy):
        m = explain(xx, yy).clone()
        m[:, 2:5] = 0
        return m

    return f


@pytest.mark.parametrize("name,cls", [(c[0], c[1]) for c in QUANTUS_CASES[:5]])
def test_matches_quantus_with_zero_map_entries(setup, name, cls):
    net, x, y, explain, xp = setup
    kw = {"keep_prediction": False} if "stability" in name else {}
    ours = getattr(R, name)(net, x, y, _banded(explain), perturbations=xp, **kw)
    ref = _quantus(cls, net, x, y, _banded(explain), xp)
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=RTOL, atol=ATOL)


def test_combined_scores_equal_single_scores(setup):
    net, x, y, explain, xp = setup
    both = R.robustness_scores(net, x, y, explain, perturbations=xp, keep_prediction=False)
    for name in R.ROBUSTNESS_SCORES:
        kw = (
            {}
            if name in ("max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate")
            else {"keep_prediction": False}
        )
        single = getattr(R, name)(net, x, y, explain, perturbations=xp, **kw)
        torch.testing.assert_close(both[name], single, rtol=RTOL, atol=ATOL)


def _loop_reference(net, x, y, explain, xp, name, eps_min=1e-6):
    """Brute force, one image and one sample at a time, float64, the paper's definitions: max over the samples
    that keep the predicted class (NaN when none), denominators floored at eps_min."""
    out = []
    feats = {}
    h = net.backbone.head.register_forward_pre_hook(lambda m, a: feats.__setitem__("f", a[0].detach()))
    try:
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            a = explain(xi, y[i : i + 1]).double().flatten()
            with torch.no_grad():
                logit = net(xi).double().flatten()
            rep = feats["f"].double().flatten()
            vals = []
            for j in range(xp.shape[0]):
                xj = xp[j, i : i + 1]
                aj = explain(xj, y[i : i + 1]).double().flatten()
                with torch.no_grad():
                    lj = net(xj).double().flatten()
                rj = feats["f"].double().flatten()
                if lj.argmax() != logit.argmax():
                    continue

                def rel(u, v):
                    return ((u - v) / torch.where(u == 0, torch.full_like(u, eps_min), u)).norm()

                num = rel(a, aj)
                if name == "relative_input_stability":
                    den = rel(xi.double().flatten(), xj.double().flatten())
                elif name == "relative_output_stability":
                    den = (logit - lj).norm()
                elif name == "relative_representation_stability":
                    den = rel(rep, rj)
                else:  # max_sensitivity
                    vals.append(float((aj - a).norm() / a.norm()))
                    continue
                vals.append(float(num / max(float(den), eps_min)))
            out.append(max(vals) if vals else math.nan)
    finally:
        h.remove()
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "name",
    ["relative_input_stability", "relative_output_stability", "relative_representation_stability", "max_sensitivity"],
)
def test_keep_prediction_against_loop(setup, name):
    """Large noise so that some samples flip the prediction: those are excluded from the max (Agarwal et al.),
    where Quantus' return_nan_when_prediction_changes=True would return NaN for the whole image."""
    net, x, y, explain, _ = setup
    xp = R.sample_perturbations(x, 6, radius=0.2, generator=5)
    with torch.no_grad():
        flips = (net(xp.flatten(0, 1)).argmax(1).view(6, B) != net(x).argmax(1)).sum(0)
    assert (flips == 0).any() and ((flips > 0) & (flips < 6)).any() and (flips == 6).any()  # every case exercised
    ours = getattr(R, name)(net, x, y, explain, perturbations=xp, keep_prediction=True, chunk_size=8)
    ref = _loop_reference(net, x, y, explain, xp, name)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_eps_min_floor_against_loop():
    """The denominator is max(norm, eps_min) (paper and Quantus' docs), also for 0 < norm < eps_min."""
    net = create_model("small_cnn", num_classes=3, width=4).double().eval()  # float64: a 1e-8 change is visible
    x = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    xp = (x + torch.tensor([1e-8, 0.0], dtype=torch.float64).view(2, 1, 1, 1)).unsqueeze(
        0
    )  # image 0: tiny change, image 1: none

    def explain(xx, yy):
        return xx.sum(1)  # the map changes with the input

    out = R.relative_input_stability(net, x, torch.tensor([0, 1]), explain, perturbations=xp, keep_prediction=False)
    # image 0: ||(x - x')/x|| = 1e-8 / 0.5 * sqrt(192) = 2.8e-7 < eps_min -> floored to 1e-6 (Quantus keeps 2.8e-7);
    # the map's relative change: 3e-8 / 1.5 * sqrt(64)
    num0 = 3 * 1e-8 / 1.5 * 8
    assert out[0].item() == pytest.approx(num0 / 1e-6, rel=1e-6)
    assert out[1].item() == 0.0


def test_constant_explanation(setup):
    net, x, y, _, xp = setup

    def zeros(xx, yy):
        return torch.zeros(xx.shape[0], xx.shape[2], xx.shape[3])

    s = R.robustness_scores(net, x, y, zeros, perturbations=xp, keep_prediction=False)
    for name in ("max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate"):
        assert torch.equal(s[name], torch.zeros(B)), name
    for name in ("relative_input_stability", "relative_output_stability", "relative_representation_stability"):
        assert torch.isfinite(s[name]).all() and (s[name] == 0).all(), name


def test_explain_calls_are_batched(setup):
    net, x, y, explain, _ = setup
    calls, sizes = [0], []

    def counting(xx, yy):
        calls[0] += 1
        sizes.append(xx.shape[0])
        return explain(xx, yy)

    forwards = [0]
    h = net.register_forward_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    try:
        maps = explain(x, y)
        for n, chunk in ((3, 4), (4, None), (4, 1)):
            calls[0], forwards[0] = 0, 0
            sizes.clear()
            R.max_sensitivity(net, x, y, counting, n_samples=n, chunk_size=chunk, maps=maps, generator=0)
            want = math.ceil(B * n / (chunk or B * n))
            assert calls[0] == want and sum(sizes) == B * n and forwards[0] == want
        # a stability needs the logits: one forward per chunk plus one on the clean images
        calls[0], forwards[0] = 0, 0
        R.relative_output_stability(net, x, y, counting, n_samples=3, chunk_size=4, maps=maps, generator=0)
        assert calls[0] == 4 and forwards[0] == 4 + 4 + 1
    finally:
        h.remove()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_image_generators_independent_of_batch(setup, norm):
    net, x, y, explain, _ = setup
    full = R.robustness_scores(net, x, y, explain, n_samples=3, norm=norm, radius=0.1, generator=[10, 11, 12, 13, 14])
    part = R.robustness_scores(net, x[1:4], y[1:4], explain, n_samples=3, norm=norm, radius=0.1, generator=[11, 12, 13])
    for name in R.ROBUSTNESS_SCORES:
        torch.testing.assert_close(part[name], full[name][1:4], rtol=1e-4, atol=1e-6, equal_nan=True)


def test_sampling_balls():
    x = torch.rand(3, 3, 8, 8)
    p = R.sample_perturbations(x, 50, radius=0.1, norm="linf", clamp=False, generator=0)
    d = p - x
    assert d.abs().max() <= 0.1 + 1e-6 and d.abs().max() > 0.09
    p2 = R.sample_perturbations(x, 50, radius=0.1, norm="l2", clamp=False, generator=0)
    r = (p2 - x).flatten(2).norm(dim=2)
    assert (r <= 0.1 + 1e-6).all() and (r > 0.09).all()  # uniform in a 192-dim ball: almost all near the sphere
    pc = R.sample_perturbations(x, 5, radius=0.5, generator=0)
    assert pc.min() >= 0 and pc.max() <= 1
    assert torch.equal(pc, R.sample_perturbations(x, 5, radius=0.5, generator=0))


def test_float64_input(setup):
    net, x, y, explain, xp = setup
    s32 = R.relative_input_stability(net, x, y, explain, perturbations=xp)
    s64 = R.relative_input_stability(net, x.double(), y, explain, perturbations=xp.double())
    torch.testing.assert_close(s64.float(), s32, rtol=RTOL, atol=ATOL, equal_nan=True)  # NaN: every sample flips
    assert torch.isfinite(R.max_sensitivity(net, x.double(), y, explain, n_samples=2, generator=0)).all()


def test_registered_as_explanation_scores(setup):
    from fragdefense.metrics.registry import compute_explanation_scores, get_metric, list_metrics

    net, x, y, explain, xp = setup
    names = list(R.ROBUSTNESS_SCORES)
    assert all(n in list_metrics(kind="explanation") for n in names)
    assert all(get_metric(n).similarity is False and get_metric(n).report is False for n in names)
    out = compute_explanation_scores(
        net, x, y, explain(x, y), explain, names, {"perturbations": xp, "keep_prediction": False}
    )
    ref = R.robustness_scores(net, x, y, explain, perturbations=xp, keep_prediction=False)
    for n in names:
        torch.testing.assert_close(out[n], ref[n], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"max_sensitivity: unknown option\(s\) \['k'\]"):
        compute_explanation_scores(net, x, y, explain(x, y), explain, ["max_sensitivity"], {"k": 5})


def test_make_explain_normalize(setup):
    net, x, y, _, _ = setup
    m = R.make_explain(net, "saliency", normalize=True)(x, y)
    torch.testing.assert_close(m.sum((1, 2)), torch.ones(B))
    raw = R.make_explain(net, "saliency")(x, y)
    assert not torch.allclose(raw.sum((1, 2)), torch.ones(B))
    with pytest.raises(TypeError, match="`normalize`"):
        R.make_explain(net, "saliency", normalize=1)
    with pytest.raises(ValueError, match="`method`"):
        R.make_explain(net, "nope")


@pytest.mark.parametrize(
    "kw,exc,word",
    [
        ({"radius": 0}, ValueError, "`radius`"),
        ({"radius": float("inf")}, ValueError, "`radius`"),
        ({"radius": "a/b"}, ValueError, "`radius`"),
        ({"n_samples": 0}, ValueError, "`n_samples`"),
        ({"n_samples": 2.5}, TypeError, "`n_samples`"),
        ({"norm": "l1"}, ValueError, "`norm`"),
        ({"chunk_size": 0}, ValueError, "`chunk_size`"),
        ({"clamp": 1}, TypeError, "`clamp`"),
        ({"maps": torch.zeros(B, 4, 4)}, ValueError, "`maps`"),
        ({"perturbations": torch.zeros(2, B, 3, 4, 4)}, ValueError, "`perturbations`"),
        ({"generator": [1, 2]}, ValueError, "`generator`"),
        ({"generator": "seed"}, TypeError, "`generator`"),
        ({"keep_prediction": "yes"}, TypeError, "`keep_prediction`"),
        ({"eps_min": 0}, ValueError, "`eps_min`"),
        ({"layer": "backbone.nope"}, ValueError, "`layer`"),
        ({"x": torch.rand(B, 3, SIDE, SIDE) * 2}, ValueError, "`x`"),
        ({"x": torch.zeros(0, 3, SIDE, SIDE)}, ValueError, "`x`"),
        ({"y": torch.tensor([0, 1])}, ValueError, "`y`"),
        ({"y": torch.full((B,), 10)}, ValueError, "`y`"),
        ({"y": torch.full((B,), -1)}, ValueError, "`y`"),
        ({"y": torch.zeros(B)}, TypeError, "`y`"),
        ({"explain": 3}, TypeError, "`explain`"),
    ],
)
def test_bad_arguments_raise_before_work(setup, kw, exc, word):
    net, x, y, explain, _ = setup
    calls = [0]

    def counting(xx, yy):
        calls[0] += 1
        return explain(xx, yy)

    args = {"x": x, "y": y, "explain": counting}
    args.update({k: kw.pop(k) for k in ("x", "y", "explain") if k in kw})
    with pytest.raises(exc, match=word):
        R.relative_representation_stability(
            net, args["x"], args["y"], args["explain"], n_samples=kw.pop("n_samples", 2), **kw
        )
    assert calls[0] == 0


def test_explain_output_checked(setup):
    net, x, y, _, _ = setup
    with pytest.raises(ValueError, match="`explain`"):
        R.max_sensitivity(net, x, y, lambda xx, yy: torch.zeros(xx.shape[0], 3), n_samples=2)


def test_logits_read_from_the_explanation_forward(setup):
    """A make_explain saliency of the same model: the stabilities read the logits / representation from its forward
    pass (no forward of their own); the scores equal those of the plain path (own forward passes)."""
    net, x, y, explain, xp = setup
    assert explain.forward_at_input and not R.make_explain(net, "beta_smooth").forward_at_input
    forwards = [0]
    h = net.register_forward_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    try:
        R.relative_output_stability(net, x, y, explain, n_samples=3, chunk_size=4, generator=0)
        assert forwards[0] == 1 + 4  # the clean explanation and one per chunk, nothing else
        forwards[0] = 0
        R.relative_output_stability(net, x, y, explain, n_samples=3, chunk_size=4, generator=0, maps=explain(x, y))
        assert forwards[0] == 1 + 1 + 4  # the maps given above, the clean logits, one per chunk
    finally:
        h.remove()
    fast = R.robustness_scores(net, x, y, explain, perturbations=xp, chunk_size=6)
    plain = R.robustness_scores(net, x, y, lambda a, b: explain(a, b), perturbations=xp, chunk_size=6)
    for name in R.ROBUSTNESS_SCORES:
        torch.testing.assert_close(fast[name], plain[name], rtol=RTOL, atol=ATOL, equal_nan=True)
    for layer in ("backbone.features.16", None):
        f = R.relative_representation_stability(net, x, y, explain, perturbations=xp, layer=layer)
        p = R.relative_representation_stability(net, x, y, lambda a, b: explain(a, b), perturbations=xp, layer=layer)
        torch.testing.assert_close(f, p, rtol=RTOL, atol=ATOL, equal_nan=True)
