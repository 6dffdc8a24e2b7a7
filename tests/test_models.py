"""Model registry, ImageClassifier wrapper, softplus surrogate, local weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fragdefense.models import count_relus, create_model, list_models, set_softplus_beta, to_softplus

SIZES = {"alexnet": 64}


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.rand(2, 3, SIZES.get(name, 32), SIZES.get(name, 32), requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())


def test_unknown_model_and_bad_args():
    with pytest.raises(ValueError, match="unknown model `name`='nope'"):
        create_model("nope")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("small_cnn", num_classes=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        create_model("small_cnn")(torch.rand(2, 1, 8, 8))


def test_torchvision_any_name():
    m = create_model("torchvision.mobilenet_v3_small", num_classes=3).eval()
    assert m(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_normalisation_inside_model():
    m = create_model("small_cnn", num_classes=3, mean=(0.2, 0.3, 0.4), std=(0.5, 0.5, 0.5)).eval()
    x = torch.rand(2, 3, 16, 16)
    ref = m.backbone((x - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / 0.5)
    torch.testing.assert_close(m(x), ref)


def test_softplus_copy_shares_parameters_and_converges():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=4, width=8).eval()
    soft = to_softplus(model, beta=1.0).eval()
    assert count_relus(model) > 0 and count_relus(soft) == 0
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), soft.named_parameters()):
        assert n1 == n2 and p1 is p2
    for b1, b2 in zip(model.buffers(), soft.buffers()):
        assert b1 is b2
    with torch.no_grad():
        model.backbone.head.weight.add_(1.0)  # an update to the original is seen by the copy
    assert torch.equal(soft.backbone.head.weight, model.backbone.head.weight)
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        errs = []
        for beta in (1.0, 10.0, 100.0, 1000.0):
            set_softplus_beta(soft, beta)
            errs.append(float((soft(x) - ref).abs().max()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-2 * max(1.0, float(ref.abs().max()))


def test_softplus_gives_nonzero_second_derivative():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(3, 5)
    for model, expect_zero in ((net, True), (to_softplus(net, 5.0), False)):
        h = torch.autograd.functional.hessian(lambda z, m=model: m(z).sum(), x)
        assert (float(h.abs().max()) == 0.0) == expect_zero


def test_softplus_bad_beta():
    with pytest.raises(ValueError, match="`beta`"):
        to_softplus(nn.ReLU(), beta=0)
    with pytest.warns(UserWarning, match="no nn.ReLU"):
        to_softplus(nn.Linear(2, 2), beta=1)


def test_weights_path_roundtrip_and_mismatch(tmp_path):
    m = create_model("small_cnn", num_classes=5, width=8)
    torch.save(m.state_dict(), tmp_path / "full.pt")
    torch.save(m.backbone.state_dict(), tmp_path / "backbone.pt")
    x = torch.rand(2, 3, 16, 16)
    for f in ("full.pt", "backbone.pt"):
        m2 = create_model("small_cnn", num_classes=5, width=8, weights_path=tmp_path / f).eval()
        torch.testing.assert_close(m2(x), m.eval()(x))
    with pytest.raises(ValueError, match="does not match model 'small_cnn'"):
        create_model("small_cnn", num_classes=3, width=8, weights_path=tmp_path / "full.pt")
    with pytest.raises(FileNotFoundError, match="weights_path"):
        create_model("small_cnn", weights_path=tmp_path / "absent.pt")


# ------------------------------------------------------------------------------------------------------------
# the surrogate's cheap second derivative (softplus) and eval-mode BatchNorm: same numbers as the stock layers
# ------------------------------------------------------------------------------------------------------------


def _stock_surrogate(model: nn.Module, beta: float) -> nn.Module:
    """Reference: ``model`` with every ReLU replaced by ``nn.Softplus(beta, 20)`` and stock BatchNorm."""
    import copy

    ref = copy.deepcopy(model)

    def swap(m: nn.Module) -> None:
        for name, child in m.named_children():
            if isinstance(child, nn.ReLU):
                setattr(m, name, nn.Softplus(beta=beta, threshold=20.0))
            else:
                swap(child)

    swap(ref)
    return ref


@pytest.mark.parametrize("beta", [1.0, 10.0, 50.0])
def test_fast_softplus_values_and_derivatives_match_aten(beta):
    from torch.autograd import gradcheck, gradgradcheck

    from fragdefense.models.softplus import _Softplus

    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, dtype=torch.float64, generator=g) * 30 / beta
    z[:3] = torch.tensor([20.0 / beta * 1.001, 20.0 / beta * 0.999, -25.0 / beta])  # both sides of the threshold
    z.requires_grad_(True)
    fast, stock = _Softplus(beta), nn.Softplus(beta=beta, threshold=20.0)
    assert torch.equal(fast(z), stock(z))
    assert gradcheck(fast, (z,)) and gradgradcheck(fast, (z,))
    g1, g2 = (torch.autograd.grad(m(z).sum(), z, create_graph=True)[0] for m in (fast, stock))
    torch.testing.assert_close(g1, g2, rtol=1e-14, atol=1e-300)
    v = torch.randn(64, dtype=torch.float64, generator=g)
    h1, h2 = (torch.autograd.grad(gr, z, v)[0] for gr in (g1, g2))
    torch.testing.assert_close(h1, h2, rtol=1e-12, atol=1e-300)
    # first order without a graph of the gradient: ATen's fused backward, identical
    assert torch.equal(torch.autograd.grad(fast(z).sum(), z)[0], torch.autograd.grad(stock(z).sum(), z)[0])
    # third derivatives and autograd.functional.hvp (double-backward trick) are exact too
    third = []
    for m in (fast, stock):
        (gr,) = torch.autograd.grad(m(z).sum(), z, create_graph=True)
        (h,) = torch.autograd.grad(gr, z, v, create_graph=True)
        third.append(torch.autograd.grad(h.sum(), z)[0])
    assert third[1].abs().max() > 0
    torch.testing.assert_close(third[0], third[1], rtol=1e-12, atol=1e-300)
    hvp = [torch.autograd.functional.hvp(lambda t, m=m: m(t).sum(), z.detach(), v)[1] for m in (fast, stock)]
    assert hvp[1].abs().max() > 0
    torch.testing.assert_close(hvp[0], hvp[1], rtol=1e-12, atol=1e-300)


def test_surrogate_input_hessian_products_and_batchnorm_match_the_stock_layers():
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=8).double()
    net.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            net(torch.rand(32, 3, 32, 32, dtype=torch.float64))
    net.eval()
    soft, ref = to_softplus(net, 10.0).eval(), _stock_surrogate(net, 10.0).eval()
    assert isinstance(soft.backbone.features[1], nn.BatchNorm2d)  # still a BatchNorm (state dict, isinstance)
    assert type(soft.backbone.features[1]) is not nn.BatchNorm2d
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(soft(x), ref(x), rtol=1e-12, atol=1e-14)
    v = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    hv = []
    for m in (soft, ref):
        (g,) = torch.autograd.grad(m(x)[:, 3].sum(), x, create_graph=True)
        hv.append(torch.autograd.grad(g, x, v)[0])
    assert hv[0].abs().max() > 0
    torch.testing.assert_close(hv[0], hv[1], rtol=1e-10, atol=1e-12)
    # training mode is the stock BatchNorm: same output and same running-statistics update
    soft.train(), ref.train()
    xb = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    before = net.backbone.features[1].running_mean.clone()
    out_soft = soft(xb)
    after_soft = net.backbone.features[1].running_mean.clone()  # shared buffer
    net.backbone.features[1].running_mean.copy_(before)
    out_ref = ref(xb)
    torch.testing.assert_close(out_soft, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(after_soft, ref.backbone.features[1].running_mean, rtol=0, atol=0)


def test_surrogate_of_a_model_with_double_backward_batchnorm_uses_the_eval_affine_layer():
    from fragdefense.models import double_backward_batchnorm_

    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=4).double()
    double_backward_batchnorm_(net)
    net.eval()
    soft = to_softplus(net, 10.0).eval()
    assert type(soft.backbone.features[1]).__name__ == "_EvalAffineBatchNorm2d"
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(soft(x), _stock_surrogate(net, 10.0).eval()(x), rtol=1e-12, atol=1e-14)


def test_fast_softplus_under_torch_func_and_batched_gradients_matches_stock():
    """Per-sample gradients (``vmap(grad)``, influence functions), ``jvp(grad)`` (input Hessians, backend
    "func") and ``is_grads_batched`` Jacobians with a graph (SSR, ART) give ``nn.Softplus``'s numbers."""
    import copy

    from fragdefense.models.softplus import _Softplus

    torch.manual_seed(0)
    fast = nn.Sequential(nn.Linear(4, 8), _Softplus(5.0), nn.Linear(8, 3)).double()
    stock = copy.deepcopy(fast)
    stock[1] = nn.Softplus(5.0, 20.0)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))

    def per_sample(net):
        def loss(p, xi, yi):
            return nn.functional.cross_entropy(torch.func.functional_call(net, p, (xi[None],)), yi[None])

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(dict(net.named_parameters()), x, y)

    a, b = per_sample(fast), per_sample(stock)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)

    v = torch.randn_like(x)
    hv = [torch.func.jvp(torch.func.grad(lambda z, m=m: m(z)[:, 0].sum()), (x,), (v,))[1] for m in (fast, stock)]
    torch.testing.assert_close(hv[0], hv[1], rtol=1e-12, atol=1e-14)

    def jacobian_penalty_grads(net):
        xg = x.clone().requires_grad_(True)
        eye = torch.eye(3, dtype=torch.float64)[:, None, :].expand(3, 6, 3)
        (jac,) = torch.autograd.grad(net(xg), xg, grad_outputs=eye, is_grads_batched=True, create_graph=True)
        return torch.autograd.grad(jac.pow(2).sum(), [net[0].weight, net[2].weight])

    for g1, g2 in zip(jacobian_penalty_grads(fast), jacobian_penalty_grads(stock)):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
