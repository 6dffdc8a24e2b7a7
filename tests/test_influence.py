"""fragdefense.influence: closed forms (linear / logistic regression, float64), solvers against the exact
inverse, leave-one-out retraining, per-sample gradients against a loop, the attack, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from fragdefense.influence import (
    LastLayerInfluence,
    ParameterInfluence,
    arnoldi,
    attack_influence,
    conjugate_gradient,
    feature_extractor,
    fit_linear_head,
    influence_scores,
    lissa,
    solve_exact,
)

D64 = torch.float64


def _mse(out, y):
    return 0.5 * (out[:, 0] - y) ** 2


def _bce(out, y):
    return F.binary_cross_entropy_with_logits(out[:, 0], y.to(out.dtype), reduction="none")


def _logistic_data(n=80, d=4, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d))
    w = g.normal(size=d)
    y = (x @ w + 0.8 * g.normal(size=n) > 0).astype(np.int64)
    return x, y


def _logistic_closed_form(x, y, theta, lam, xt, yt):
    """numpy: I = -g_t^T H^-1 g_j for L2-regularised logistic regression with a bias (last column of theta)."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    xta = np.hstack([xt, np.ones((len(xt), 1))])
    p = 1 / (1 + np.exp(-xa @ theta))
    pt = 1 / (1 + np.exp(-xta @ theta))
    h = (xa * (p * (1 - p))[:, None]).T @ xa / len(x) + lam * np.eye(xa.shape[1])
    g = xa * (p - y)[:, None]
    gt = xta * (pt - yt)[:, None]
    return -gt @ np.linalg.inv(h) @ g.T, -np.einsum("nd,de,ne->n", g, np.linalg.inv(h), g), h


# --- closed forms -------------------------------------------------------------------------------------------
def test_linear_regression_closed_form():
    g = np.random.default_rng(1)
    x = g.normal(size=(50, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 * g.normal(size=50)
    theta = np.linalg.solve(x.T @ x, x.T @ y)  # least squares optimum
    net = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(theta)[None])
    xt, yt = g.normal(size=(4, 3)), g.normal(size=4)
    gj = x * (x @ theta - y)[:, None]
    gt = xt * (xt @ theta - yt)[:, None]
    expected = -gt @ np.linalg.inv(x.T @ x / len(x)) @ gj.T
    X, Y, XT, YT = (torch.from_numpy(a) for a in (x, y, xt, yt))
    for solver in ("exact", "cg"):
        inf = ParameterInfluence(net, loss_fn=_mse, solver=solver).fit(X, Y)
        np.testing.assert_allclose(inf.influence(XT, YT).numpy(), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(inf.hessian().numpy(), x.T @ x / len(x), rtol=1e-12)


def test_logistic_regression_closed_form_last_layer_and_params():
    x, y = _logistic_data()
    lam = 0.05
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    w, b = fit_linear_head(X, Y, num_classes=2, binary=True, l2=lam)
    theta = torch.cat([w[0], b]).numpy()
    # the optimum: gradient of the regularised objective vanishes
    p = 1 / (1 + np.exp(-(x @ theta[:-1] + theta[-1])))
    grad = np.hstack([x, np.ones((len(x), 1))]).T @ (p - y) / len(x) + lam * theta
    assert np.abs(grad).max() < 1e-10
    xt, yt = x[:5] + 0.1, y[:5]
    expected, expected_self, h = _logistic_closed_form(x, y, theta, lam, xt, yt)
    inf = LastLayerInfluence(w, b, l2=lam).fit(X, Y)
    np.testing.assert_allclose(inf.hessian.numpy(), h, rtol=1e-12, atol=1e-14)
    got = inf.influence(torch.from_numpy(xt), torch.from_numpy(yt))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(inf.self_influence().numpy(), expected_self, rtol=1e-9)
    # the generic torch.func path on an nn.Linear(D, 1) with the BCE loss
    net = nn.Linear(4, 1).double()
    with torch.no_grad():
        net.weight.copy_(w)
        net.bias.copy_(b)
    pinf = ParameterInfluence(net, loss_fn=_bce, l2=lam, solver="exact").fit(X, Y)
    np.testing.assert_allclose(pinf.influence(torch.from_numpy(xt), torch.from_numpy(yt)).numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(pinf.self_influence().numpy(), expected_self, rtol=1e-9)


def test_softmax_head_matches_autodiff_hessian_and_generic_path():
    torch.manual_seed(0)
    phi, y = torch.randn(40, 3, dtype=D64), torch.randint(0, 4, (40,))
    w, b = torch.randn(4, 3, dtype=D64), torch.randn(4, dtype=D64)
    inf = LastLayerInfluence(w, b, damping=1e-2).fit(phi, y)

    def mean_loss(theta):
        t = theta.reshape(4, 4)
        return F.cross_entropy(phi @ t[:, :3].T + t[:, 3], y)

    h_ref = torch.autograd.functional.hessian(mean_loss, inf.theta.reshape(-1))
    torch.testing.assert_close(inf.hessian, h_ref + 1e-2 * torch.eye(16, dtype=D64), rtol=1e-10, atol=1e-12)
    net = nn.Linear(3, 4).double()
    with torch.no_grad():
        net.weight.copy_(w)
        net.bias.copy_(b)
    pinf = ParameterInfluence(net, damping=1e-2, solver="exact").fit(phi, y)
    torch.testing.assert_close(inf.influence(phi[:6], y[:6]), pinf.influence(phi[:6], y[:6]), rtol=1e-9, atol=1e-12)
    # the factored path equals the materialised gradients, and train_index gathers the same entries
    g = inf.gradients(phi, y)
    full = -(inf.inverse_hvp(g[:6]) @ g.T)
    torch.testing.assert_close(inf.influence(phi[:6], y[:6]), full, rtol=1e-10, atol=1e-12)
    small = LastLayerInfluence(w, b, damping=1e-2, chunk_size=7).fit(phi, y)  # blocks of 7 training points
    torch.testing.assert_close(small.hessian, inf.hessian, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(small.influence(phi[:6], y[:6]), full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(small.self_influence(), -(inf.inverse_hvp(g) * g).sum(1), rtol=1e-10, atol=1e-12)
    idx = torch.randint(0, 40, (6, 3))
    torch.testing.assert_close(inf.influence(phi[:6], y[:6], train_index=idx), full.gather(1, idx))


# --- solvers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(120, 5, dtype=D64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, x, y


@pytest.mark.parametrize(
    "solver,opts",
    [
        ("cg", {}),
        ("lissa", {"depth": 3000, "tol": 1e-12}),
        ("arnoldi", {"n_iter": 57, "rank": 57}),
    ],
)
def test_solvers_agree_with_exact(small_mlp, solver, opts):
    net, x, y = small_mlp
    exact = ParameterInfluence(net, damping=0.05, solver="exact").fit(x, y)
    assert exact.num_params == 57
    ref = exact.influence(x[:8], y[:8])
    inf = ParameterInfluence(net, damping=0.05, solver=solver, solver_opts=opts).fit(x, y)
    got = inf.influence(x[:8], y[:8])
    rho = scipy.stats.spearmanr(ref.reshape(-1).numpy(), got.reshape(-1).numpy()).statistic
    assert rho >= 0.99, f"{solver} {opts}: rank correlation {rho:.4f} with the exact solution"
    per_test = [scipy.stats.spearmanr(a, b).statistic for a, b in zip(ref.numpy(), got.numpy())]
    assert min(per_test) >= 0.95
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)  # the values, not just the ranks


def test_low_rank_arnoldi_improves_with_rank(small_mlp):
    net, x, y = small_mlp
    ref = ParameterInfluence(net, damping=0.05, solver="exact").fit(x, y).influence(x[:8], y[:8]).reshape(-1)
    rhos = []
    for rank in (5, 20, 40):
        inf = ParameterInfluence(net, damping=0.05, solver="arnoldi", solver_opts={"n_iter": 57, "rank": rank})
        got = inf.fit(x, y).influence(x[:8], y[:8]).reshape(-1)
        rhos.append(scipy.stats.spearmanr(ref.numpy(), got.numpy()).statistic)
    assert rhos[0] < rhos[1] < rhos[2] and rhos[2] >= 0.97, rhos


def test_arnoldi_eigenvalues_and_solver_functions():
    torch.manual_seed(0)
    a = torch.randn(30, 30, dtype=D64)
    h = a @ a.T / 30 + 0.1 * torch.eye(30, dtype=D64)
    ev = torch.linalg.eigvalsh(h).flip(0)
    vals, vecs = arnoldi(lambda v: v @ h, 30, n_iter=30, rank=5)
    torch.testing.assert_close(vals, ev[:5], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(5, dtype=D64), atol=1e-8, rtol=0)
    b = torch.randn(3, 30, dtype=D64)
    ref = b @ torch.linalg.inv(h)
    torch.testing.assert_close(solve_exact(h, b), ref)
    torch.testing.assert_close(conjugate_gradient(lambda v: v @ h, b, tol=1e-12), ref, rtol=1e-7, atol=1e-9)
    scale = 1.1 * float(ev[0])
    torch.testing.assert_close(lissa(lambda v: v @ h, b, scale=scale, depth=4000), ref, rtol=1e-6, atol=1e-8)


def test_per_sample_gradients_match_a_loop_on_a_conv_net_with_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    net(torch.randn(16, 3, 8, 8))  # BatchNorm running statistics move away from the defaults
    net.train()
    x, y = torch.randn(7, 3, 8, 8), torch.randint(0, 3, (7,))
    inf = ParameterInfluence(net, params=["0", "5.weight"], chunk_size=3)
    got = inf.per_sample_gradients(x, y)
    assert net.training  # the train flag is restored
    net.eval()
    ref = []
    for i in range(7):
        ps = [net[0].weight, net[0].bias, net[5].weight]
        gs = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), ps)
        ref.append(torch.cat([g.reshape(-1) for g in gs]))
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-5, atol=1e-6)


# --- leave-one-out retraining ---------------------------------------------------------------------------------
def test_leave_one_out_retraining_correlates_with_predicted_influence():
    x, y = _logistic_data(n=60, d=3, seed=3)
    lam, n = 0.05, 60
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    w, b = fit_linear_head(X, Y, num_classes=2, binary=True, l2=lam)
    theta0 = torch.cat([w[0], b]).numpy()
    xa = np.hstack([x, np.ones((n, 1))])
    g = np.random.default_rng(7)
    xt = g.normal(size=(3, 3))
    yt = np.array([0, 1, 1])
    xta = np.hstack([xt, np.ones((3, 1))])

    def loss_at_test_points(theta):
        z = xta @ theta
        return np.logaddexp(0, z) - yt * z

    def objective(theta, weights):
        z = xa @ theta
        lo = np.logaddexp(0, z) - y * z
        p = 1 / (1 + np.exp(-z))
        return (weights @ lo) / n + 0.5 * lam * theta @ theta, xa.T @ (weights * (p - y)) / n + lam * theta

    base = loss_at_test_points(theta0)
    actual = np.zeros((3, n))
    for j in range(n):  # retrain without z_j (the -1/N up-weighting of Koh & Liang), from the optimum
        wts = np.ones(n)
        wts[j] = 0.0
        res = scipy.optimize.minimize(objective, theta0, args=(wts,), jac=True, method="BFGS", options={"gtol": 1e-12})
        actual[:, j] = loss_at_test_points(res.x) - base
    predicted = -LastLayerInfluence(w, b, l2=lam).fit(X, Y).influence(torch.from_numpy(xt), torch.from_numpy(yt)) / n
    for t in range(3):
        rho = scipy.stats.spearmanr(actual[t], predicted[t].numpy()).statistic
        assert rho >= 0.9, f"test point {t}: Spearman {rho:.3f} between leave-one-out and predicted influence"
        # and the first-order prediction has the right scale
        assert np.corrcoef(actual[t], predicted[t].numpy())[0, 1] >= 0.95


# --- the attack ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attack_setup():
    torch.manual_seed(0)
    feat = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    xtr = torch.rand(200, 3, 8, 8)
    ytr = (xtr[:, 0].mean((1, 2)) > xtr[:, 2].mean((1, 2))).long()
    with torch.no_grad():
        phi = feat(xtr)
    w, b = fit_linear_head(phi, ytr, num_classes=2, binary=True, l2=0.01)
    inf = LastLayerInfluence(w, b, l2=0.01).fit(phi, ytr)
    return feat, inf, torch.rand(12, 3, 8, 8)


def test_attack_beats_random_and_stays_in_the_ball(attack_setup):
    feat, inf, x = attack_setup
    eps = 8 / 255
    res = attack_influence(feat, inf, x, eps=eps, k=5)
    rnd = attack_influence(feat, inf, x, eps=eps, k=5, attack="random_sign", generator=torch.Generator().manual_seed(0))
    for r in (res, rnd):
        assert (r.x_adv - x).abs().max() <= eps + 1e-6 and r.x_adv.min() >= 0 and r.x_adv.max() <= 1
        assert r.spearman.shape == (12,) and ((r.topk_kept >= 0) & (r.topk_kept <= 5)).all()
    # clean influence is the influence of the unperturbed images (independent path through influence_scores)
    ref, pred = influence_scores(feat, inf, x)
    torch.testing.assert_close(res.influence_clean, ref)
    torch.testing.assert_close(res.pred_clean, pred)
    # reduces the attacked points' helpfulness on every image and is stronger than random noise
    assert (res.attacked_score_drop > 0).all()
    assert res.attacked_score_drop.mean() > rnd.attacked_score_drop.mean()
    assert res.spearman.mean() < rnd.spearman.mean()
    assert res.topk_kept.double().mean() <= rnd.topk_kept.double().mean()
    # eps = 0 changes nothing
    zero = attack_influence(feat, inf, x, eps=0.0, k=5)
    assert (
        torch.equal(zero.x_adv, x)
        and (zero.topk_kept == 5).all()
        and torch.allclose(zero.spearman, torch.ones(12, dtype=D64))
    )
    # batching does not change the result
    again = attack_influence(feat, inf, x, eps=eps, k=5, batch_size=5)
    torch.testing.assert_close(again.x_adv, res.x_adv)
    assert res.summary()["label_kept_rate"] == float(res.label_kept.double().mean())
    assert len(res.records()) == 12 and res.protocol["label_enforced"] is False


def test_attack_through_a_model_head():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.rand(30, 3, 2, 2)
    feat = feature_extractor(net)
    with torch.no_grad():
        phi = feat(x)
    y = net(x).argmax(1)
    inf = LastLayerInfluence(net[3].weight, net[3].bias, damping=1e-3).fit(phi, y)
    res = attack_influence(feat, inf, x[:4], y[:4], eps=0.05, steps=3)
    # more than one step: the shared default step size 2.5 * eps / steps
    assert res.protocol["step_size"] == pytest.approx(2.5 * 0.05 / 3) and (res.attacked_score_drop > 0).all()


# --- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_errors(attack_setup):
    feat, inf, x = attack_setup
    w = torch.randn(2, 3)
    with pytest.raises(ValueError, match="weight"):
        LastLayerInfluence(torch.randn(3))
    with pytest.raises(ValueError, match="damping"):
        LastLayerInfluence(w, damping=-1)
    with pytest.raises(RuntimeError, match="fit"):
        LastLayerInfluence(w).influence(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="in_features|3 features"):
        LastLayerInfluence(w, damping=1).fit(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"train_labels.*\[0, 1\]"):
        LastLayerInfluence(w, damping=1).fit(torch.randn(5, 3), torch.full((5,), 2))
    with pytest.raises(TypeError, match="integer"):
        LastLayerInfluence(w, damping=1).fit(torch.randn(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="not positive definite.*damping"):  # 2-class softmax, no damping
        LastLayerInfluence(w).fit(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    with pytest.raises(ValueError, match="solver"):
        ParameterInfluence(nn.Linear(2, 2), solver="newton")
    with pytest.raises(ValueError, match="matches no parameter"):
        ParameterInfluence(nn.Linear(2, 2), params="head")
    with pytest.raises(ValueError, match="same number of samples"):
        ParameterInfluence(nn.Linear(2, 2)).fit(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="binary"):
        fit_linear_head(torch.randn(6, 2), torch.zeros(6, dtype=torch.long), num_classes=3, binary=True)
    with pytest.raises(ValueError, match="attack"):
        attack_influence(feat, inf, x, attack="topk")
    with pytest.raises(ValueError, match="eps"):
        attack_influence(feat, inf, x, eps=-0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack_influence(feat, inf, x * 2)
    with pytest.raises(ValueError, match="n_attacked"):
        attack_influence(feat, inf, x, n_attacked=0)
    with pytest.raises(ValueError, match="rank_by"):
        attack_influence(feat, inf, x, rank_by="largest")
    with pytest.raises(ValueError, match="shape \\(T, P\\)"):
        conjugate_gradient(lambda v: v, torch.randn(3))
    with pytest.raises(ValueError, match="damping"):
        solve_exact(torch.zeros(2, 2, dtype=D64), torch.ones(1, 2, dtype=D64))
