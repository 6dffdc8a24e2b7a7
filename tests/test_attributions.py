"""Tests of fragdefense.attributions: values against captum, double backprop against finite
differences, batch independence, chunking, IG completeness, error messages."""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import (
    LRP,
    DeepLift,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from captum.attr._utils.lrp_rules import EpsilonRule
from torch import nn

from fragdefense.attributions import (
    ATTRIBUTIONS,
    CREATE_GRAPH_METHODS,
    IG_METHODS,
    attribute,
    deeplift,
    get_attribution,
    gradcam,
    input_x_gradient,
    integrated_gradients,
    list_attributions,
    lrp,
    saliency,
    smoothgrad,
    supports_create_graph,
    to_map,
)
from fragdefense.models import create_model, to_softplus

B, C, H, W, K = 4, 3, 8, 8, 5

pytestmark = pytest.mark.filterwarnings(
    "ignore:Input Tensor 0 did not already require gradients:UserWarning",
    "ignore:Setting forward, backward hooks:UserWarning",
)


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
def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return create_model("small_cnn", width=4).double().eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return 0.2 + 0.6 * torch.rand(B, C, H, W, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def t() -> torch.Tensor:
    return torch.tensor([0, 3, 1, 4])


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Element-wise ``|ours - ref| <= rtol * (|ref| + max|ref|)``: relative, with a floor at the scale
    of the map so near-zero entries do not demand absolute exactness."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    ref = ref.detach().to(ours.dtype)
    scale = float(ref.abs().max())
    assert scale > 0, "reference map is all zero: the comparison would be vacuous"
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * scale)


def net_by_name(name: str, relu_net: nn.Module, soft_net: nn.Module) -> nn.Module:
    return {"relu": relu_net, "softplus": soft_net}[name]


# ----------------------------------------------------------------------------- values vs captum


@pytest.mark.parametrize("kind", ["relu", "softplus"])
def test_saliency_and_input_x_gradient_match_captum(kind, relu_net, soft_net, x, t):
    net = net_by_name(kind, relu_net, soft_net)
    assert_rel_close(saliency(net, x, t), Saliency(net).attribute(x, target=t, abs=False))
    assert_rel_close(saliency(net, x, t, abs=True), Saliency(net).attribute(x, target=t, abs=True))
    assert_rel_close(input_x_gradient(net, x, t), InputXGradient(net).attribute(x, target=t))


@pytest.mark.parametrize("kind", ["relu", "softplus"])
@pytest.mark.parametrize("method", IG_METHODS)
def test_integrated_gradients_match_captum(kind, method, relu_net, soft_net, x, t):
    net = net_by_name(kind, relu_net, soft_net)
    ref = IntegratedGradients(net).attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=12, method=method)
    ours = integrated_gradients(net, x, t, steps=12, method=method, internal_batch_size=10)
    assert_rel_close(ours, ref)


def test_integrated_gradients_baseline_and_prob_match_captum(soft_net, x, t):
    base = torch.full((1, C, 1, 1), 0.5, dtype=torch.float64)
    ref = IntegratedGradients(soft_net).attribute(
        x, baselines=base.expand_as(x), target=t, n_steps=10, method="riemann_right"
    )
    assert_rel_close(integrated_gradients(soft_net, x, t, steps=10, baseline=base), ref)
    assert_rel_close(integrated_gradients(soft_net, x, t, steps=10, baseline=0.5), ref)

    def prob(z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(soft_net(z), dim=1)

    ref_p = IntegratedGradients(prob).attribute(x, target=t, n_steps=10, method="riemann_right")
    assert_rel_close(integrated_gradients(soft_net, x, t, steps=10, output="prob"), ref_p)


@pytest.mark.parametrize("kind", ["relu", "softplus"])
@pytest.mark.parametrize("variant", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothgrad_matches_captum_noise_tunnel(kind, variant, relu_net, soft_net, x, t):
    """captum draws noise = torch.normal(0, sigma) of shape (B*n, C, H, W) in float32, image-major.
    With sigma = 0.25 (a power of two) that noise is exactly sigma * randn; replaying the same RNG
    stream and handing the draws to ``noise=`` gives the same noisy images."""
    net = net_by_name(kind, relu_net, soft_net)
    n, sigma = 6, 0.25
    torch.manual_seed(123)
    ref = NoiseTunnel(Saliency(net)).attribute(x, nt_type=variant, nt_samples=n, stdevs=sigma, target=t, abs=False)
    torch.manual_seed(123)
    eps = torch.randn(B * n, C, H, W)  # captum's draws, row b * n + i
    noise = eps.double().view(B, n, C, H, W).transpose(0, 1)
    ours = smoothgrad(net, x, t, n_samples=n, sigma=sigma, variant=variant, noise=noise, internal_batch_size=5)
    assert_rel_close(ours, ref)


@pytest.mark.parametrize("kind", ["relu", "softplus"])
def test_deeplift_matches_captum(kind, relu_net, soft_net, x, t):
    net = net_by_name(kind, relu_net, soft_net)
    # captum recognises nonlinearities by exact type: the reference for the to_softplus subclass is
    # the same network built with plain nn.Softplus modules
    ref_net = copy.deepcopy(relu_net)
    if kind == "softplus":
        for i, m in enumerate(ref_net):
            if isinstance(m, nn.ReLU):
                ref_net[i] = nn.Softplus(beta=2.0, threshold=20.0)
    ref = DeepLift(ref_net).attribute(x.clone().requires_grad_(), torch.zeros_like(x), target=t)
    ours = deeplift(net, x, t)
    assert_rel_close(ours, ref)
    # summation-to-delta
    with torch.no_grad():
        delta = net(x).gather(1, t[:, None])[:, 0] - net(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(ours.sum((1, 2, 3)), delta, rtol=1e-6, atol=1e-8)


def test_lrp_matches_captum(relu_net, x, t):
    relu_net[5].rule = EpsilonRule()  # captum has no default rule for nn.Flatten; ours attaches one
    ref = LRP(relu_net).attribute(x.clone().requires_grad_(), target=t)
    assert not hasattr(relu_net[5], "rule")  # captum removes rules
    assert_rel_close(lrp(relu_net, x, t), ref)
    assert not any(hasattr(m, "rule") for m in relu_net.modules())  # we leave no rule behind


def test_lrp_keeps_user_rules(relu_net, x, t):
    rule = EpsilonRule(epsilon=1e-9)
    relu_net[0].rule = rule
    try:
        lrp(relu_net, x, t)
        assert relu_net[0].rule is rule
    finally:
        del relu_net[0].rule


def test_gradcam_matches_captum(relu_net, soft_net, x, t):
    for net in (relu_net, soft_net):
        for relu in (True, False):
            layer_attr = LayerGradCam(net, net[3]).attribute(x, target=t, relu_attributions=relu)
            ref = LayerAttribution.interpolate(layer_attr, (H, W), interpolate_mode="bilinear")
            ours = gradcam(net, x, t, relu=relu)
            assert ours.shape == (B, 1, H, W)
            assert_rel_close(ours, ref)
            assert_rel_close(gradcam(net, x, t, relu=relu, layer="3"), ref)


def test_small_cnn_matches_captum(small_cnn):
    g = torch.Generator().manual_seed(3)
    xs = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    ts = torch.tensor([1, 7, 2])
    assert_rel_close(saliency(small_cnn, xs, ts), Saliency(small_cnn).attribute(xs, target=ts, abs=False))
    ref = IntegratedGradients(small_cnn).attribute(xs, target=ts, n_steps=8, method="riemann_right")
    assert_rel_close(integrated_gradients(small_cnn, xs, ts, steps=8, internal_batch_size=5), ref)
    ref = DeepLift(small_cnn).attribute(xs.clone().requires_grad_(), target=ts)
    assert_rel_close(deeplift(small_cnn, xs, ts), ref)
    last = [m for m in small_cnn.modules() if isinstance(m, nn.Conv2d)][-1]
    ref = LayerAttribution.interpolate(
        LayerGradCam(small_cnn, last).attribute(xs, target=ts, relu_attributions=True), (32, 32), "bilinear"
    )
    assert_rel_close(gradcam(small_cnn, xs, ts), ref)
    # LRP runs on the backbone with normalised pixels (see lrp's docstring)
    z = (xs - small_cnn.mean) / small_cnn.std
    flat = small_cnn.backbone.features[-1]
    flat.rule = EpsilonRule()
    ref = LRP(small_cnn.backbone).attribute(z.requires_grad_(), target=ts)
    assert_rel_close(lrp(small_cnn, xs, ts), ref)


# ----------------------------------------------------------------------------- double backprop


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


def test_second_order_saliency_and_ig_match_finite_differences(soft_net, x, t):
    wts = torch.rand(B, H, W, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def f_sal(z):
        return (to_map(saliency(soft_net, z, t, create_graph=True)) * wts).sum()

    def f_ig(z):
        return (
            to_map(integrated_gradients(soft_net, z, t, steps=8, internal_batch_size=7, create_graph=True)) * wts
        ).sum()

    def f_sg(z):
        noise = torch.randn(4, *z.shape, generator=torch.Generator().manual_seed(6), dtype=z.dtype)
        return (to_map(smoothgrad(soft_net, z, t, n_samples=4, sigma=0.1, noise=noise, create_graph=True)) * wts).sum()

    def f_ixg(z):
        return (input_x_gradient(soft_net, z, t, create_graph=True) ** 2).sum()

    for fn in (f_sal, f_ig, f_sg, f_ixg):
        check_fd(fn, x)


@pytest.mark.parametrize("name", CREATE_GRAPH_METHODS)
def test_create_graph_gives_parameter_gradients(name, soft_net, x, t):
    opts = {"integrated_gradients": {"steps": 4}, "smoothgrad": {"n_samples": 3, "seed": 0}}.get(name, {})
    params = list(soft_net.parameters())
    a = attribute(name, soft_net, x, t, create_graph=True, **opts)
    grads = torch.autograd.grad((to_map(a) ** 2).sum(), params, allow_unused=True)
    # every weight matrix influences the map (the last bias does not: gradients ignore it)
    weights = [g for p, g in zip(params, grads) if p.ndim > 1]
    assert len(weights) == 3
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in weights)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", sorted(ATTRIBUTIONS))
def test_no_graph_and_no_side_effects_without_create_graph(name, relu_net, x, t):
    relu_net.train()  # mode must be left as the caller set it (no BN/dropout in this net)
    try:
        xr = x.clone().requires_grad_(True)
        a = attribute(name, relu_net, xr, t, **({"steps": 4} if name == "integrated_gradients" else {}))
        assert a.grad_fn is None and not a.requires_grad
        assert relu_net.training
        assert all(p.requires_grad and p.grad is None for p in relu_net.parameters())
        assert xr.grad is None
        expect_c = 1 if name == "gradcam" else C
        assert a.shape == (B, expect_c, H, W) and a.dtype == x.dtype
    finally:
        relu_net.eval()


def test_works_under_no_grad_and_with_frozen_parameters(x, t):
    torch.manual_seed(0)
    net = tiny_net().double()
    ref = saliency(net, x, t)
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(saliency(net, x, t), ref)
        assert gradcam(net, x, t).abs().sum() > 0
        assert integrated_gradients(net, x, t, steps=4).abs().sum() > 0
    assert not any(p.requires_grad for p in net.parameters())


def test_float32_default_dtype(t):
    torch.manual_seed(0)
    net = tiny_net().eval()
    xf = torch.rand(B, C, H, W)
    a = integrated_gradients(net, xf, t, steps=5)
    assert a.dtype == torch.float32
    assert_rel_close(a, IntegratedGradients(net).attribute(xf, target=t, n_steps=5, method="riemann_right"), 1e-4)


# ----------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize("name", sorted(ATTRIBUTIONS))
def test_batch_of_one_equals_row_of_batch(name, relu_net, small_cnn, x):
    g = torch.Generator().manual_seed(7)
    x32 = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    for net, xs in ((relu_net, x), (small_cnn, x32)):
        b = xs.shape[0]
        noise = torch.randn(5, *xs.shape, generator=g, dtype=xs.dtype)
        opts: dict = {
            "integrated_gradients": {"steps": 6, "internal_batch_size": 4},
            "smoothgrad": {"n_samples": 5, "noise": noise, "internal_batch_size": 4},
        }.get(name, {})
        full = attribute(name, net, xs, None, **opts)
        for j in (0, b - 1):
            if name == "smoothgrad":
                opts = {**opts, "noise": noise[:, j : j + 1]}
            one = attribute(name, net, xs[j : j + 1], None, **opts)
            torch.testing.assert_close(one[0], full[j], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- chunking / noise


def test_ig_chunking_is_invisible(soft_net, x, t):
    ref = integrated_gradients(soft_net, x, t, steps=9, internal_batch_size=None)
    for ibs in (1, 5, 13, 1000):
        torch.testing.assert_close(integrated_gradients(soft_net, x, t, steps=9, internal_batch_size=ibs), ref)

    def grad_of(ibs):
        xg = x.clone().requires_grad_(True)
        a = integrated_gradients(soft_net, xg, t, steps=9, internal_batch_size=ibs, create_graph=True)
        (g,) = torch.autograd.grad((to_map(a) ** 2).sum(), xg)
        return a.detach(), g

    a_ref, g_ref = grad_of(None)
    for ibs in (3, 8):
        a, g = grad_of(ibs)
        torch.testing.assert_close(a, a_ref)
        torch.testing.assert_close(g, g_ref)


def test_smoothgrad_noise_is_reproducible_and_chunk_independent(soft_net, x, t):
    a = smoothgrad(soft_net, x, t, n_samples=7, seed=11, internal_batch_size=3)
    torch.testing.assert_close(a, smoothgrad(soft_net, x, t, n_samples=7, seed=11, internal_batch_size=None))
    torch.testing.assert_close(a, smoothgrad(soft_net, x, t, n_samples=7, generator=torch.Generator().manual_seed(11)))
    assert not torch.allclose(a, smoothgrad(soft_net, x, t, n_samples=7, seed=12))
    # the documented draw order: sample i is randn(x.shape) number i from the generator
    g = torch.Generator().manual_seed(11)
    noise = torch.stack([torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(7)])
    torch.testing.assert_close(a, smoothgrad(soft_net, x, t, n_samples=7, noise=noise))

    # manual average of gradients at the same noisy inputs
    def grad_at(z):
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(soft_net(z).gather(1, t[:, None]).sum(), z)[0]

    manual = torch.stack([grad_at(x + 0.15 * noise[i]) for i in range(7)]).mean(0)
    torch.testing.assert_close(a, manual)
    # sigma = 0 reduces to the plain gradient
    torch.testing.assert_close(smoothgrad(soft_net, x, t, n_samples=3, sigma=0.0), saliency(soft_net, x, t))


# ----------------------------------------------------------------------------- IG completeness


@pytest.mark.parametrize("output", ["logit", "prob"])
def test_ig_completeness_error_shrinks_with_steps(output, soft_net, x, t):
    with torch.no_grad():
        s = soft_net(x) if output == "logit" else torch.softmax(soft_net(x), 1)
        s0 = soft_net(torch.zeros_like(x)) if output == "logit" else torch.softmax(soft_net(torch.zeros_like(x)), 1)
    delta = (s - s0).gather(1, t[:, None])[:, 0]
    errs = []
    for m in (5, 50, 500):
        ig = integrated_gradients(soft_net, x, t, steps=m, output=output, internal_batch_size=None)
        errs.append(float((ig.sum((1, 2, 3)) - delta).abs().max()))
    scale = float(delta.abs().max())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.02 * errs[0] + 1e-12  # riemann_right error is O(1/m)
    assert errs[2] < 1e-2 * scale


# ----------------------------------------------------------------------------- to_map


def test_to_map_reductions_and_normalisation():
    a = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    a[1] = 0.0
    m = to_map(a)
    assert m.shape == (3, 5, 6)
    torch.testing.assert_close(m.sum((1, 2)), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert (m[1] == 0).all() and (m >= 0).all()
    torch.testing.assert_close(to_map(a, normalize=False), a.abs().sum(1))
    torch.testing.assert_close(to_map(a, "abs_mean", normalize=False), a.abs().mean(1))
    torch.testing.assert_close(to_map(a, "sum", normalize=False), a.sum(1))
    torch.testing.assert_close(to_map(a, "abs_mean"), m)  # same map up to the constant C
    signed = to_map(a, "sum")
    torch.testing.assert_close(signed.abs().sum((1, 2)), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    # differentiable, zero map gives finite (zero) gradient
    ag = a.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((to_map(ag) * torch.rand(3, 5, 6, dtype=torch.float64)).sum(), ag)
    assert torch.isfinite(g).all() and (g[1] == 0).all() and g[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_map_low_precision_normalises_in_float32(dtype):
    """A half-precision map of a 224 x 224 image has a total mass far above float16's 65504: summed in its own
    dtype the mass overflows to inf and the map silently becomes zero. It is normalised in float32 instead
    and returned in the attribution's dtype."""
    a = torch.ones(2, 3, 224, 224, dtype=dtype)
    a[1] *= 8.0
    m = to_map(a)
    assert m.dtype == dtype and torch.isfinite(m).all()
    torch.testing.assert_close(m.float().sum((1, 2)), torch.ones(2), atol=1e-2, rtol=0)
    torch.testing.assert_close(m.float(), to_map(a.float()), atol=0, rtol=0.01)
    for reduce in ("abs_mean", "sum"):
        torch.testing.assert_close(to_map(a, reduce).float(), to_map(a.float(), reduce), atol=0, rtol=0.01)


def test_to_map_non_finite_attribution_gives_nan_map_that_metrics_reject():
    a = torch.rand(2, 3, 4, 4)
    a[0, 1, 2, 2] = float("inf")
    m = to_map(a)
    assert torch.isnan(m[0, 2, 2]) and torch.isfinite(m[1]).all()  # documented: only that image's map
    from fragdefense.metrics.functional import spearman

    with pytest.raises(ValueError, match="`a` contains NaN"):
        spearman(m, m)


# ----------------------------------------------------------------------------- registry / errors


def test_registry():
    assert list_attributions() == sorted(ATTRIBUTIONS)
    assert set(list_attributions()) == {
        "saliency",
        "input_x_gradient",
        "integrated_gradients",
        "smoothgrad",
        "deeplift",
        "lrp",
        "gradcam",
    }
    assert get_attribution("saliency") is saliency
    assert [n for n in list_attributions() if supports_create_graph(n)] == sorted(CREATE_GRAPH_METHODS)
    assert not supports_create_graph("deeplift") and not supports_create_graph("lrp")
    with pytest.raises(ValueError, match="registered: deeplift, gradcam"):
        get_attribution("occlusion")
    with pytest.raises(ValueError, match="name"):
        supports_create_graph("nope")


def test_errors_name_the_argument(relu_net, soft_net, x, t):
    with pytest.raises(ValueError, match="`x`.*shape"):
        saliency(relu_net, x[0])
    with pytest.raises(TypeError, match="`x`.*floating"):
        saliency(relu_net, (x * 255).long())
    with pytest.raises(ValueError, match=r"`x`.*\[0, 1\]"):
        integrated_gradients(relu_net, x * 3)
    with pytest.raises(ValueError, match="`x`"):
        smoothgrad(relu_net, x[:0])
    with pytest.raises(TypeError, match="`x`"):
        gradcam(relu_net, x.numpy())
    with pytest.raises(ValueError, match=r"`target`.*\[0, 5\)"):
        saliency(relu_net, x, 5)
    with pytest.raises(ValueError, match="`target`"):
        integrated_gradients(relu_net, x, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match=r"`target`.*\[0, 5\)"):  # bad index in a later chunk
        integrated_gradients(relu_net, x, torch.tensor([0, 1, 2, 7]), steps=2, internal_batch_size=1)
    with pytest.raises(ValueError, match=r"`target`.*\[0, 5\)"):
        smoothgrad(relu_net, x, 9, n_samples=2)
    with pytest.raises(ValueError, match="`target`.*shape"):
        smoothgrad(relu_net, x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="`target`"):
        deeplift(relu_net, x, torch.zeros(B))
    with pytest.raises(TypeError, match="`target`"):
        gradcam(relu_net, x, True)
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribute("nope", relu_net, x)
    with pytest.raises(ValueError, match="`create_graph=True`.*'deeplift'.*saliency"):
        deeplift(relu_net, x, t, create_graph=True)
    with pytest.raises(ValueError, match="`create_graph=True`.*'lrp'"):
        attribute("lrp", relu_net, x, t, create_graph=True)
    with pytest.raises(ValueError, match="lrp.*Softplus"):
        lrp(soft_net, x, t)
    with pytest.raises(ValueError, match="`baseline`"):
        integrated_gradients(relu_net, x, t, baseline=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`method`"):
        integrated_gradients(relu_net, x, t, method="simpson")
    with pytest.raises(ValueError, match="`steps`"):
        integrated_gradients(relu_net, x, t, steps=0)
    with pytest.raises(ValueError, match="`internal_batch_size`"):
        integrated_gradients(relu_net, x, t, internal_batch_size=0)
    with pytest.raises(ValueError, match="`output`"):
        saliency(relu_net, x, t, output="softmax")
    with pytest.raises(ValueError, match="`variant`"):
        smoothgrad(relu_net, x, t, variant="sg")
    with pytest.raises(ValueError, match="`sigma`"):
        smoothgrad(relu_net, x, t, sigma=-1.0)
    with pytest.raises(ValueError, match="`generator` or `seed`"):
        smoothgrad(relu_net, x, t, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="`noise`"):
        smoothgrad(relu_net, x, t, n_samples=3, noise=torch.zeros(2, B, C, H, W))
    with pytest.raises(ValueError, match="`layer`"):
        gradcam(nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K)).double(), x)
    with pytest.raises(ValueError, match="`layer`"):
        gradcam(relu_net, x, layer="classifier")
    with pytest.raises(ValueError, match="`model`.*logits"):
        saliency(nn.Sequential(nn.Conv2d(C, 2, 1)).double(), x)
    with pytest.raises(TypeError, match="`model`"):
        saliency(lambda z: z, x)
    with pytest.raises(ValueError, match="`reduce`"):
        to_map(x, reduce="max")
    with pytest.raises(ValueError, match="`attr`"):
        to_map(x[0])
