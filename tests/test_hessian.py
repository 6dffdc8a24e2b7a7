"""fragdefense.hessian against independent references: torch.autograd.functional.hessian + torch.linalg.eigvalsh
(float64), finite differences, closed forms (Gauss-Newton identity of piecewise-linear nets, one-unit softplus
net), and the statistics of the stochastic estimators (unbiasedness within their confidence bounds)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.func import functional_call

from fragdefense.hessian import (
    HessianOperator,
    eigenvalues_vs_beta,
    exact_eigen,
    exact_trace,
    fragility_vs_curvature,
    hutchinson,
    hutchpp,
    input_hessian,
    input_top_eigen,
    lanczos,
    map_change_along_directions,
    param_hessian,
    power_iteration,
    slq,
)
from fragdefense.hessian.hvp import flatten

D64 = torch.float64


def _tiny_cnn(act: nn.Module | None = None) -> nn.Module:
    """A CNN with BatchNorm (eval statistics), ~150 parameters, float64."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        act or nn.Softplus(beta=3.0),
        nn.Conv2d(3, 3, 3, padding=1),
        act or nn.Softplus(beta=3.0),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 4),
    ).double()
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def _data(b: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 2, 5, 5, generator=g, dtype=D64), torch.randint(0, 4, (b,), generator=g)


def _full_param_hessian(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat0 = flatten([p.detach() for p in net.parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(functional_call(net, ps, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0)


@pytest.fixture(scope="module")
def cnn_hessian():
    net = _tiny_cnn()
    x, y = _data()
    return net, x, y, _full_param_hessian(net, x, y)


# --- parameter Hessian -------------------------------------------------------------------------------------
def test_param_hvp_and_lanczos_match_autograd_hessian(cnn_hessian):
    net, x, y, H = cnn_hessian
    op = param_hessian(net, F.cross_entropy, (x, y))
    assert op.dim == H.shape[0] == sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(op.dense()[0], H, rtol=1e-9, atol=1e-11)
    lam = torch.linalg.eigvalsh(H)
    for which, ref in (("LA", lam.flip(0)[:3]), ("SA", lam[:3]), ("LM", lam[lam.abs().argsort(descending=True)][:3])):
        r = lanczos(op, 3, max_iter=200, tol=1e-10, which=which, generator=0)
        assert bool(r.converged.all())
        rel = ((r.eigenvalues[0] - ref).abs() / ref.abs()).max()
        assert rel <= 1e-4, (which, r.eigenvalues, ref)
        # Ritz vectors are eigenvectors: ||H v - lambda v|| small
        v = r.eigenvectors[0]
        res = (v @ H - r.eigenvalues[0, :, None] * v).norm(dim=1)
        assert float(res.max()) <= 1e-4 * float(lam.abs().max())
    assert not any(p.grad is not None for p in net.parameters())  # autograd.grad only


def test_power_iteration_matches_top_magnitude(cnn_hessian):
    net, x, y, H = cnn_hessian
    lam = torch.linalg.eigvalsh(H)
    top2 = lam[lam.abs().argsort(descending=True)][:2]
    r = power_iteration(param_hessian(net, F.cross_entropy, (x, y)), 2, max_iter=3000, tol=1e-12, generator=0)
    assert float(((r.eigenvalues[0] - top2).abs() / top2.abs()).max()) <= 1e-4


def test_dataloader_hessian_is_the_hessian_of_the_mean_loss(cnn_hessian):
    net, x, y, H = cnn_hessian
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]  # unequal batch sizes: weighted by size
    op = param_hessian(net, F.cross_entropy, dataloader=loader)
    torch.testing.assert_close(op.dense()[0], H, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="exactly one"):
        param_hessian(net, F.cross_entropy)


def test_param_hessian_uses_eval_mode_and_restores_it():
    net = _tiny_cnn().train()
    x, y = _data()
    H_eval = _full_param_hessian(net.eval(), x, y)
    net.train()
    op = param_hessian(net, F.cross_entropy, (x, y))
    assert net.training and net[1].training
    torch.testing.assert_close(op.dense()[0], H_eval, rtol=1e-9, atol=1e-11)


# --- input Hessian -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("objective", ["logit", "loss"])
def test_input_hvp_matches_finite_differences(backend, objective):
    net = _tiny_cnn()
    x, y = _data(4)
    target = torch.tensor([0, 1, 2, 3])
    op = input_hessian(net, x, target, objective=objective, y=y, backend=backend)
    v = torch.randn(4, op.dim, generator=torch.Generator().manual_seed(0), dtype=D64)

    def grad(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_(True)
        out = net(z)
        f = out.gather(1, target[:, None]).sum() if objective == "logit" else F.cross_entropy(out, y, reduction="sum")
        return torch.autograd.grad(f, z)[0].reshape(4, -1)

    h = 1e-5
    vv = v.view_as(x)
    fd = (grad(x + h * vv) - grad(x - h * vv)) / (2 * h)
    hv = op(v).detach()
    assert float((hv - fd).norm() / fd.norm()) <= 1e-6


def test_input_hessian_blocks_match_per_sample_autograd_hessian():
    net = _tiny_cnn().train()  # evaluated in eval mode (samples independent), mode restored
    x, _ = _data(3)
    op = input_hessian(net, x, target=1)
    assert net.training
    dense = op.dense()
    net.eval()
    for i in range(3):
        Hi = torch.autograd.functional.hessian(lambda z: net(z[None])[0, 1], x[i]).reshape(op.dim, op.dim)
        torch.testing.assert_close(dense[i], Hi, rtol=1e-8, atol=1e-10)


def test_input_loss_hessian_of_relu_net_is_gauss_newton():
    """docs/background.md §6: for a piecewise-linear net the input Hessian of CE is W^T (diag p - p p^T) W."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    net = net.double().eval()
    x = torch.rand(3, 3, 2, 2, dtype=D64)
    y = torch.tensor([0, 3, 4])
    dense = input_hessian(net, x, objective="loss", y=y).dense()
    for i in range(3):
        W = torch.autograd.functional.jacobian(lambda z: net(z[None])[0], x[i]).reshape(5, 12)
        p = net(x[i : i + 1]).softmax(1)[0]
        gn = W.T @ (torch.diag(p) - torch.outer(p, p)) @ W
        torch.testing.assert_close(dense[i], gn, rtol=1e-8, atol=1e-10)


def test_batched_input_lanczos_matches_eigvalsh_per_image():
    net = _tiny_cnn()
    x, _ = _data(5)
    dense = input_hessian(net, x, target=2).dense()
    lam = torch.linalg.eigvalsh(dense)  # (5, n)
    ref = lam.gather(1, lam.abs().argmax(1, keepdim=True))[:, 0]
    for compact in (True, False):
        r = lanczos(
            input_hessian(net, x, target=2), 1, which="LM", max_iter=50, tol=1e-10, generator=0, compact=compact
        )
        assert float(((r.eigenvalues[:, 0] - ref).abs() / ref.abs()).max()) <= 1e-4
    # looping over images gives the same numbers
    loop = torch.cat(
        [input_top_eigen(net, x[i : i + 1], 2, tol=1e-10, max_iter=50, generator=0).eigenvalues for i in range(5)]
    )
    torch.testing.assert_close(loop[:, 0], ref, rtol=1e-6, atol=0)


# --- Lanczos / power iteration on explicit matrices -------------------------------------------------------
def test_lanczos_degenerate_and_batched_matrices():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=D64))[0]
    spec = torch.cat([torch.full((5,), 3.0), torch.linspace(-1, 1, 35)]).to(D64)  # repeated top eigenvalue
    A = U @ torch.diag(spec) @ U.T
    B = torch.diag(torch.arange(1.0, 41.0, dtype=D64))
    op = HessianOperator.from_matrix(torch.stack([A, B]))
    r = lanczos(op, 3, max_iter=40, tol=1e-12, generator=0)
    # one Krylov space sees one copy of a repeated eigenvalue (documented): the top one is right
    assert float(r.eigenvalues[0, 0]) == pytest.approx(3.0, rel=1e-8)
    torch.testing.assert_close(r.eigenvalues[1], torch.tensor([40.0, 39.0, 38.0], dtype=D64), rtol=1e-8, atol=0)
    # deflated power iteration finds the multiplicity
    pw = power_iteration(HessianOperator.from_matrix(A), 2, max_iter=200, tol=1e-12, generator=0)
    torch.testing.assert_close(pw.eigenvalues[0], torch.full((2,), 3.0, dtype=D64), rtol=1e-6, atol=0)
    # exact with n steps: the full spectrum
    ex = exact_eigen(op, k=40)
    full = lanczos(op, 40, max_iter=40, tol=0.0, generator=1)
    torch.testing.assert_close(full.eigenvalues, ex.eigenvalues, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="which"):
        lanczos(op, 1, which="XX")
    with pytest.raises(ValueError, match="`v`"):
        op(torch.zeros(3, 40))


# --- trace ---------------------------------------------------------------------------------------------------
def _spd_like(n: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D64))[0]
    spec = torch.cat([torch.tensor([50.0, 20.0, 10.0]), torch.randn(n - 3, generator=g)]).to(D64)
    return U @ torch.diag(spec) @ U.T


@pytest.mark.parametrize("estimator", ["hutchinson", "hutchpp"])
def test_trace_estimators_unbiased_within_confidence_bounds(estimator):
    A = _spd_like()
    op = HessianOperator.from_matrix(A)
    exact = float(torch.trace(A))
    fn = hutchinson if estimator == "hutchinson" else hutchpp
    g = torch.Generator().manual_seed(0)
    ests, covered = [], 0
    for _ in range(300):
        e = fn(op, 12, generator=g)
        ests.append(float(e.estimate[0]))
        lo, hi = e.interval(1.96)
        covered += int(float(lo[0]) <= exact <= float(hi[0]))
    ests_t = torch.tensor(ests, dtype=D64)
    se = float(ests_t.std() / math.sqrt(len(ests)))
    assert abs(float(ests_t.mean()) - exact) <= 4 * se  # unbiased
    assert 0.80 <= covered / len(ests) <= 1.0  # the per-estimate intervals are calibrated (t vs normal: a bit low)


def test_hutchpp_beats_hutchinson_and_is_exact_with_enough_probes():
    A = _spd_like()
    op = HessianOperator.from_matrix(A)
    exact = float(torch.trace(A))
    g = torch.Generator().manual_seed(0)
    err_h = torch.tensor([float(hutchinson(op, 12, generator=g).estimate[0]) - exact for _ in range(200)])
    err_pp = torch.tensor([float(hutchpp(op, 12, generator=g).estimate[0]) - exact for _ in range(200)])
    assert float(err_pp.pow(2).mean()) < 0.5 * float(err_h.pow(2).mean())
    assert abs(float(hutchpp(op, 90, generator=0).estimate[0]) - exact) <= 1e-8 * abs(exact)  # Q spans R^30


def test_trace_of_network_hessian(cnn_hessian):
    net, x, y, H = cnn_hessian
    op = param_hessian(net, F.cross_entropy, (x, y))
    exact = float(torch.trace(H))
    assert abs(float(exact_trace(op)[0]) - exact) <= 1e-9 * abs(exact)
    e = hutchinson(op, 200, generator=0)
    assert abs(float(e.estimate[0]) - exact) <= 5 * float(e.std_error[0])


# --- SLQ density ---------------------------------------------------------------------------------------------
def test_slq_density_integrates_to_one_and_matches_spectrum(cnn_hessian):
    net, x, y, H = cnn_hessian
    op = param_hessian(net, F.cross_entropy, (x, y))
    sd = slq(op, 30, 3, generator=0)
    torch.testing.assert_close(sd.weights.sum(2), torch.ones(1, 3, dtype=D64), rtol=1e-10, atol=1e-10)
    grid, dens = sd.grid(4000)
    assert abs(float(torch.trapezoid(dens[0], grid)) - 1.0) <= 1e-3
    lam = torch.linalg.eigvalsh(H)
    # Ritz values of SLQ lie inside the spectrum, and its extreme nodes converge to the extreme eigenvalues
    assert float(sd.nodes.max()) <= float(lam.max()) * (1 + 1e-9) and float(sd.nodes.min()) >= float(lam.min()) - 1e-9
    assert abs(float(sd.nodes.max()) - float(lam.max())) <= 1e-4 * float(lam.abs().max())
    # with n steps the nodes are exactly the eigenvalues
    n = op.dim
    full = slq(op, n, 1, generator=1)
    torch.testing.assert_close(full.nodes[0, 0], lam, rtol=1e-6, atol=1e-9 * float(lam.abs().max()))


def test_slq_trace_unbiased_within_confidence_bound():
    A = _spd_like()
    op = HessianOperator.from_matrix(A)
    sd = slq(op, 10, 200, generator=0)
    per_run = A.shape[0] * (sd.weights * sd.nodes).sum(2)[0]  # = v^T A v for normalised Rademacher v, times n
    se = float(per_run.std() / math.sqrt(per_run.numel()))
    assert abs(float(per_run.mean()) - float(torch.trace(A))) <= 4 * se


# --- probes ----------------------------------------------------------------------------------------------------
def test_eigenvalues_vs_beta_closed_form():
    """f(x) = a relu(w.x + b): softplus_beta surrogate Hessian = a beta s(1 - s) w w^T, s = sigmoid(beta z)."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 1)
    out = nn.Linear(1, 2)
    with torch.no_grad():
        out.weight.copy_(torch.tensor([[1.5], [-0.5]]))
        out.bias.zero_()
    net = nn.Sequential(nn.Flatten(), lin, nn.ReLU(), out).double().eval()
    x = torch.rand(3, 3, 2, 2, dtype=D64)
    betas = (1.0, 4.0, 16.0)
    res = eigenvalues_vs_beta(net, x, betas, target=torch.zeros(3, dtype=torch.long), tol=1e-12, max_iter=12)
    w = lin.weight.detach().double()[0]
    z = x.flatten(1) @ w + lin.bias.detach().double()
    for bi, b in enumerate(betas):
        s = torch.sigmoid(b * z)
        ref = 1.5 * b * s * (1 - s) * w.pow(2).sum()
        torch.testing.assert_close(torch.tensor(res["eigenvalues"][bi], dtype=D64), ref, rtol=1e-6, atol=1e-12)


def test_map_change_top_eigenvector_dominates_random_directions_to_first_order():
    net = _tiny_cnn(nn.ReLU())  # a ReLU net: the probe uses its softplus surrogate
    x, _ = _data(4)
    x = x.clamp(0, 1)
    r = 1e-4
    p = map_change_along_directions(
        net, x, beta=5.0, radii=(r,), n_random=6, topk=5, tol=1e-10, max_iter=60, generator=0
    )
    gc = p.metrics["grad_change"][:, :, 0]  # (B, 2 + 6)
    # first order: ||g(x + r v) - g(x)|| = r |lambda_max|, and any unit d gives r ||H d|| <= r |lambda_max|
    pred = r * p.eigenvalues[:, 0].abs() / p.grad_norm
    torch.testing.assert_close(gc[:, 0], pred, rtol=1e-2, atol=0)
    assert bool((gc[:, :2].amin(1) >= gc[:, 2:].amax(1) * (1 - 1e-3)).all())
    s = p.summary()
    assert s["per_radius"][0]["grad_change_ratio"] > 1.0 and p.kinds[:2] == ["eig1+", "eig1-"]
    assert bool((p.metrics["label_kept"] == 1).all())


def test_fragility_vs_curvature_records_and_correlation():
    from fragdefense.models import create_model

    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=4).eval()
    x = torch.rand(6, 3, 8, 8)
    y = net(x).argmax(1)
    y[0] = (y[0] + 1) % 10  # one misclassified image is skipped
    out = fragility_vs_curvature(net, x, y, beta=10.0, attack={"steps": 3, "k": 10, "step_size": 2 / 255})
    assert out["n_attacked"] == 5 and out["n_skipped"] == 1 and 0 not in out["image_index"]
    assert len(out["lambda_max"]) == len(out["topk_intersection"]) == 5
    rho = stats.spearmanr([abs(v) for v in out["lambda_max"]], out["topk_intersection"]).statistic
    assert out["spearman_abs_lambda_vs_topk"] == pytest.approx(rho, abs=1e-9, nan_ok=True)
    # lambda_max is that of the surrogate's input Hessian of the predicted logit
    from fragdefense.models import to_softplus

    soft = to_softplus(net, 10.0).eval()
    lam = torch.linalg.eigvalsh(input_hessian(soft, x[1:2], y[1:2]).dense().double())
    assert abs(out["lambda_max"][0]) == pytest.approx(float(lam.abs().max()), rel=1e-2)
