"""Faithfulness scores (fragdefense.metrics.faithfulness) against brute-force loops, a dense linear solve and
Quantus 0.6 on identical inputs and identical randomness.

Tolerances: deletion / insertion vs the per-image per-step loop 1e-6 (float32 forwards of different batch
compositions); vs Quantus PixelFlipping 1e-6; the imputation vs a dense ``torch.linalg.solve`` 1e-8 (float64) and
vs Quantus's ``noisy_linear_imputation`` 1e-6 (float32 output); ROAD accuracies exactly; faithfulness
correlation vs Quantus and vs the loop 1e-5 (float32 logits and sums).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fragdefense.metrics import faithfulness as FM
from fragdefense.metrics.faithfulness import (
    deletion_auc,
    faithfulness_correlation,
    gaussian_blur,
    insertion_auc,
    noisy_linear_imputation,
    road,
)
from fragdefense.models import create_model

quantus = pytest.importorskip("quantus")


class Counting(nn.Module):
    """Counts forwards and images of a wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += x.shape[0]
        return self.model(x)


def _model(channels: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kw = {} if channels == 3 else {"mean": [0.5], "std": [0.25]}
    model = create_model("small_cnn", 10, width=8, in_channels=channels, **kw).eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():  # an untrained net is nearly uniform: sharpen it so that the curves move
        last.weight.mul_(40.0)
    return model


def _data(b: int = 4, c: int = 3, side: int = 16, seed: int = 0, model: nn.Module | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, side, side, generator=g)
    maps = torch.rand(b, side, side, generator=g)  # continuous: no ties
    if model is None:
        y = torch.randint(0, 10, (b,), generator=g)
    else:
        with torch.no_grad():
            y = model(x).argmax(1)
    return x, y, maps


def _keys(seed: int, d: int) -> torch.Tensor:
    """The tie-breaking keys image ``seed`` draws first (module docstring)."""
    return torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _brute_curve(model, x, y, maps, steps, base, insertion, orders=None):
    b, c, h, w = x.shape
    d = h * w
    ks = [i * d // steps for i in range(steps + 1)]
    curve = np.zeros((b, steps + 1))
    for i in range(b):
        order = np.argsort(-maps[i].reshape(-1).double().numpy(), kind="stable") if orders is None else orders[i]
        for j, k in enumerate(ks):
            m = torch.zeros(d, dtype=torch.bool)
            m[torch.as_tensor(order[:k], dtype=torch.long)] = True
            m = m.view(1, h, w)
            xi = torch.where(m, x[i], base[i]) if insertion else torch.where(m, base[i], x[i])
            with torch.no_grad():
                curve[i, j] = model(xi[None]).softmax(1)[0, y[i]].item()
    frac = np.array(ks) / d
    auc = ((curve[:, 1:] + curve[:, :-1]) / 2 * np.diff(frac)).sum(1)
    return auc, curve


# ----------------------------------------------------------------------------------------------------------
# deletion / insertion
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("baseline", ["zeros", "blur", "mean", "tensor"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_deletion_insertion_match_brute_force(baseline, chunk_size):
    model = _model()
    x, y, maps = _data(model=model)
    steps = 10  # 256 pixels: uneven steps of 25 / 26 pixels
    spec = torch.rand(3, 1, 1) if baseline == "tensor" else baseline
    if baseline == "blur":
        base = gaussian_blur(x, 5, 2.0)
    elif baseline == "mean":
        base = x.mean((2, 3), keepdim=True).expand_as(x)
    elif baseline == "tensor":
        base = spec.expand_as(x)
    else:
        base = torch.zeros_like(x)
    for fn, ins in ((deletion_auc, False), (insertion_auc, True)):
        auc, curve = fn(
            model, x, y, maps, steps=steps, baseline=spec, blur_kernel_size=5, blur_sigma=2.0,
            chunk_size=chunk_size, return_curve=True,
        )  # fmt: skip
        ref_auc, ref_curve = _brute_curve(model, x, y, maps, steps, base, ins)
        np.testing.assert_allclose(curve.numpy(), ref_curve, atol=1e-6, rtol=0)
        np.testing.assert_allclose(auc.numpy(), ref_auc, atol=1e-6, rtol=0)
        assert np.ptp(ref_curve) > 1e-3  # the curve moves: the comparison can fail


def test_gaussian_blur_matches_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(2, 3, 16, 16)
    ref = tvf.gaussian_blur(x, [7, 7], [1.5, 1.5])
    torch.testing.assert_close(gaussian_blur(x, 7, 1.5), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels,side,steps", [(1, 16, 32), (3, 12, 24)])
def test_deletion_matches_quantus_pixel_flipping(channels, side, steps):
    # Quantus needs features_in_step | H * W; colour: C elements per pixel, 6 pixels per step
    model = _model(channels)
    x, y, maps = _data(c=channels, side=side, model=model)
    b, d = x.shape[0], side * side
    black = x.amin((1, 2, 3), keepdim=True)  # Quantus's "black" baseline: the per-image minimum, not 0
    auc, curve = deletion_auc(model, x, y, maps, steps=steps, baseline=black, return_curve=True)
    pf = quantus.PixelFlipping(
        features_in_step=channels * d // steps, abs=False, normalise=False, perturb_baseline="black",
        return_aggregate=False, disable_warnings=True,
    )  # fmt: skip
    q = np.array(pf(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(), batch_size=b))
    assert q.shape == (b, steps)
    np.testing.assert_allclose(curve[:, 1:].numpy(), q, atol=1e-6, rtol=0)
    # Quantus's AUC: unit spacing, without the unperturbed point; ours: over the fraction of pixels in [0, 1]
    q_auc = ((q[:, 1:] + q[:, :-1]) / 2).sum(1)
    c0 = curve[:, 0].double().numpy()
    np.testing.assert_allclose(auc.numpy(), (q_auc + (c0 + q[:, 0]) / 2) / steps, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# ROAD imputation
# ----------------------------------------------------------------------------------------------------------
def _dense_imputation(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Independent reference: the ROAD system built entry by entry and solved densely (float64)."""
    c, h, w = x.shape
    idx = mask.reshape(-1).nonzero()[:, 0].tolist()
    pos = {p: i for i, p in enumerate(idx)}
    a = torch.zeros(len(idx), len(idx), dtype=torch.float64)
    rhs = torch.zeros(len(idx), c, dtype=torch.float64)
    for i, p in enumerate(idx):
        r, col = divmod(p, w)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, col + dc
                if (dr, dc) == (0, 0) or not (0 <= rr < h and 0 <= cc < w):
                    continue
                wt = 1 / 6 if dr == 0 or dc == 0 else 1 / 12
                a[i, i] += wt
                q = rr * w + cc
                if q in pos:
                    a[i, pos[q]] -= wt
                else:
                    rhs[i] += wt * x[:, rr, cc].double()
    out = x.double().reshape(c, -1).clone()
    out[:, idx] = torch.linalg.solve(a, rhs).T
    return out.reshape(c, h, w)


@pytest.mark.parametrize("shape,frac", [((2, 8, 8), 0.5), ((1, 6, 10), 0.9), ((3, 7, 5), 0.2)])
def test_imputation_matches_dense_solve(shape, frac):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, *shape, generator=g, dtype=torch.float64)
    mask = torch.rand(3, *shape[1:], generator=g) < frac
    mask[0, 0, 0] = mask[0, -1, -1] = True  # corners
    out = noisy_linear_imputation(x, mask, noise=0.0, tol=1e-11)
    for i in range(3):
        torch.testing.assert_close(out[i], _dense_imputation(x[i], mask[i]), atol=1e-8, rtol=0)
    assert torch.equal(out[~mask[:, None].expand_as(x)], x[~mask[:, None].expand_as(x)])


def test_imputation_matches_quantus(monkeypatch):
    from quantus.functions.perturb_func import noisy_linear_imputation as q_impute

    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 3, 12, 12, generator=g)
    masks = torch.rand(4, 12, 12, generator=g) < torch.tensor([0.05, 0.3, 0.7, 0.97])[:, None, None]
    noise = 0.01
    ours = noisy_linear_imputation(x, masks, noise=noise, generator=[10, 11, 12, 13])
    for i in range(4):
        z = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(10 + i)).reshape(3, -1)
        idx = masks[i].reshape(-1).nonzero()[:, 0].numpy()
        monkeypatch.setattr(np.random, "randn", lambda *s, z=z, idx=idx: z[:, idx].double().numpy())
        ref = q_impute(arr=x[i].numpy(), indices=idx, noise=noise)
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# ROAD
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_matches_quantus(order, monkeypatch):
    model = _model(1, seed=1)
    x, y, maps = _data(b=4, c=1, side=16, seed=2, model=model)
    percentages = [5, 20, 40, 60, 80, 95]
    seeds = [100, 101, 102, 103]
    ours, curve = road(
        model, x, y, maps, percentages=percentages, order=order, noise=0.05, generator=seeds, return_curve=True
    )
    q_maps = maps if order == "morf" else 1 - maps  # Quantus has MoRF only: LeRF is MoRF of the reversed map
    d = 256
    for i in range(4):
        g = torch.Generator().manual_seed(seeds[i])
        torch.rand(d, generator=g, dtype=torch.float64)  # the tie-breaking keys
        noises = [torch.randn(1, 16, 16, generator=g).reshape(1, -1) for _ in percentages]
        order_i = np.argsort(-q_maps[i].reshape(-1).numpy())
        draws = iter(
            [n[:, order_i[: int(d * p / 100)]].double().numpy() for n, p in zip(noises, percentages)]
        )  # fmt: skip
        monkeypatch.setattr(np.random, "randn", lambda *s, draws=draws: next(draws))
        metric = quantus.ROAD(percentages=percentages, noise=0.05, abs=False, normalise=False, disable_warnings=True)
        q = metric(model=model, x_batch=x[i : i + 1].numpy(), y_batch=y[i : i + 1].numpy(),
                   a_batch=q_maps[i : i + 1, None].numpy(), batch_size=1)  # fmt: skip
        np.testing.assert_array_equal(curve[i].numpy(), np.array([q[p] for p in percentages], dtype=np.float32))
    torch.testing.assert_close(ours, curve.mean(1))
    assert 0 < float(curve.mean()) < 1  # both outcomes occur: the comparison can fail


def test_quantus_road_fails_on_colour_images():
    """The reason colour ROAD is checked against the imputation reference only (documented in ``road``)."""
    model = _model()
    x, y, maps = _data(model=model)
    with pytest.raises(IndexError):
        quantus.ROAD(percentages=[50], normalise=False, disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(), batch_size=4
        )
    out = road(model, x, y, maps, percentages=[50], generator=0)
    assert out.shape == (4,)


def test_road_probability_matches_loop():
    model = _model()
    x, y, maps = _data(model=model)
    percentages, seeds = [10, 50, 90], [7, 8, 9, 10]
    _, curve = road(
        model, x, y, maps, percentages=percentages, noise=0.01, score="probability", generator=seeds,
        chunk_size=5, return_curve=True,
    )  # fmt: skip
    for i in range(4):
        g = torch.Generator().manual_seed(seeds[i])
        torch.rand(256, generator=g, dtype=torch.float64)
        order = np.argsort(-maps[i].reshape(-1).numpy())
        for j, p in enumerate(percentages):
            m = torch.zeros(256, dtype=torch.bool)
            m[torch.as_tensor(order[: int(256 * p / 100)])] = True
            m = m.view(16, 16)
            xi = torch.from_numpy(_dense_imputation(x[i], m).numpy()).float()
            xi = xi + 0.01 * torch.randn(3, 16, 16, generator=g) * m
            with torch.no_grad():
                ref = model(xi[None]).softmax(1)[0, y[i]].item()
            assert abs(curve[i, j].item() - ref) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# faithfulness correlation
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["logit", "probability"])
def test_faithfulness_correlation_matches_quantus(output, monkeypatch):
    model = _model(1, seed=2)
    x, y, maps = _data(b=5, c=1, side=16, seed=4, model=model)
    runs, size = 20, 24
    black = x.amin((1, 2, 3), keepdim=True)  # Quantus's "black" baseline: the per-image minimum, not 0
    ours, sums, drops = faithfulness_correlation(
        model,
        x,
        y,
        maps,
        subset_size=size,
        n_runs=runs,
        baseline=black,
        output=output,
        generator=list(range(5)),
        return_runs=True,
    )
    subsets = torch.stack(
        [torch.rand(runs, 256, generator=torch.Generator().manual_seed(i), dtype=torch.float64).argsort(-1)[:, :size]
         for i in range(5)]
    )  # fmt: skip
    draws = iter([subsets[i, r].numpy() for r in range(runs) for i in range(5)])  # Quantus: run-major
    monkeypatch.setattr(np.random, "choice", lambda *a, **k: next(draws))
    fc = quantus.FaithfulnessCorrelation(
        nr_runs=runs, subset_size=size, abs=False, normalise=False, perturb_baseline="black",
        return_aggregate=False, disable_warnings=True,
    )  # fmt: skip
    q = fc(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(), batch_size=5,
           softmax=output == "probability")  # fmt: skip
    q = np.array(q)
    np.testing.assert_allclose(ours.numpy(), q, atol=1e-5, rtol=0)
    assert np.ptp(q) > 0.05
    # the explicit-subsets hook gives the same values
    again = faithfulness_correlation(model, x, y, maps, subsets=subsets, baseline=black, output=output)
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=0)


def test_faithfulness_correlation_matches_loop_colour():
    model = _model()
    x, y, maps = _data(model=model)
    maps_c = torch.rand(4, 3, 16, 16)  # channel maps: summed over channels
    runs, size = 12, 30
    corr = faithfulness_correlation(
        model, x, y, maps_c, subset_size=size, n_runs=runs, baseline="mean", output="logit", generator=[1, 2, 3, 4]
    )
    pix = maps_c.sum(1).reshape(4, -1).double()
    for i in range(4):
        keys = torch.rand(runs, 256, generator=torch.Generator().manual_seed(i + 1), dtype=torch.float64)
        sub = keys.argsort(-1)[:, :size]
        with torch.no_grad():
            f0 = model(x[i : i + 1])[0, y[i]].item()
            drops, sums = [], []
            for r in range(runs):
                m = torch.zeros(256, dtype=torch.bool)
                m[sub[r]] = True
                xi = torch.where(m.view(1, 16, 16), x[i].mean((1, 2), keepdim=True), x[i])
                drops.append(f0 - model(xi[None])[0, y[i]].item())
                sums.append(pix[i, sub[r]].sum().item())
        ref = np.corrcoef(sums, drops)[0, 1]
        assert abs(corr[i].item() - ref) < 1e-5  # float32 logits of different batch compositions


# ----------------------------------------------------------------------------------------------------------
# degenerate maps, seeding, batching, forwards
# ----------------------------------------------------------------------------------------------------------
def test_degenerate_maps():
    model = _model()
    x, y, _ = _data(model=model)
    seeds = [21, 22, 23, 24]
    const, zero = torch.full((4, 16, 16), 0.3), torch.zeros(4, 16, 16)
    # deletion of a constant map = deletion in the random order of the per-image keys
    d_const = deletion_auc(model, x, y, const, steps=8, generator=seeds)
    d_zero = deletion_auc(model, x, y, zero, steps=8, generator=seeds)
    orders = [np.argsort(_keys(s, 256).numpy(), kind="stable") for s in seeds]
    ref, _ = _brute_curve(model, x, y, const, 8, torch.zeros_like(x), False, orders=orders)
    np.testing.assert_allclose(d_const.numpy(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(d_zero, d_const)
    # a different seed gives a different random order
    assert not torch.allclose(deletion_auc(model, x, y, zero, steps=8, generator=[1, 2, 3, 4]), d_const)
    # faithfulness correlation of a constant / all-zero map: 0, not NaN (Quantus: NaN)
    for m in (const, zero):
        fc = faithfulness_correlation(model, x, y, m, subset_size=10, n_runs=10, generator=0)
        assert torch.equal(fc, torch.zeros(4))
    r = road(model, x, y, zero, percentages=[30, 60], generator=seeds)
    assert torch.isfinite(r).all()


def test_per_image_generators_independent_of_batch():
    model = _model()
    x, y, maps = _data(model=model)
    maps[:, :4] = 0.0  # ties in the map: the tie order is random
    seeds = [31, 32, 33, 34]
    calls = [
        lambda xs, ys, ms, g: deletion_auc(model, xs, ys, ms, steps=16, generator=g),
        lambda xs, ys, ms, g: insertion_auc(model, xs, ys, ms, steps=16, generator=g),
        lambda xs, ys, ms, g: road(model, xs, ys, ms, percentages=[20, 70], score="probability", generator=g),
        lambda xs, ys, ms, g: faithfulness_correlation(model, xs, ys, ms, subset_size=16, n_runs=8, generator=g),
    ]
    for fn in calls:
        full = fn(x, y, maps, seeds)
        for i in (0, 2):
            alone = fn(x[i : i + 1], y[i : i + 1], maps[i : i + 1], [seeds[i]])
            assert abs(alone.item() - full[i].item()) < 1e-6
        sub = fn(x[1:3], y[1:3], maps[1:3], seeds[1:3])
        torch.testing.assert_close(sub, full[1:3], atol=1e-6, rtol=0)


def test_chunk_size_and_forward_counts_not_above_quantus(monkeypatch):
    model = Counting(_model()).eval()
    x, y, maps = _data(side=12, model=model)
    b, d, steps = 4, 144, 24
    model.calls = 0
    deletion_auc(model, x, y, maps, steps=steps)
    ours = model.calls
    model.calls = 0
    quantus.PixelFlipping(features_in_step=3 * d // steps, normalise=False, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(), batch_size=b
    )
    assert ours == 1 <= model.calls == steps
    for chunk in (1, 5, 100, 1000):
        model.calls = model.images = 0
        deletion_auc(model, x, y, maps, steps=steps, chunk_size=chunk)
        assert (model.calls, model.images) == (math.ceil(b * (steps + 1) / chunk), b * (steps + 1))

    model1 = Counting(_model(1)).eval()
    x1, y1, maps1 = _data(c=1, model=model1)
    model1.calls = 0
    road(model1, x1, y1, maps1, percentages=[10, 50, 90], generator=0)
    ours = model1.calls
    model1.calls = 0
    quantus.ROAD(percentages=[10, 50, 90], normalise=False, disable_warnings=True)(
        model=model1, x_batch=x1.numpy(), y_batch=y1.numpy(), a_batch=maps1[:, None].numpy(), batch_size=b
    )
    assert ours == 1 <= model1.calls == 3

    model1.calls = 0
    faithfulness_correlation(model1, x1, y1, maps1, subset_size=20, n_runs=10, generator=0)
    ours = model1.calls
    model1.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantus.FaithfulnessCorrelation(nr_runs=10, subset_size=20, normalise=False, disable_warnings=True)(
            model=model1, x_batch=x1.numpy(), y_batch=y1.numpy(), a_batch=maps1[:, None].numpy(), batch_size=b
        )
    assert ours == 1 <= model1.calls == 11


def test_map_shapes():
    model = _model()
    x, y, maps = _data(model=model)
    ref = deletion_auc(model, x, y, maps, steps=8)
    torch.testing.assert_close(deletion_auc(model, x, y, maps[:, None], steps=8), ref)
    split = torch.stack([maps * 0.2, maps * 0.5, maps * 0.3], 1)  # channels summed back to maps
    torch.testing.assert_close(deletion_auc(model, x, y, split, steps=8), ref)


def test_train_mode_restored_and_no_grad():
    model = _model().train()
    x, y, maps = _data()
    out = insertion_auc(model, x, y, maps, steps=4)
    assert model.training and not out.requires_grad


_BAD = [
    (deletion_auc, {"steps": 0}, "`steps`"),
    (deletion_auc, {"steps": 257}, "`steps`"),
    (deletion_auc, {"baseline": "white"}, "`baseline`"),
    (deletion_auc, {"baseline": torch.zeros(2, 2)}, "`baseline`"),
    (insertion_auc, {"baseline": "blur", "blur_kernel_size": 4}, "`blur_kernel_size`"),
    (insertion_auc, {"baseline": "blur", "blur_sigma": 0}, "`blur_sigma`"),
    (deletion_auc, {"chunk_size": 0}, "`chunk_size`"),
    (deletion_auc, {"generator": [1, 2]}, "`generator`"),
    (deletion_auc, {"generator": "seed"}, "`generator`"),
    (road, {"percentages": [10, 100]}, "`percentages`"),
    (road, {"percentages": []}, "`percentages`"),
    (road, {"order": "random"}, "`order`"),
    (road, {"noise": -1}, "`noise`"),
    (road, {"score": "auc"}, "`score`"),
    (faithfulness_correlation, {"subset_size": 0}, "`subset_size`"),
    (faithfulness_correlation, {"n_runs": 1}, "`n_runs`"),
    (faithfulness_correlation, {"output": "prob"}, "`output`"),
    (faithfulness_correlation, {"subsets": torch.zeros(4, 3, 2, dtype=torch.long)}, "`subsets`"),
    (faithfulness_correlation, {"subsets": torch.full((4, 3, 1), 256)}, "`subsets`"),
]


@pytest.mark.parametrize("fn,kwargs,match", _BAD)
def test_bad_arguments_named_before_any_forward(fn, kwargs, match):
    model = Counting(_model()).eval()
    x, y, maps = _data()
    with pytest.raises((TypeError, ValueError), match=match):
        fn(model, x, y, maps, **kwargs)
    assert model.calls == 0


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.rand(4, 3, 16, 16) * 2, "y", "maps"), "`x`"),
        ((None, torch.zeros(4), "maps"), "`y`"),
        ((None, torch.zeros(3, dtype=torch.long), "maps"), "`y`"),
        ((None, "y", torch.rand(4, 15, 16)), "`maps`"),
        ((None, "y", torch.rand(4, 2, 16, 16)), "`maps`"),
        ((None, "y", torch.full((4, 16, 16), float("nan"))), "`maps`"),
    ],
)
def test_bad_inputs_named(args, match):
    model = Counting(_model()).eval()
    x, y, maps = _data()
    xa, ya, ma = args
    xa = x if xa is None else xa
    ya = y if isinstance(ya, str) else ya
    ma = maps if isinstance(ma, str) else ma
    for fn in (deletion_auc, road, faithfulness_correlation):
        with pytest.raises((TypeError, ValueError), match=match):
            fn(model, xa, ya, ma)
    assert model.calls == 0


def test_label_out_of_range_named():
    model = _model()
    x, _, maps = _data()
    with pytest.raises(ValueError, match="`y`"):
        deletion_auc(model, x, torch.full((4,), 10), maps, steps=4)


def test_registered_explanation_scores():
    from fragdefense.metrics.registry import METRICS, compute_explanation_scores

    model = _model()
    x, y, maps = _data(model=model)
    expected = {
        "deletion_auc": False,
        "insertion_auc": True,
        "road_morf": False,
        "road_lerf": True,
        "faithfulness_correlation": True,
    }
    for n, better in expected.items():
        assert METRICS[n].kind == "explanation" and METRICS[n].similarity is better and not METRICS[n].report
    # each score gets its own settings, flat (keyword arguments of its functional form, plus the generator)
    opts = {
        "deletion_auc": {"steps": 8, "baseline": "mean"},
        "insertion_auc": {"steps": 8, "baseline": "mean"},
        "road_lerf": {"percentages": (20, 60), "score": "probability", "generator": [1, 2, 3, 4]},
        "faithfulness_correlation": {"subset_size": 12, "n_runs": 6, "baseline": "mean", "generator": [1, 2, 3, 4]},
    }
    out = {n: compute_explanation_scores(model, x, y, maps, None, [n], o)[n] for n, o in opts.items()}
    torch.testing.assert_close(out["deletion_auc"], deletion_auc(model, x, y, maps, steps=8, baseline="mean"))
    torch.testing.assert_close(out["insertion_auc"], insertion_auc(model, x, y, maps, steps=8, baseline="mean"))
    ref = road(model, x, y, maps, percentages=(20, 60), score="probability", order="lerf", generator=[1, 2, 3, 4])
    torch.testing.assert_close(out["road_lerf"], ref)
    ref = faithfulness_correlation(model, x, y, maps, subset_size=12, n_runs=6, baseline="mean", generator=[1, 2, 3, 4])
    torch.testing.assert_close(out["faithfulness_correlation"], ref)
    with pytest.raises(ValueError, match=r"road: unknown option\(s\) \['baseline'\]"):
        compute_explanation_scores(model, x, y, maps, None, ["road_morf"], {"baseline": "mean"})
    assert FM.__all__
