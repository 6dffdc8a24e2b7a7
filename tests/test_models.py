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
