"""Robust accuracy under label attacks (PGD; AutoAttack through torchattacks).

The independent reference is an affine model, whose minimal L-inf adversarial distance is known in closed form:
for logits ``z = W x + b`` the label of ``x`` can be flipped to class ``j`` inside ``||d||_inf <= eps`` iff
``z_y - z_j <= eps * ||w_y - w_j||_1`` (images kept in ``[0.3, 0.7]`` so the eps-ball stays inside ``[0, 1]``).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fragdefense.attacks.robust_accuracy import (
    LABEL_ATTACKS,
    list_label_attacks,
    register_label_attack,
    robust_accuracy,
)
from fragdefense.data.synthetic import generate_synthetic
from fragdefense.models import create_model

TOL = 1e-6


class Affine(nn.Module):
    """``z = W x + b`` on flattened images; classes beyond ``n_active`` get a constant logit of -1e4 (so an
    "effectively binary" model can still be given to attacks that need four logits)."""

    def __init__(self, n_active: int, n_classes: int, d: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.zeros(n_classes, d)
        w[:n_active] = torch.randn(n_active, d, generator=g) * 0.5
        b = torch.full((n_classes,), -1e4)
        b[:n_active] = torch.randn(n_active, generator=g) * 0.1
        self.lin = nn.Linear(d, n_classes)
        with torch.no_grad():
            self.lin.weight.copy_(w)
            self.lin.bias.copy_(b)
        self.n_active = n_active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))

    def min_linf_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Closed form: ``min_j (z_y - z_j) / ||w_y - w_j||_1`` over the other active classes (0 if misclassified)."""
        with torch.no_grad():
            z = self(x)[:, : self.n_active].double()
            w = self.lin.weight[: self.n_active].double()
            zy = z.gather(1, y.view(-1, 1))
            dw = (w.unsqueeze(0) - w[y].unsqueeze(1)).abs().sum(2)  # (B, n_active)
            d = (zy - z) / dw.clamp_min(1e-30)
            d[torch.arange(len(y)), y] = float("inf")
            return d.min(1).values.clamp_min(0)


def _affine_data(n_active: int, n_classes: int, n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand(n, 3, 4, 4, generator=g)
    model = Affine(n_active, n_classes, 3 * 4 * 4, seed)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:4] = (y[:4] + 1) % n_active  # a few misclassified images: never counted robust
    return model, x, y


def _check_result(model, x, y, r, eps, norm="linf"):
    d = (r.x_adv - x).flatten(1)
    dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert float(dist.max()) <= eps + TOL
    assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
    with torch.no_grad():
        again = (model(r.x_adv).argmax(1) == y) & (model(x).argmax(1) == y)
    assert torch.equal(r.robust_correct, again)
    assert not bool((r.robust_correct & ~r.clean_correct).any())


@pytest.fixture(scope="module")
def trained_cnn():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=8)
    x, y, _ = generate_synthetic(256, 32, seed=0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for i in range(30):
        sl = slice((i * 32) % 256, (i * 32) % 256 + 32)
        loss = F.cross_entropy(model(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt, _ = generate_synthetic(16, 32, seed=1)
    return model, xt, yt


# ------------------------------------------------------------------------------------ closed-form reference


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "autoattack"])
def test_affine_model_matches_closed_form(attack):
    """An effectively binary affine model (two active classes, two constant -1e4 logits so AutoAttack's targeted
    DLR loss has its four logits): robust_correct == (closed-form distance > eps) for every image."""
    model, x, y = _affine_data(2, 4)
    dist = model.min_linf_distance(x, y)
    correct = model(x).argmax(1) == y
    eps = float(dist[correct].median())
    keep = (dist - eps).abs() > 1e-3 * eps  # float32 ties at the boundary are not decidable
    r = robust_accuracy(model, x, y, attack=attack, eps=eps, steps=20, seed=0)
    _check_result(model, x, y, r, eps)
    expected = (dist > eps) & correct
    assert 0 < int(expected[keep].sum()) < int(correct[keep].sum())  # both outcomes occur
    assert torch.equal(r.robust_correct[keep], expected[keep])


def test_multiclass_affine_model_autoattack_matches_closed_form():
    """Ten active classes: APGD-T targets every other class, and for an affine model each targeted attack reaches
    the closed-form corner, so AutoAttack is exact."""
    model, x, y = _affine_data(10, 10, seed=1)
    dist = model.min_linf_distance(x, y)
    correct = model(x).argmax(1) == y
    eps = float(dist[correct].median())
    keep = (dist - eps).abs() > 1e-3 * eps
    r = robust_accuracy(model, x, y, attack="autoattack", eps=eps, steps=20, seed=0)
    _check_result(model, x, y, r, eps)
    expected = (dist > eps) & correct
    assert 0 < int(expected[keep].sum()) < int(correct[keep].sum())
    assert torch.equal(r.robust_correct[keep], expected[keep])


def test_two_class_model_pgd_exact_and_autoattack_refused():
    model, x, y = _affine_data(2, 2)
    dist = model.min_linf_distance(x, y)
    correct = model(x).argmax(1) == y
    eps = float(dist[correct].median())
    keep = (dist - eps).abs() > 1e-3 * eps
    r = robust_accuracy(model, x, y, attack="pgd", eps=eps, steps=20, seed=0)
    assert torch.equal(r.robust_correct[keep], ((dist > eps) & correct)[keep])
    with pytest.raises(ValueError, match="n_classes"):
        robust_accuracy(model, x, y, attack="autoattack", eps=eps)


# ---------------------------------------------------------------------------------------------- small CNN


def test_small_cnn_autoattack_le_pgd_le_clean(trained_cnn):
    model, x, y = trained_cnn
    eps = 4 / 255
    pgd = robust_accuracy(model, x, y, attack="pgd", eps=eps, steps=10, seed=0)
    aa = robust_accuracy(model, x, y, attack="autoattack", eps=eps, steps=5, seed=0)
    for r in (pgd, aa):
        _check_result(model, x, y, r, eps)
    assert torch.equal(pgd.clean_correct, aa.clean_correct)
    s_pgd, s_aa = pgd.summary(), aa.summary()
    assert s_aa["robust_accuracy"] <= s_pgd["robust_accuracy"] < s_pgd["clean_accuracy"]
    # per image: whatever PGD breaks is broken by AutoAttack too on this model
    assert not bool((aa.robust_correct & ~pgd.robust_correct).any())
    # eps = 0: nothing moves, robust == clean
    r0 = robust_accuracy(model, x, y, attack="autoattack", eps=0, steps=2, seed=0)
    assert torch.equal(r0.robust_correct, r0.clean_correct) and torch.equal(r0.x_adv, x)


def test_l2_norm_ball(trained_cnn):
    model, x, y = trained_cnn
    r = robust_accuracy(model, x, y, attack="apgd-ce", eps=0.25, norm="l2", steps=5, seed=0)
    _check_result(model, x, y, r, 0.25, norm="l2")
    assert r.summary()["robust_accuracy"] <= r.summary()["clean_accuracy"]


def test_determinism_and_seed():
    model, x, y = _affine_data(4, 4, n=24, seed=2)
    a = robust_accuracy(model, x, y, attack="autoattack", eps=0.05, steps=5, seed=3)
    b = robust_accuracy(model, x, y, attack="autoattack", eps=0.05, steps=5, seed=3)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.robust_correct, b.robust_correct)
    p1 = robust_accuracy(model, x, y, attack="pgd", eps=0.05, steps=3, seed=1)
    p2 = robust_accuracy(model, x, y, attack="pgd", eps=0.05, steps=3, seed=torch.Generator().manual_seed(1))
    p3 = robust_accuracy(model, x, y, attack="pgd", eps=0.05, steps=3, seed=2)
    assert torch.equal(p1.x_adv, p2.x_adv) and not torch.equal(p1.x_adv, p3.x_adv)


# ------------------------------------------------------------------------- side effects of torchattacks


def test_torchattacks_reseeds_global_rng_but_robust_accuracy_does_not():
    import torchattacks

    model, x, y = _affine_data(4, 4, n=8, seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    torchattacks.APGD(model, eps=0.05, steps=2, seed=0)(x, y)
    assert not torch.equal(torch.get_rng_state(), before)  # the library itself reseeds the global RNG

    torch.manual_seed(123)
    before = torch.get_rng_state()
    robust_accuracy(model, x, y, attack="autoattack", eps=0.05, steps=2, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    # seed=None draws the attack's seed from the global RNG: it advances, as any use of it does
    robust_accuracy(model, x, y, attack="apgd-ce", eps=0.05, steps=2, seed=None)
    assert not torch.equal(torch.get_rng_state(), before)


def test_model_flags_and_grads_restored(trained_cnn):
    model, x, y = trained_cnn
    model = create_model("small_cnn", num_classes=10, width=8).train()
    model.load_state_dict(trained_cnn[0].state_dict())
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.eval()  # a deliberately frozen submodule
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.full_like(params[1], 7.0)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    r = robust_accuracy(model, x[:6], y[:6], attack="fab-t", eps=4 / 255, steps=3, seed=0)
    _check_result(model.eval(), x[:6], y[:6], r, 4 / 255)
    model.train()
    bn.eval()
    robust_accuracy(model, x[:6], y[:6], attack="autoattack", eps=4 / 255, steps=2, seed=0)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
    assert torch.equal(params[1].grad, torch.full_like(params[1], 7.0))
    assert all(p.grad is None for i, p in enumerate(params) if i != 1)  # FAB's backward() did not accumulate
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())  # BN statistics untouched


# ------------------------------------------------------------------------------------------ honest reports


class Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 1.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("attack", ["pgd", "autoattack"])
def test_constant_model_flagged_as_zero_gradient(attack):
    model = Constant()
    x = torch.rand(6, 3, 4, 4)
    y = torch.tensor([1, 1, 1, 0, 2, 1])
    with pytest.warns(UserWarning, match="zero input gradient"):
        r = robust_accuracy(model, x, y, attack=attack, eps=0.1, steps=2, seed=0)
    # a constant model is truly robust: robust == clean, and the summary says why
    assert torch.equal(r.robust_correct, r.clean_correct)
    assert torch.equal(r.zero_gradient, r.clean_correct)
    s = r.summary()
    assert s["n_zero_gradient"] == 4 and s["robust_accuracy"] == pytest.approx(4 / 6) and s["n_attacked"] == 4


def test_invalid_or_failing_attack_is_not_reported_as_measured():
    model, x, y = _affine_data(4, 4, n=8, seed=4)
    register_label_attack("too-far", lambda m, x, y, eps, norm, steps, g: (x + 2 * eps).clamp(0, 1))
    register_label_attack("broken", lambda m, x, y, eps, norm, steps, g: 1 / 0)
    try:
        with pytest.raises(RuntimeError, match="linf distance"):
            robust_accuracy(model, x, y, attack="too-far", eps=0.05)
        with pytest.raises(ZeroDivisionError):
            robust_accuracy(model, x, y, attack="broken", eps=0.05)
        with pytest.warns(UserWarning, match="not measured"):
            r = robust_accuracy(model, x, y, attack="too-far", eps=0.05, on_error="mark", batch_size=3)
        assert torch.equal(r.failed, r.clean_correct) and not bool(r.robust_correct.any())
        assert torch.equal(r.x_adv, x) and r.summary()["robust_accuracy"] is None
        with pytest.warns(UserWarning, match="ZeroDivisionError"):
            r = robust_accuracy(model, x, y, attack="broken", eps=0.05, on_error="mark")
        assert r.summary()["n_failed"] == int(r.clean_correct.sum())
    finally:
        del LABEL_ATTACKS["too-far"], LABEL_ATTACKS["broken"]


# ------------------------------------------------------------------------------------------ argument errors


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(48, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x.flatten(1))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"x": torch.rand(2, 48)}, ValueError, "`x`"),
        ({"x": torch.rand(2, 3, 4, 4) + 1}, ValueError, r"`x`.*\[0, 1\]"),
        ({"y": torch.zeros(2)}, TypeError, "`y`.*integer"),
        ({"y": torch.zeros(3, dtype=torch.long)}, ValueError, r"`y`.*\(2,\)"),
        ({"y": torch.tensor([0, 5])}, ValueError, r"`y`.*\[0, 3\]"),
        ({"n_classes": 10}, ValueError, "n_classes"),
        ({"eps": "eight/255"}, ValueError, "`eps`"),
        ({"eps": -0.1}, ValueError, "`eps`"),
        ({"norm": "l3"}, ValueError, "`norm`"),
        ({"attack": "nope"}, ValueError, r"`attack`.*'autoattack'.*'pgd'"),
        ({"steps": 0}, ValueError, "`steps`"),
        ({"batch_size": 0}, ValueError, "`batch_size`"),
        ({"seed": "a"}, TypeError, "`seed`"),
        ({"on_error": "ignore"}, ValueError, "`on_error`"),
    ],
)
def test_argument_errors_before_any_attack(kwargs, err, match):
    model = Counting()
    args = {"x": torch.rand(2, 3, 4, 4), "y": torch.tensor([0, 1])} | kwargs
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(err, match=match):
        robust_accuracy(model, x, y, **args)
    assert model.calls <= 1  # at most the clean forward (label range / n_classes against the logits)


def test_missing_torchattacks_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    model = Counting()
    with pytest.raises(ImportError, match=r"pip install fragdefense\[autoattack\]"):
        robust_accuracy(model, torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), attack="autoattack")
    r = robust_accuracy(model, torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), attack="pgd", steps=2)  # no need
    assert r.attack == "pgd"


def test_registry():
    assert {"pgd", "autoattack", "apgd-ce", "apgd-t", "fab-t", "square"} <= set(list_label_attacks())
    with pytest.raises(ValueError, match="already registered"):
        register_label_attack("pgd", LABEL_ATTACKS["pgd"])
    with pytest.raises(TypeError, match="callable"):
        register_label_attack("x", 3)
