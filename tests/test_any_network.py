"""Attacks on any network: the function-level softplus surrogate, models without ReLU, tuple outputs, user
explainers (callables, captum objects) and registries extended from outside the package."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fragdefense.attacks import (
    attack_interpretation,
    get_attack,
    list_attacks,
    register_attack,
    unregister_attack,
)
from fragdefense.attributions import attribute, register_attribution, resolve_attribution, to_map
from fragdefense.attributions import saliency as saliency_fn
from fragdefense.attributions.registry import unregister_attribution
from fragdefense.metrics.registry import get_metric, list_metrics, register_metric, unregister_metric
from fragdefense.models import softplus_surrogate, to_softplus


class ModuleNet(nn.Module):
    """Conv + BatchNorm + ReLU modules."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.act(self.bn(self.c1(x)))
        z = self.act2(self.c2(z))
        return self.fc(z.mean((2, 3)))


class FunctionalNet(ModuleNet):
    """The same network written with functional ReLU calls (torch.relu, F.relu in place, Tensor.relu)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.bn(self.c1(x)))
        z = F.relu(self.c2(z), inplace=True)
        return self.fc(z.relu().mean((2, 3)))


class FunctionalNetNoDoubleRelu(ModuleNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.bn(self.c1(x)))
        z = F.relu(self.c2(z), inplace=True)
        return self.fc(z.mean((2, 3)))


def _twin_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    a = ModuleNet()
    with torch.no_grad():  # non-trivial running statistics
        a.bn.running_mean.uniform_(-0.2, 0.2)
        a.bn.running_var.uniform_(0.5, 1.5)
    b = FunctionalNetNoDoubleRelu()
    b.load_state_dict(a.state_dict())
    return a.eval(), b.eval()


def test_surrogate_smooths_functional_relu_like_modules():
    a, b = _twin_models()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    a, b = a.double(), b.double()
    sa, sb, swap = softplus_surrogate(a, 5.0), softplus_surrogate(b, 5.0), to_softplus(a, 5.0).eval()
    torch.testing.assert_close(sa(x), swap(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(sb(x), swap(x), rtol=0, atol=1e-12)
    assert sb.n_relu_calls == 2 and sa.n_relu_calls == 2
    # the surrogate differs from the ReLU network (it is smoothed), and its saliency is not piecewise constant
    assert (sb(x) - b(x)).abs().max() > 1e-4
    xg = x.clone().requires_grad_(True)
    m = to_map(attribute("saliency", sb, xg, 0, create_graph=True))
    (g,) = torch.autograd.grad(m[:, :2, :2].sum(), xg)
    assert g.abs().amax() > 0
    # parameters are shared, not copied
    assert sb.model.c1.weight is b.c1.weight
    assert {id(p) for p in sb.parameters()} == {id(p) for p in b.parameters()}


def test_surrogate_second_derivatives_match_autograd_hessian():
    """Exact second derivatives through the mode's softplus and affine batch norm (float64)."""
    _, b = _twin_models(1)
    b = b.double()
    soft = softplus_surrogate(b, 3.0)
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return soft(z)[0, 2]

    ref = torch.autograd.functional.hessian(f, x)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xg), xg, create_graph=True)
    v = torch.randn_like(x)
    (hv,) = torch.autograd.grad((g * v).sum(), xg)
    torch.testing.assert_close(hv, (ref.reshape(x.numel(), x.numel()) @ v.flatten()).view_as(x), rtol=1e-9, atol=1e-9)


def test_functional_relu_model_attacked_like_module_model():
    """The same network written with torch.relu / F.relu and with nn.ReLU gives the same attack result."""
    a, b = _twin_models(2)
    x = torch.rand(6, 3, 12, 12)
    kw = dict(attack="topk", eps="8/255", steps=4, k=20, beta=10.0)
    ra = attack_interpretation(a, x, **kw)
    rb = attack_interpretation(b, x, **kw)
    assert ra.perturbed.all() and rb.perturbed.all()
    assert not rb.zero_gradient.any()
    torch.testing.assert_close(rb.x_adv, ra.x_adv, rtol=0, atol=1e-6)
    for key in ra.metrics:
        torch.testing.assert_close(rb.metrics[key], ra.metrics[key], rtol=0, atol=1e-5)
    assert rb.metrics["topk_intersection"].mean() < 1.0  # the functional model's map really moved


def test_module_swap_surrogate_misses_functional_relu_but_function_level_does_not():
    _, b = _twin_models(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swap = to_softplus(b, 10.0)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    m = to_map(attribute("saliency", swap, x, 0, create_graph=True))
    loss = m[:, :3, :3].sum()
    g = torch.autograd.grad(loss, x, allow_unused=True)[0] if loss.requires_grad else None
    assert g is None or g.abs().amax() == 0  # module surgery: the functional ReLUs stay, the map is flat in x
    m2 = to_map(attribute("saliency", softplus_surrogate(b, 10.0), x, 0, create_graph=True))
    (g2,) = torch.autograd.grad(m2[:, :3, :3].sum(), x)
    assert g2.abs().amax() > 0


def test_linear_model_zero_gradient_is_reported_not_robustness():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(3, 3, 8, 8) * 0.8 + 0.1
    with pytest.warns(RuntimeWarning) as rec:
        res = attack_interpretation(lin, x, attack="topk", eps="8/255", steps=3, k=10)
    msgs = " ".join(str(w.message) for w in rec)
    assert "calls no ReLU" in msgs and "identically zero" in msgs
    assert res.zero_gradient.all()
    assert not res.perturbed.any()  # never claimed as a perturbed image
    s = res.summary()
    assert s["zero_gradient_rate"] == 1.0 and s["warnings"]


def test_gelu_model_says_which_activations_it_found():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x = torch.rand(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match=r"activations found: gelu x1"):
        res = attack_interpretation(net, x, attack="topk", eps="8/255", steps=2, k=10)
    assert not res.zero_gradient.any()  # GELU is smooth: the ascent on the model itself works


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = ModuleNet()

    def forward(self, x: torch.Tensor):
        z = self.net(x)
        return z, {"aux": z.detach()}


def test_tuple_output_needs_output_fn():
    torch.manual_seed(0)
    net = TupleNet().eval()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(TypeError, match="output_fn"):
        attack_interpretation(net, x, attack="topk", steps=2, k=5)
    res = attack_interpretation(net, x, attack="topk", steps=2, k=5, output_fn=0)
    ref = attack_interpretation(net.net, x, attack="topk", steps=2, k=5)
    torch.testing.assert_close(res.x_adv, ref.x_adv)
    res2 = attack_interpretation(net, x, attack="random_sign", k=5, output_fn=lambda out: out[0], generator=0)
    assert res2.n_attacked == 2


def test_callable_and_captum_explainers():
    from captum.attr import IntegratedGradients, Saliency

    torch.manual_seed(0)
    net = ModuleNet().eval()
    x = torch.rand(3, 3, 8, 8)
    t = net(x).argmax(1)
    # captum object: same map as the registered method
    cap = resolve_attribution(Saliency(net))
    torch.testing.assert_close(cap(net, x, t, abs=False), saliency_fn(net, x, t), rtol=1e-5, atol=1e-7)
    ig = resolve_attribution(IntegratedGradients(net))
    assert ig(net, x, t, n_steps=8).shape == x.shape
    # a captum object is not differentiable: gradient attacks need a surrogate; random attacks run on it
    with pytest.raises(ValueError, match="does not support create_graph"):
        attack_interpretation(net, x, method=Saliency(net), attack="topk", steps=2, k=5)
    r = attack_interpretation(net, x, method=Saliency(net), attack="random_walk", steps=2, k=5, generator=0)
    assert r.protocol["method"] == "captum.Saliency" and r.n_attacked == 3
    r2 = attack_interpretation(net, x, method=Saliency(net), surrogate="saliency", attack="topk", steps=2, k=5)
    assert r2.perturbed.any()

    # a differentiable callable (takes create_graph) is attacked by gradient
    def grad_times_two(model, x, target, create_graph=False):
        return 2 * saliency_fn(model, x, target, create_graph=create_graph)

    r3 = attack_interpretation(net, x, method=grad_times_two, attack="topk", steps=3, k=5, beta=5.0)
    r4 = attack_interpretation(net, x, method="saliency", attack="topk", steps=3, k=5, beta=5.0)
    torch.testing.assert_close(r3.x_adv, r4.x_adv)  # to_map normalises away the factor 2

    # a plain callable without create_graph: random attacks only
    def plain(model, x, target):
        return saliency_fn(model, x, target)

    with pytest.raises(ValueError, match="create_graph"):
        attack_interpretation(net, x, method=plain, attack="topk", steps=1, k=5)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        resolve_attribution(lambda m, x, t: x.sum((1, 2, 3)))(net, x, t)


def test_registries_extended_from_outside():
    @register_attack("bottom_mass_test", criterion="dissimilarity")
    def bottom_mass(m, ctx):
        return (m * (1 - ctx.topk_mask)).sum((1, 2))

    @register_attribution("grad_sq_test", create_graph=True)
    def grad_sq(model, x, target=None, *, create_graph=False):
        return saliency_fn(model, x, target, create_graph=create_graph) ** 2

    @register_metric("l1_test", label="L1 map distance", similarity=False)
    def l1(adv, clean, opts):
        return (adv - clean).abs().flatten(1).sum(1)

    try:
        assert "bottom_mass_test" in list_attacks(needs_gradient=True)
        assert get_attack("bottom_mass_test").criterion == "dissimilarity"
        assert "l1_test" in list_metrics(report=True)
        torch.manual_seed(0)
        net = ModuleNet().eval()
        x = torch.rand(2, 3, 8, 8)
        res = attack_interpretation(net, x, attack="bottom_mass_test", method="grad_sq_test", steps=3, k=5)
        assert "l1_test" in res.metrics and res.perturbed.all()
        assert (res.metrics["l1_test"] > 0).all()
        assert get_metric("l1_test").label == "L1 map distance"
    finally:
        unregister_attack("bottom_mass_test")
        unregister_attribution("grad_sq_test")
        unregister_metric("l1_test")
    assert "bottom_mass_test" not in list_attacks()


def test_budget_strings_and_default_step_size():
    torch.manual_seed(0)
    net = ModuleNet().eval()
    x = torch.rand(2, 3, 8, 8)
    a = attack_interpretation(net, x, attack="topk", eps="8/255", steps=4, k=5)
    b = attack_interpretation(net, x, attack="topk", eps=8 / 255, steps=4, k=5)
    torch.testing.assert_close(a.x_adv, b.x_adv, rtol=0, atol=0)
    assert a.protocol["step_size"] == pytest.approx(2.5 * (8 / 255) / 4)
    with pytest.raises(ValueError, match="eps"):
        attack_interpretation(net, x, eps="eight", steps=1)
    with pytest.raises(ValueError, match=r"`y` must hold class labels in \[0, 4\]"):
        attack_interpretation(net, x, torch.tensor([0, 5]), steps=1, k=5)
