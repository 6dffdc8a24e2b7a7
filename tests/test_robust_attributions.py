"""Explanation-side defenses (beta_smooth, uniform_grad, local_smooth): values against independent references
(a per-image loop of the authors' RelEx algorithm with torch.optim.SGD, explicit per-sample gradients,
saliency of to_softplus copies), second-order paths against finite differences, batch invariance,
registry and errors; and the attack's surrogate option."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fragdefense.attacks import attack_interpretation
from fragdefense.attributions import (
    attribute,
    get_attribution,
    list_attributions,
    list_robust_attributions,
    saliency,
    supports_create_graph,
    to_map,
)
from fragdefense.attributions.robust import (
    beta_smooth,
    local_smooth,
    local_smooth_objective,
    uniform_ball_noise,
    uniform_grad,
)
from fragdefense.models import create_model, to_softplus

B, C, H, W, K = 3, 2, 8, 8, 4
D64 = torch.float64


def tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, K),
    )


@pytest.fixture(scope="module")
def relu_net() -> nn.Module:
    torch.manual_seed(0)
    return tiny_net().double().eval()


@pytest.fixture(scope="module")
def soft_net(relu_net: nn.Module) -> nn.Module:
    return to_softplus(relu_net, beta=2.0)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(1), dtype=D64)


@pytest.fixture(scope="module")
def t() -> torch.Tensor:
    return torch.tensor([0, 3, 1])


def check_fd(fn, x0: torch.Tensor, n_dirs: int = 3, h: float = 1e-5, rtol: float = 1e-4) -> None:
    """Directional derivatives of the scalar ``fn`` at ``x0``: autograd vs central differences."""
    xg = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(xg), xg)
    assert grad.abs().max() > 0
    g = torch.Generator().manual_seed(5)
    for _ in range(n_dirs):
        v = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        with torch.no_grad():
            fd = (fn(x0 + h * v) - fn(x0 - h * v)) / (2 * h)
        torch.testing.assert_close((grad * v).sum(), fd, rtol=rtol, atol=1e-10)


def plain_grad(model, z, target):
    """d logit_target / dz by one explicit autograd call (noisy copies may leave [0, 1])."""
    zg = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(zg).gather(1, target[:, None]).sum(), zg)
    return g


# ----------------------------------------------------------------------------------------- beta_smooth
def test_beta_smooth_is_saliency_of_the_softplus_copy(relu_net, x, t):
    for beta in (0.5, 3.0, 20.0):
        ref = saliency(to_softplus(relu_net, beta), x, t)
        torch.testing.assert_close(beta_smooth(relu_net, x, t, beta=beta), ref, rtol=0, atol=0)
    # an attack's softplus surrogate (beta = 50) is explained with beta_smooth's own beta: the exact same map
    from fragdefense.models import softplus_surrogate

    torch.testing.assert_close(
        beta_smooth(softplus_surrogate(relu_net, 50.0), x, t, beta=3.0), beta_smooth(relu_net, x, t, beta=3.0)
    )


def test_beta_smooth_tends_to_saliency_away_from_kinks():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    xs = torch.rand(256, 6, dtype=D64)
    # keep inputs whose pre-activations are all at least 0.05 away from the kink at 0
    z1 = net[0](xs)
    z2 = net[2](net[1](z1))
    keep = (z1.abs().amin(1) > 0.05) & (z2.abs().amin(1) > 0.05)
    assert keep.sum() >= 3
    img = xs[keep].view(-1, 1, 2, 3)
    model = nn.Sequential(nn.Flatten(), net)
    ref = saliency(model, img, 1)
    errs = [float((beta_smooth(model, img, 1, beta=b) - ref).abs().max()) for b in (10.0, 100.0, 1000.0, 1e4)]
    assert all(a > b for a, b in zip(errs, errs[1:]) if a > 1e-12), errs
    assert errs[-1] < 1e-9 and errs[0] > 1e-4, errs


def test_beta_smooth_create_graph_matches_finite_differences(relu_net, x, t):
    wts = torch.rand(B, H, W, generator=torch.Generator().manual_seed(4), dtype=D64)
    check_fd(lambda z: (to_map(beta_smooth(relu_net, z, t, beta=2.0, create_graph=True)) * wts).sum(), x)


# ---------------------------------------------------------------------------------------- uniform_grad
@pytest.mark.parametrize("ball", ["linf", "l2"])
def test_uniform_grad_is_the_mean_of_explicit_per_sample_gradients(ball, relu_net, x, t):
    n, r = 5, 0.2
    u = uniform_ball_noise(n, x.shape, ball, generator=torch.Generator().manual_seed(7), dtype=D64)
    ref = torch.stack([plain_grad(relu_net, x + r * u[i], t) for i in range(n)]).mean(0)
    ours = uniform_grad(relu_net, x, t, n_samples=n, radius=r, ball=ball, noise=u, internal_batch_size=4)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # the seeded path draws exactly these samples
    seeded = uniform_grad(relu_net, x, t, n_samples=n, radius=r, ball=ball, seed=7)
    torch.testing.assert_close(seeded, ref, rtol=1e-10, atol=1e-12)
    # batch of one == in batch
    one = uniform_grad(relu_net, x[1:2], t[1:2], n_samples=n, radius=r, ball=ball, noise=u[:, 1:2])
    torch.testing.assert_close(one, ours[1:2], rtol=1e-10, atol=1e-12)


def test_uniform_ball_noise_distribution():
    d = 12
    g = torch.Generator().manual_seed(0)
    lin = uniform_ball_noise(4000, (1, 3, 2, 2), "linf", generator=g, dtype=D64)
    assert lin.abs().max() <= 1
    # U[-1, 1]: mean 0, variance 1/3 (standard errors ~0.0026 and ~0.0015 over 48000 draws)
    assert abs(float(lin.mean())) < 0.015 and abs(float(lin.var()) - 1 / 3) < 0.01
    l2 = uniform_ball_noise(4000, (1, 3, 2, 2), "l2", generator=g, dtype=D64).flatten(1)
    norms = l2.norm(dim=1)
    assert norms.max() <= 1 + 1e-12
    # uniform in the d-ball: P(|u| <= s) = s^d, so E|u|^2 = d / (d + 2) and the median norm is 0.5^(1/d)
    assert abs(float((norms**2).mean()) - d / (d + 2)) < 0.01
    assert abs(float(norms.median()) - 0.5 ** (1 / d)) < 0.01
    # directions are isotropic: mean of u / |u| ~ 0 in every coordinate
    assert float((l2 / norms[:, None]).mean(0).abs().max()) < 0.06


def test_uniform_grad_default_radius_matches_smoothgrad_std(relu_net, x, t):
    d = C * H * W
    u = uniform_ball_noise(3, x.shape, "l2", generator=torch.Generator().manual_seed(2), dtype=D64)
    a = uniform_grad(relu_net, x, t, n_samples=3, ball="l2", noise=u)
    b = uniform_grad(relu_net, x, t, n_samples=3, ball="l2", noise=u, radius=0.15 * math.sqrt(d + 2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_uniform_grad_create_graph_matches_finite_differences(soft_net, x, t):
    u = uniform_ball_noise(3, x.shape, "linf", generator=torch.Generator().manual_seed(3), dtype=D64)
    wts = torch.rand(B, H, W, generator=torch.Generator().manual_seed(4), dtype=D64)
    check_fd(
        lambda z: (
            to_map(uniform_grad(soft_net, z, t, n_samples=3, radius=0.1, noise=u, create_graph=True)) * wts
        ).sum(),
        x,
    )


# ---------------------------------------------------------------------------------------- local_smooth
def relex_reference(
    model, x, target, noise, *, init, iters, lr=0.1, mtm=0.99, lambda1=1e-4, lambda2=1.0, level=0.1, base=0.0
):
    """The authors' RelEx loop (JBNU-VL/RelEx, relex.py), one image at a time with torch.optim.SGD
    (``base``: masking ``base + m (x - base)``; the authors' code is ``base = 0``)."""
    out = []
    for bi in range(x.shape[0]):
        xb = x[bi : bi + 1]
        std = (xb.max() - xb.min()) * level
        m = init[bi : bi + 1].clone().requires_grad_(True)
        opt = torch.optim.SGD([m], lr=lr, momentum=mtm)
        for it in range(iters):
            batch_x = xb + std * noise[it, :, bi]
            fg = F.softmax(model(base + (batch_x - base) * m), 1)[:, target[bi]]
            bg = F.softmax(model(base + (batch_x - base) * (1 - m)), 1)[:, target[bi]]
            losses = -torch.log(fg) + lambda1 * m.abs().flatten(1).sum(1) - lambda2 * torch.log(1 - bg + 1e-7)
            # the authors call losses.backward(1 / N); autograd.grad leaves the shared test net's .grad alone
            (g,) = torch.autograd.grad(losses, m, torch.ones_like(losses) / losses.numel())
            m.grad = g / torch.sqrt((g**2).sum())
            opt.step()
            opt.zero_grad()
            m.data.clamp_(0, 1)
        out.append(m.detach())
    return torch.cat(out)


def test_local_smooth_matches_the_authors_loop(relu_net, x, t):
    iters, n = 6, 4
    noise = torch.randn(iters, n, *x.shape, generator=torch.Generator().manual_seed(0), dtype=D64)
    init = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=D64) / 100
    ref = relex_reference(relu_net, x, t, noise, init=init, iters=iters)
    ours = local_smooth(relu_net, x, t, n_samples=n, iters=iters, noise=noise, mask_init=init, internal_batch_size=5)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
    # batch of one == in batch; chunking does not matter
    one = local_smooth(relu_net, x[2:], t[2:], n_samples=n, iters=iters, noise=noise[:, :, 2:], mask_init=init[2:])
    torch.testing.assert_close(one, ours[2:], rtol=1e-10, atol=1e-12)
    whole = local_smooth(
        relu_net, x, t, n_samples=n, iters=iters, noise=noise, mask_init=init, internal_batch_size=None
    )
    torch.testing.assert_close(whole, ours, rtol=1e-10, atol=1e-12)


def test_local_smooth_reduces_its_objective_masks_in_unit_range_and_is_seeded(relu_net, x, t):
    eval_noise = torch.randn(64, *x.shape, generator=torch.Generator().manual_seed(9), dtype=D64)
    init = torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=D64) / 100  # = seed 0's init
    m = local_smooth(relu_net, x, t, n_samples=8, iters=30, seed=0)
    assert ((m >= 0) & (m <= 1)).all() and m.shape == x.shape and m.dtype == x.dtype
    before = local_smooth_objective(relu_net, x, init, t, eval_noise)
    after = local_smooth_objective(relu_net, x, m, t, eval_noise)
    assert (after < before - 0.1).all(), (before, after)
    assert torch.equal(m, local_smooth(relu_net, x, t, n_samples=8, iters=30, seed=0))
    assert not torch.equal(m, local_smooth(relu_net, x, t, n_samples=8, iters=30, seed=1))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(m, local_smooth(relu_net, x, t, n_samples=8, iters=30, generator=gen))
    # target=None explains the predicted class
    pred = relu_net(x).argmax(1)
    torch.testing.assert_close(
        local_smooth(relu_net, x, n_samples=2, iters=3, seed=0),
        local_smooth(relu_net, x, pred, n_samples=2, iters=3, seed=0),
    )


def test_local_smooth_objective_matches_the_definition(relu_net, x, t):
    noise = torch.randn(5, *x.shape, generator=torch.Generator().manual_seed(2), dtype=D64)
    m = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=D64)
    ours = local_smooth_objective(relu_net, x, m, t, noise, lambda1=0.01, lambda2=0.5)
    for bi in range(B):
        std = 0.1 * (x[bi].max() - x[bi].min())
        xi = x[bi] + std * noise[:, bi]
        p_fg = F.softmax(relu_net(xi * m[bi]), 1)[:, t[bi]]
        p_bg = F.softmax(relu_net(xi * (1 - m[bi])), 1)[:, t[bi]]
        ref = (-torch.log(p_fg) - 0.5 * torch.log(1 - p_bg + 1e-7)).mean() + 0.01 * m[bi].abs().sum()
        torch.testing.assert_close(ours[bi], ref, rtol=1e-10, atol=1e-12)


def test_local_smooth_baseline_masks_toward_the_baseline(relu_net, x, t):
    iters, n, base = 4, 3, 0.3
    noise = torch.randn(iters, n, *x.shape, generator=torch.Generator().manual_seed(0), dtype=D64)
    init = torch.full_like(x, 0.2)
    ref = relex_reference(relu_net, x, t, noise, init=init, iters=iters, base=base)
    ours = local_smooth(relu_net, x, t, n_samples=n, iters=iters, noise=noise, mask_init=0.2, baseline=base)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(ours, local_smooth(relu_net, x, t, n_samples=n, iters=iters, noise=noise, mask_init=0.2))


def test_local_smooth_unrolled_create_graph_matches_finite_differences(soft_net, x, t):
    iters, n = 3, 2
    noise = torch.randn(iters, n, *x.shape, generator=torch.Generator().manual_seed(0), dtype=D64)
    wts = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(4), dtype=D64)
    common = dict(n_samples=n, iters=iters, noise=noise, mask_init=0.5, lr=0.02, momentum=0.5, create_graph=True)

    def f(z, **kw):
        return (local_smooth(soft_net, z, t, **common, **kw) * wts).sum()

    m = local_smooth(soft_net, x, t, **{**common, "create_graph": False})
    assert ((m > 0) & (m < 1)).all()  # interior: the clamp is inactive, the map is smooth in x
    check_fd(f, x)
    # truncated unrolling: unroll=iters is the full path; unroll=1 differs but is finite
    xg = x.clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad(f(xg), xg)
    (g_all,) = torch.autograd.grad(f(xg, unroll=iters), xg)
    (g_one,) = torch.autograd.grad(f(xg, unroll=1), xg)
    torch.testing.assert_close(g_all, g_full)
    assert torch.isfinite(g_one).all() and not torch.allclose(g_one, g_full)


def test_create_graph_gives_parameter_gradients_and_no_side_effects(relu_net, soft_net, x, t):
    opts = {
        "beta_smooth": {"beta": 2.0},
        "uniform_grad": {"n_samples": 2, "seed": 0},
        "local_smooth": {"n_samples": 2, "iters": 2, "seed": 0, "mask_init": 0.5},
    }
    for name in list_robust_attributions():
        params = list(soft_net.parameters())
        a = attribute(name, soft_net, x, t, create_graph=True, **opts[name])
        grads = torch.autograd.grad((a**2).sum(), [p for p in params if p.ndim > 1])
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name
        xr = x.clone().requires_grad_(True)
        relu_net.train()
        try:
            b = attribute(name, relu_net, xr, t, **opts[name])
            assert relu_net.training and b.grad_fn is None and not b.requires_grad and xr.grad is None
            assert b.shape == x.shape and b.dtype == x.dtype
            assert all(p.grad is None for p in relu_net.parameters())
        finally:
            relu_net.eval()


# ------------------------------------------------------------------------------------- registry / errors
def test_registry_resolves_the_defenses():
    assert list_robust_attributions() == ["beta_smooth", "local_smooth", "uniform_grad"]
    assert not set(list_robust_attributions()) & set(list_attributions())
    assert get_attribution("beta_smooth") is beta_smooth and get_attribution("local_smooth") is local_smooth
    assert all(supports_create_graph(n) for n in list_robust_attributions())
    with pytest.raises(ValueError, match="explanation defenses: beta_smooth, local_smooth, uniform_grad"):
        get_attribution("relex")


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("beta_smooth", {"beta": 0.0}, "`beta`"),
        ("beta_smooth", {"beta": -1.0}, "`beta`"),
        ("uniform_grad", {"ball": "l1"}, "`ball`"),
        ("uniform_grad", {"radius": -0.1}, "`radius`"),
        ("uniform_grad", {"n_samples": 0}, "`n_samples`"),
        ("uniform_grad", {"n_samples": 2, "noise": torch.zeros(3, B, C, H, W)}, "`noise`"),
        ("uniform_grad", {"seed": 0, "generator": torch.Generator()}, "either `generator` or `seed`"),
        ("local_smooth", {"iters": 0}, "`iters`"),
        ("local_smooth", {"n_samples": 0}, "`n_samples`"),
        ("local_smooth", {"momentum": 1.0}, "`momentum`"),
        ("local_smooth", {"lr": 0.0}, "`lr`"),
        ("local_smooth", {"lambda1": -1.0}, "`lambda1`"),
        ("local_smooth", {"noise_level": float("nan")}, "`noise_level`"),
        ("local_smooth", {"mask_init": 2.0}, "`mask_init`"),
        ("local_smooth", {"unroll": 0}, "`unroll`"),
        ("local_smooth", {"iters": 2, "n_samples": 2, "noise": torch.zeros(1, 2, B, C, H, W)}, "`noise`"),
        ("local_smooth", {"internal_batch_size": 0}, "`internal_batch_size`"),
    ],
)
def test_errors_name_the_argument(name, kwargs, match, relu_net, x, t):
    with pytest.raises((ValueError, TypeError), match=match):
        attribute(name, relu_net, x, t, **kwargs)


@pytest.mark.parametrize("name", ["beta_smooth", "uniform_grad", "local_smooth"])
def test_bad_images_and_targets(name, relu_net, x, t):
    with pytest.raises(ValueError, match=r"`x`.*\[0, 1\]"):
        attribute(name, relu_net, x * 3, t)
    with pytest.raises(ValueError, match="`x`.*shape"):
        attribute(name, relu_net, x[0], t)
    with pytest.raises(ValueError, match="`target`"):
        attribute(name, relu_net, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        attribute(name, relu_net, x, torch.tensor([0, 1, K]))
    with pytest.raises(TypeError, match="`model`"):
        attribute(name, lambda z: z, x, t)


# ------------------------------------------------------------------------------------ attack: surrogate
def test_attack_surrogate_option():
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=4).eval()
    xs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ls_opts = {"n_samples": 2, "iters": 2, "seed": 0}
    common = dict(attack="topk", eps=4 / 255, steps=2, k=20, beta=10.0, generator=0)
    res = attack_interpretation(net, xs, method="local_smooth", method_opts=ls_opts, surrogate="saliency", **common)
    assert res.protocol["surrogate"] == "saliency" and res.protocol["surrogate_opts"] == {}
    assert res.protocol["method"] == "local_smooth"
    # maps and metrics are those of the explained method on the original network
    c = net(xs).argmax(1)
    torch.testing.assert_close(res.clean_map, to_map(local_smooth(net, xs, c, **ls_opts)))
    torch.testing.assert_close(res.adv_map, to_map(local_smooth(net, res.x_adv, c, **ls_opts)))
    # the gradient comes from the surrogate: same ascent as a saliency attack whose iterates are judged by
    # local_smooth; a non-differentiable method becomes attackable through a differentiable surrogate
    dl = attribute("deeplift", net, xs)
    assert dl.shape == xs.shape
    res2 = attack_interpretation(net, xs, method="deeplift", surrogate="saliency", **common)
    assert res2.protocol["surrogate"] == "saliency" and bool(res2.label_kept.all())
    with pytest.raises(ValueError, match="differentiable `surrogate`"):
        attack_interpretation(net, xs, method="deeplift", **common)
    with pytest.raises(ValueError, match="differentiable `surrogate`"):
        attack_interpretation(net, xs, method="saliency", surrogate="lrp", **common)
    with pytest.raises(ValueError, match="unknown attribution"):
        attack_interpretation(net, xs, method="saliency", surrogate="nope", **common)
    # without a surrogate the protocol is unchanged (no extra keys)
    res3 = attack_interpretation(net, xs, method="saliency", **common)
    assert "surrogate" not in res3.protocol


def test_attack_through_the_unrolled_local_smooth_path():
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=4).eval()
    xs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    res = attack_interpretation(
        net,
        xs,
        attack="topk",
        method="local_smooth",
        method_opts={"n_samples": 2, "iters": 2, "seed": 0},
        eps=4 / 255,
        steps=2,
        k=20,
        beta=10.0,
        generator=0,
    )
    assert res.n_attacked == 2 and bool(res.label_kept.all())
    assert float((res.x_adv - xs).abs().max()) <= 4 / 255 + 1e-6
