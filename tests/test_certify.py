"""fragdefense.certify: statistics against scipy, the certification against a literal per-pixel loop, closed-form
smoothed labels, an empirical attack, the top-k overlap bound's properties, seeding and argument checks.

Tolerances: statistics 1e-8 relative in float64 (absolute 1e-200 where scipy's binomtest underflows to 0);
certification radii 1e-8 absolute against the loop (same seeds, float64 model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from fragdefense.certify import (
    binom_test_one_sided,
    bonferroni,
    certified_deletion,
    certified_localization,
    certified_rate_curve,
    certify_attribution,
    clopper_pearson_lower,
    clopper_pearson_upper,
    holm,
    norm_ppf,
    sparsified_smoothgrad_certificate,
    topk_overlap_bound,
)
from fragdefense.certify.smoothing import _label_counts, sparsify_top_k
from fragdefense.certify.stats import betainc

RTOL = 1e-8


# --------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 20000])
def test_binom_test_matches_scipy(n):
    rng = np.random.default_rng(n)
    k = np.arange(n + 1) if n <= 1000 else rng.integers(0, n + 1, 200)
    p = rng.uniform(0.01, 0.99, len(k))
    ours = binom_test_one_sided(torch.tensor(k), n, torch.tensor(p)).numpy()
    ref = np.array([stats.binomtest(int(a), n, float(b), alternative="greater").pvalue for a, b in zip(k, p)])
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=1e-200)


@pytest.mark.parametrize("n", [1, 2, 10, 100, 1000, 20000])
@pytest.mark.parametrize("alpha", [0.05, 1e-3 / 1024, 1e-12])
def test_clopper_pearson_matches_scipy_and_closed_forms(n, alpha):
    k = np.arange(n + 1) if n <= 1000 else np.unique(np.linspace(0, n, 151).round().astype(int))
    lo = clopper_pearson_lower(torch.tensor(k), n, alpha).numpy()
    ref = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    np.testing.assert_allclose(lo, ref, rtol=RTOL, atol=1e-15)
    assert lo[k == n][0] == pytest.approx(alpha ** (1 / n), rel=1e-12)  # k = n: alpha^(1/n)
    assert lo[k == 0][0] == 0.0
    if n > 1:
        one = clopper_pearson_lower(torch.tensor(1), n, alpha).item()  # k = 1: 1 - (1 - alpha)^(1/n)
        assert one == pytest.approx(-math.expm1(math.log1p(-alpha) / n), rel=1e-10)
    up = clopper_pearson_upper(torch.tensor(k), n, alpha).numpy()
    ref_up = np.where(k < n, stats.beta.isf(alpha, k + 1, np.maximum(n - k, 1)), 1.0)
    np.testing.assert_allclose(up, ref_up, rtol=RTOL, atol=1e-15)


def test_betainc_norm_ppf_match_scipy():
    rng = np.random.default_rng(0)
    a, b, x = rng.uniform(0.3, 300, 300), rng.uniform(0.3, 300, 300), rng.uniform(0, 1, 300)
    from scipy import special

    np.testing.assert_allclose(betainc(torch.tensor(a), torch.tensor(b), torch.tensor(x)).numpy(),
                               special.betainc(a, b, x), rtol=1e-8, atol=1e-200)  # fmt: skip
    q = rng.uniform(1e-12, 1 - 1e-12, 200)
    np.testing.assert_allclose(norm_ppf(torch.tensor(q)).numpy(), stats.norm.ppf(q), rtol=1e-10, atol=1e-12)


def test_holm_and_bonferroni_match_brute_force():
    rng = np.random.default_rng(1)
    p = rng.choice([1e-5, 1e-4, 1e-3, 0.004, 0.01, 0.02, 0.3], size=(20, 12)) * rng.uniform(0.5, 1.5, (20, 1))
    p[:, 3] = p[:, 4]  # ties
    alpha = 0.05
    ours = holm(torch.tensor(p), alpha).numpy()
    for row, got in zip(p, ours):
        m = len(row)
        ref = np.zeros(m, dtype=bool)
        for j, i in enumerate(sorted(range(m), key=lambda i: row[i])):
            if row[i] > alpha / (m - j):
                break
            ref[i] = True
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(bonferroni(torch.tensor(p), alpha).numpy(), p <= alpha / p.shape[1])
    assert (ours >= bonferroni(torch.tensor(p), alpha).numpy()).all()


# ----------------------------------------------------------------------------------------- certification


def _tiny_net(seed=0, c=3, hw=5, classes=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(c, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(4 * hw * hw, classes)
    ).double()


def _brute_force(model, x, seeds, *, sigma, n0, n, tau, alpha, top_percent, correction):
    """The procedure written literally: per image, per sample, per pixel."""
    b, c, h, w = x.shape
    m = h * w
    k = max(1, math.ceil(round(top_percent * m / 100, 9)))
    labels = np.zeros((b, m), dtype=np.int8)
    radius = np.zeros((b, m))
    for i in range(b):
        t = int(model(x[i : i + 1]).argmax(1))
        g = torch.Generator().manual_seed(seeds[i])
        c0, c1 = np.zeros(m, dtype=int), np.zeros(m, dtype=int)
        for j in range(n0 + n):
            z = (x[i] + sigma * torch.randn((c, h, w), generator=g, dtype=x.dtype)).requires_grad_(True)
            model(z[None])[0, t].backward()
            s = z.grad.abs().sum(0).flatten().tolist()
            for p in range(m):
                rank = sum(1 for q in range(m) if s[q] > s[p] or (s[q] == s[p] and q < p))
                if rank < k:
                    (c0 if j < n0 else c1)[p] += 1
        sel = (2 * c0 > n0).astype(int)
        cnt = np.where(sel == 1, c1, n - c1)
        pv = np.array([stats.binomtest(int(v), n, tau, alternative="greater").pvalue for v in cnt])
        level = alpha if correction == "none" else alpha / m
        if correction == "holm":
            cert = np.zeros(m, dtype=bool)
            for jj, p in enumerate(sorted(range(m), key=lambda q: pv[q])):
                if pv[p] > alpha / (m - jj):
                    break
                cert[p] = True
        else:
            cert = pv <= level
        plow = np.array([stats.beta.ppf(level, v, n - v + 1) if v > 0 else 0.0 for v in cnt])
        for p in range(m):
            labels[i, p] = sel[p] if cert[p] else -1
            if cert[p]:
                rr = sigma * stats.norm.ppf(tau) if correction == "holm" else sigma * stats.norm.ppf(max(plow[p], tau))
                radius[i, p] = rr
    return labels.reshape(b, h, w), radius.reshape(b, h, w)


@pytest.mark.parametrize("correction", ["bonferroni", "holm", "none"])
def test_matches_literal_loop(correction):
    model = _tiny_net(0)
    x = torch.rand(3, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(sigma=1.0, n0=4, n=20, tau=0.6, alpha=0.2, top_percent=20.0, correction=correction)
    seeds = [11, 12, 13]
    res = certify_attribution(model, x, "saliency", generator=seeds, chunk_size=7, **kw)
    labels, radius = _brute_force(model, x, seeds, **kw)
    np.testing.assert_array_equal(res.labels.numpy(), labels)
    np.testing.assert_allclose(res.radius.numpy(), radius, rtol=0, atol=1e-8)
    assert (labels >= 0).any() and (labels == -1).any()  # neither trivial


def test_sparsify_top_k_ties_follow_the_literal_rule():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 4, (50, 12), generator=g).double()
    for k in (1, 3, 6, 12):
        got = sparsify_top_k(maps, k)
        for row, mask in zip(maps.tolist(), got.tolist()):
            ref = [sum(1 for q in range(12) if row[q] > row[p] or (row[q] == row[p] and q < p)) < k for p in range(12)]
            assert mask == ref


def test_linear_saliency_is_exact():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).double()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    res = certify_attribution(net, x, "saliency", n=100, alpha=0.001, top_percent=25.0, generator=0)
    assert res.certified_rate.tolist() == [1.0, 1.0, 1.0]
    assert (res.counts == 100).all()
    np.testing.assert_allclose(res.p_lower.numpy(), (0.001 / 64) ** (1 / 100), rtol=1e-12)
    w = net[1].weight.detach().view(4, 3, 8, 8)[res.target].abs().sum(1)  # |W[target]| over channels
    ref = sparsify_top_k(w.flatten(1), 16).view(3, 8, 8)
    np.testing.assert_array_equal(res.labels.numpy(), ref.to(torch.int8).numpy())
    r = 0.25 * stats.norm.ppf((0.001 / 64) ** (1 / 100))
    np.testing.assert_allclose(res.radius.numpy(), r, rtol=1e-10)
    assert res.common_radius == pytest.approx(0.25 * stats.norm.ppf(0.75), rel=1e-12)


def _two_pixel_prob(x0, x1, w0, w1, sigma):
    """P(|(x0 + s e0) w0| > |(x1 + s e1) w1|), e ~ N(0, I): pixel 0 in the top 50 % of input x gradient."""
    a0, s0, a1, s1 = x0 * w0, sigma * abs(w0), x1 * w1, sigma * abs(w1)

    def integrand(y):  # density of |N(a0, s0^2)| at y times P(|N(a1, s1^2)| < y)
        f = stats.norm.pdf(y, a0, s0) + stats.norm.pdf(-y, a0, s0)
        return f * (stats.norm.cdf(y, a1, s1) - stats.norm.cdf(-y, a1, s1))

    return integrate.quad(integrand, 0, np.inf, epsabs=1e-12)[0]


def test_input_x_gradient_two_pixels_closed_form():
    w = torch.tensor([[1.0, 1.6], [0.0, 0.0]], dtype=torch.float64)  # class 0 explained
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[1].weight.copy_(w)
        net[1].bias.copy_(torch.tensor([5.0, 0.0]))
    xs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.8, 0.45], [0.6, 0.5], [0.95, 0.05]], dtype=torch.float64)
    x = xs.view(5, 1, 1, 2)
    sigma = 0.2
    probs = [_two_pixel_prob(float(a), float(b), 1.0, 1.6, sigma) for a, b in xs]
    res = certify_attribution(net, x, "input_x_gradient", sigma=sigma, n=400, tau=0.6, alpha=0.01,
                              top_percent=50.0, target=0, generator=list(range(5)))  # fmt: skip
    exact = torch.tensor([[1 if p > 0.5 else 0, 0 if p > 0.5 else 1] for p in probs], dtype=torch.int8)
    cert = res.labels.view(5, 2) >= 0
    assert cert.any(dim=1).sum() >= 3, (probs, res.labels)  # clear cases are certified
    assert torch.equal(res.labels.view(5, 2)[cert], exact[cert])
    for p, c in zip(probs, cert[:, 0].tolist()):
        if abs(p - 0.5) < 0.1:
            assert not c  # p_A = max(p, 1 - p) < tau: must abstain


def test_noisy_images_are_not_clamped_and_registered_methods_accept_them():
    seen = []

    def probe(model, x, target):
        seen.append((float(x.min()), float(x.max())))
        return x.clone()

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    x = torch.full((2, 3, 2, 2), 0.02)
    certify_attribution(net, x, probe, sigma=0.5, n0=2, n=5, generator=0)
    assert min(s[0] for s in seen) < 0.0 and max(s[1] for s in seen) > 1.0
    for method in ("saliency", "integrated_gradients", "smoothgrad"):
        certify_attribution(net, x, method, sigma=0.5, n0=2, n=3, generator=0, method_opts=None)
    from fragdefense.attributions import saliency

    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # the check is back outside the certification
        saliency(net, x - 0.5)


def test_attack_does_not_flip_certified_pixels():
    model = _tiny_net(3, hw=6).float()
    gx = torch.Generator().manual_seed(5)
    x = 0.3 + 0.4 * torch.rand(2, 3, 6, 6, generator=gx)
    sigma, alpha = 0.25, 0.01
    res = certify_attribution(model, x, "saliency", sigma=sigma, n=200, alpha=alpha, generator=[1, 2])
    big_r = res.common_radius
    d = torch.randn(20, 3, 6, 6, generator=gx)
    d = 0.9 * big_r * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    flips = total = 0
    from fragdefense.attributions import resolve_attribution

    spec = resolve_attribution("saliency")
    for i in range(2):
        xa = x[i : i + 1] + d  # 20 perturbed copies, ||delta|| = 0.9 R
        t = res.target[i].repeat(20)
        cnt = _label_counts(spec, model, xa, t, sigma=sigma, samples=1000, split=0, k=res.k, reduce="abs_sum",
                            chunk=2000, gen=torch.Generator().manual_seed(100 + i), opts={})[1]  # fmt: skip
        smoothed = (2 * cnt > 1000).to(torch.int8).view(20, 6, 6)
        cert = res.certified[i]
        flips += int((smoothed[:, cert] != res.labels[i][cert]).sum())
        total += int(cert.sum()) * 20
    assert total > 100
    assert flips / total <= alpha + 0.01  # estimation slack of the n = 1000 smoothed labels


def test_seeding_batch_independence_and_chunking():
    model = _tiny_net(1)
    x = torch.rand(3, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kw = dict(sigma=0.3, n0=4, n=30, tau=0.6, alpha=0.1)
    a = certify_attribution(model, x, "saliency", generator=[5, 6, 7], **kw)
    b = certify_attribution(model, x, "saliency", generator=[5, 6, 7], chunk_size=4, **kw)
    c = certify_attribution(model, x[1:2], "saliency", generator=[6], **kw)
    for f in ("labels", "radius", "counts", "p_lower"):
        assert torch.equal(getattr(a, f), getattr(b, f))
        assert torch.equal(getattr(a, f)[1:2], getattr(c, f))
    d1 = certify_attribution(model, x, "saliency", generator=3, **kw)
    d2 = certify_attribution(model, x, "saliency", generator=3, chunk_size=5, **kw)
    assert torch.equal(d1.labels, d2.labels) and torch.equal(d1.counts, d2.counts)
    h = certify_attribution(model, x, "saliency", generator=[5, 6, 7], correction="holm", **kw)
    assert ((h.labels >= 0) | (a.labels < 0)).all()  # Holm certifies every pixel Bonferroni does
    curve = certified_rate_curve(a, [0.0, a.common_radius, 10.0])
    assert torch.allclose(curve[:, 0], a.certified_rate) and torch.allclose(curve[:, 1], a.certified_rate)
    assert (curve[:, 2] == 0).all() and (curve.diff(dim=1) <= 0).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(n0=0), "n0"),
        (dict(n=0), "`n`"),
        (dict(tau=0.5), "tau"),
        (dict(tau=1.0), "tau"),
        (dict(alpha=0.0), "alpha"),
        (dict(top_percent=100.0), "top_percent"),
        (dict(top_percent=0), "top_percent"),
        (dict(correction="bh"), "correction"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(method_opts={"create_graph": True}), "method_opts"),
        (dict(reduce="max"), "reduce"),
    ],
)
def test_argument_errors(kw, match):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with pytest.raises((ValueError, TypeError), match=match):
        certify_attribution(net, torch.rand(1, 3, 2, 2), "saliency", **kw)


def test_input_and_method_errors():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with pytest.raises(ValueError, match="`x`"):
        certify_attribution(net, torch.rand(1, 3, 2, 2) + 1.0, "saliency")
    with pytest.raises(ValueError, match="method"):
        certify_attribution(net, torch.rand(1, 3, 2, 2), "nope")
    with pytest.raises(ValueError, match="generator"):
        certify_attribution(net, torch.rand(2, 3, 2, 2), "saliency", generator=[1])


# ------------------------------------------------------------------------------- top-k overlap (Levine et al.)


def test_topk_overlap_bound_properties():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(6, 40, generator=g, dtype=torch.float64)
    radii = torch.linspace(0, 2, 21)
    b = topk_overlap_bound(s, radii, sigma=0.5, k=8)
    assert (b[:, 0] == 8).all()  # distinct values: decided at radius 0
    assert (b.diff(dim=1) <= 0).all() and (b[:, -1] < 8).all()
    tie = s.clone()
    top = tie.sort(dim=1, descending=True).values
    tie[tie == top[:, 8:9]] = top[:, 7:8].expand_as(tie)[tie == top[:, 8:9]]  # S_[k] = S_[k+1]
    assert (topk_overlap_bound(tie, [0.0], sigma=0.5, k=8)[:, 0] < 8).all()
    # brute force over m of the definition
    low = stats.norm.cdf(stats.norm.ppf(s.numpy()) - 0.3 / 0.5)
    up = stats.norm.cdf(stats.norm.ppf(s.numpy()) + 0.3 / 0.5)
    for i in range(6):
        order = np.argsort(-s[i].numpy(), kind="stable")
        inside, outside = np.sort(low[i, order[:8]])[::-1], np.sort(up[i, order[8:]])[::-1]
        best = max([0] + [m for m in range(1, 9) if inside[m - 1] > outside[8 - m]])
        assert topk_overlap_bound(s[i : i + 1], [0.3], sigma=0.5, k=8).item() == best


def test_sparsified_smoothgrad_bound_below_empirical_overlap():
    model = _tiny_net(4, hw=6).float()
    gx = torch.Generator().manual_seed(9)
    x = 0.35 + 0.3 * torch.rand(2, 3, 6, 6, generator=gx)
    radii = [0.0, 0.05, 0.1, 0.2]
    cert = sparsified_smoothgrad_certificate(model, x, sigma=0.25, n=400, k=6, radius=radii, generator=[0, 1])
    assert (cert.bound.diff(dim=1) <= 0).all()
    assert cert.bound[:, 1].sum() > 0  # not vacuous
    d = torch.randn(10, 3, 6, 6, generator=gx)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for i in range(2):
        for j, r in enumerate(radii[1:], start=1):
            xa = (x[i : i + 1] + r * d).clamp(0, 1)
            t = cert.target[i].repeat(10)
            att = sparsified_smoothgrad_certificate(
                model, xa, sigma=0.25, n=400, k=6, radius=[0.0], target=t, generator=list(range(10))
            )
            overlap = (att.topk & cert.topk[i]).flatten(1).sum(1)
            assert (overlap >= cert.bound[i, j]).all(), (overlap, cert.bound[i])


# ---------------------------------------------------------------------------------------------- metrics


def test_localization_and_deletion():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).double()
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    res = certify_attribution(net, x, "saliency", n=50, top_percent=25.0, generator=0)
    imp = res.certified_important
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    loc = certified_localization(res, mask)
    ref = (imp & mask).flatten(1).sum(1).double() / imp.flatten(1).sum(1)
    assert torch.allclose(loc, ref)
    d = certified_deletion(net, x, res, generator=1)
    xd = x.masked_fill(imp[:, None], 0.0)
    p = torch.softmax(net(xd), 1)[torch.arange(2), res.target]
    assert torch.allclose(d.p_certified, p) and (d.n_deleted == 4).all()
    assert torch.allclose(d.p_clean - d.p_certified, d.drop_certified)
    with pytest.raises(ValueError, match="mask"):
        certified_localization(res, mask[:1])
