"""Training-mode BatchNorm with the closed-form double backward (fragdefense.models.batchnorm) against the stock
layer: float64 gradcheck / gradgradcheck / third derivatives, and whole networks to 1e-10."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from fragdefense.models import create_model, double_backward_batchnorm_
from fragdefense.models.batchnorm import _BatchNormTrain
from fragdefense.regularizers import create_regularizer


def _fast(x, w, b):
    c = x.shape[1]
    rm, rv = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
    return _BatchNormTrain.apply(x, w, b, rm, rv, 0.1, 1e-5)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 3, 2), (3, 2, 2, 2, 2)], ids=["1d", "2d", "3d"])
def test_function_derivatives_of_every_order(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(True)
    w = (torch.rand(shape[1], dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    b = torch.randn(shape[1], dtype=torch.float64, generator=g).requires_grad_(True)
    assert gradcheck(_fast, (x, w, b)) and gradgradcheck(_fast, (x, w, b))

    def grads_summed(x, w, b):  # derivatives of a first backward w.r.t. all inputs: third order in total
        gx, gw, gb = torch.autograd.grad(_fast(x, w, b).sin().sum(), (x, w, b), create_graph=True)
        return (gx.pow(2).sum() + gw.pow(3).sum() + (gb * 1.7).sum()).reshape(1)

    assert gradgradcheck(grads_summed, (x, w, b))


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    net = create_model("small_cnn", num_classes=10, width=8).double().train()
    fast = copy.deepcopy(net)
    assert double_backward_batchnorm_(fast) == 5
    return net, fast


def test_network_forward_statistics_and_second_order_gradients_match_stock():
    net, fast = _pair()
    x = torch.rand(16, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    results = []
    for m in (net, fast):
        xg = x.clone().requires_grad_(True)
        logits = m(xg)
        loss = F.cross_entropy(logits, y)
        bn = m.backbone.features[4]
        gx, gw, gb = torch.autograd.grad(loss, (xg, bn.weight, bn.bias), create_graph=True)
        # input-gradient penalty plus terms on BatchNorm parameter gradients (exercises every upstream path)
        pen = gx.pow(2).sum() + gw.pow(2).sum() + 0.3 * gb.sum()
        params = list(m.parameters())
        results.append((logits.detach(), torch.autograd.grad(loss + pen, params)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-13)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    for a, b in zip(net.buffers(), fast.buffers()):  # running statistics and batch counters
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert isinstance(fast.backbone.features[1], nn.BatchNorm2d)
    assert fast.state_dict().keys() == net.state_dict().keys()


def test_eval_mode_and_unsupported_settings_are_the_stock_layer():
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    for kw in ({"momentum": None}, {"affine": False}, {"track_running_stats": False}, {}):
        stock = nn.BatchNorm2d(4, **kw).double()
        fast = copy.deepcopy(stock)
        double_backward_batchnorm_(fast)
        for mode in (True, False):
            stock.train(mode), fast.train(mode)
            torch.testing.assert_close(fast(x), stock(x), rtol=0, atol=0)
        for a, b in zip(stock.buffers(), fast.buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_second_order_regularizers_switch_batchnorm_and_others_do_not():
    for name, switched in [("input_grad", True), ("cure", True), ("ssr", True), ("pgd_at", False), ("trades", False)]:
        net = create_model("small_cnn", num_classes=10, width=4)
        net = create_regularizer(name).prepare_model(net)
        kinds = {type(m).__name__ for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
        assert kinds == ({"_DoubleBackwardBatchNorm2d"} if switched else {"BatchNorm2d"}), name


def test_bad_model_argument():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        double_backward_batchnorm_("small_cnn")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["input_grad", "cure", "ssr", "igr", "ig_norm"])
def test_regularized_step_gradients_match_stock_batchnorm(name):
    """Every second-order defense, including SSR's batched-gradient Jacobian (``is_grads_batched``), gives the
    stock layer's parameter gradients."""
    from fragdefense.regularizers import regularized_loss

    net, fast = _pair(1)
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    grads = []
    for m in (net, fast):
        torch.manual_seed(3)  # same random starts for the inner attacks
        out = regularized_loss(m, create_regularizer(name), x, y, epoch=100.0)
        grads.append(torch.autograd.grad(out.loss, list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_under_torch_func_vmap_the_stock_path_is_taken():
    """Training-mode BatchNorm with running statistics cannot be vmapped (functorch refuses the in-place update
    of unbatched buffers): the switched layer gives the stock layer's error, and eval mode works alike."""
    stock = nn.BatchNorm2d(3).double().train()
    fast = copy.deepcopy(stock)
    double_backward_batchnorm_(fast)
    x = torch.randn(4, 2, 3, 5, 5, dtype=torch.float64)  # vmapped over dim 0: 4 batches of 2
    for m in (stock, fast):
        with pytest.raises(RuntimeError, match="running_mean or running_var"):
            torch.func.vmap(m)(x)
    stock.eval(), fast.eval()
    torch.testing.assert_close(torch.func.vmap(fast)(x), torch.func.vmap(stock)(x), rtol=0, atol=1e-14)


def test_autocast_takes_the_stock_layer():
    stock = nn.BatchNorm2d(3).train()
    fast = copy.deepcopy(stock)
    double_backward_batchnorm_(fast)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = stock(x), fast(x)
    assert type(b.grad_fn).__name__ == type(a.grad_fn).__name__  # ATen's node, not _BatchNormTrain's
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lrp_and_deeplift_treat_switched_layers_as_batchnorm():
    """captum matches layer types exactly; fragdefense's wrappers accept the BatchNorm variants."""
    from fragdefense.attributions import deeplift, lrp

    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=4).double().eval()
    fast = copy.deepcopy(net)
    double_backward_batchnorm_(fast)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    for fn in (lrp, deeplift):
        torch.testing.assert_close(fn(fast, x, target=1), fn(net, x, target=1), rtol=1e-10, atol=1e-12)
