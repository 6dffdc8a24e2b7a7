"""The shared conventions (fragdefense.utils.conventions, docs/conventions.md): budgets as strings, the default
step size, the ``objective`` hook of ``pgd_attack`` and restarts, the regularizers' inner maximisations through
``pgd_attack`` (bitwise against copies of the hand-written loops they replaced), ``steps`` / ``attack_steps``,
one ``eval_mode`` that keeps deliberately frozen submodules frozen, and ``generator`` accepting an int seed."""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fragdefense.attacks import pgd_attack
from fragdefense.attacks.threat import make_threat
from fragdefense.influence import LastLayerInfluence, attack_influence, fit_linear_head
from fragdefense.influence.attack import rank_scores
from fragdefense.regularizers import (
    ART,
    CURE,
    IGR,
    TRADES,
    IGNorm,
    IGSumNorm,
    PGDAdversarialTraining,
    create_regularizer,
    regularized_loss,
)
from fragdefense.regularizers.art import alignment_triplet
from fragdefense.regularizers.integrated import _ig_l1
from fragdefense.utils.conventions import default_step_size, eval_mode

C, H, W, K = 2, 4, 4, 3


def _net(act: nn.Module | None = None, seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    act = act if act is not None else nn.Softplus(beta=3.0)
    layers = [nn.Conv2d(C, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [act, nn.Flatten(), nn.Linear(4 * H * W, 6), copy.deepcopy(act), nn.Linear(6, K)]
    return nn.Sequential(*layers).double()


def _data(n: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, C, H, W, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x[0, 0, 0, 0] = 0.0  # pixels on the range boundary
    x[1, 1, 1, 1] = 1.0
    return x, torch.arange(n) % K


# ------------------------------------------------------------------------------------------------------------
# copies of the hand-written loops replaced by pgd_attack(..., objective=...) (the code before the change)


def _old_pgd_attack(model, x, y, *, eps, step_size, steps, random_start=True, restarts=1, threat="linf", generator):
    thr = make_threat(threat, eps)
    if isinstance(generator, int):
        generator = torch.Generator(device=x.device).manual_seed(generator)
    loss_fn = lambda logits, t: F.cross_entropy(logits, t, reduction="none")  # noqa: E731
    x0 = x.detach()
    best, best_loss = x0.clone(), None
    for _ in range(restarts):
        xi = thr.random_start(x0, generator) if random_start else x0.clone()
        for _ in range(steps):
            xg = xi.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(model(xg), y)
                (g,) = torch.autograd.grad(loss.sum(), xg)
            xi = thr.project(thr.step(xi.detach(), g, step_size), x0)
        if restarts == 1:
            return xi.detach()
        with torch.no_grad():
            li = loss_fn(model(xi), y)
        if best_loss is None:
            best, best_loss = xi.detach().clone(), li
        else:
            better = li > best_loss
            best[better], best_loss = xi[better].detach(), torch.where(better, li, best_loss)
    return best


def _old_trades_adversary(reg, model, x):  # TRADES.adversary
    x0 = x.detach()
    with torch.no_grad():
        p_clean = F.softmax(model(x0), dim=1)
    thr = make_threat(reg.threat, reg.eps)
    xi = thr.project(x0 + 0.001 * torch.randn_like(x0), x0)
    for _ in range(reg.steps):
        xg = xi.detach().requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(model(xg), dim=1), p_clean, reduction="sum")
            (g,) = torch.autograd.grad(kl, xg)
        xi = thr.project(thr.step(xi.detach(), g, reg.step_size), x0)
    return xi.detach()


def _old_art_training_input(reg, model, x, y):  # ART.training_input
    thr = make_threat("linf", reg.eps)
    x0 = x.detach()
    xi = thr.random_start(x0)
    with eval_mode(model) if reg.attack_mode == "eval" else torch.enable_grad(), torch.enable_grad():
        soft = reg.surrogate(model)
        for _ in range(reg.steps):
            xg = xi.detach().requires_grad_(True)
            obj = (
                F.cross_entropy(model(xg), y, reduction="sum")
                + reg.weight * alignment_triplet(soft, xg, y, reg.k).sum()
            )
            (g,) = torch.autograd.grad(obj, xg)
            xi = thr.project(thr.step(xi.detach(), g, reg.step_size), x0)
    return xi.detach()


def _old_rar_maximise(reg, model, x, y, ce_weight, ig_weight):  # _RARBase._maximise (IG-NORM, IG-SUM-NORM)
    thr = make_threat("linf", reg.eps)
    x0 = x.detach()
    xi = thr.random_start(x0)
    ctx = eval_mode(model) if reg.attack_mode == "eval" else torch.enable_grad()
    with ctx, torch.enable_grad():
        for _ in range(reg.steps):
            xg = xi.detach().requires_grad_(True)
            obj = ig_weight * _ig_l1(model, x0, xg, y, reg.ig_steps, reg.internal_batch_size).sum()
            if ce_weight:
                obj = obj + ce_weight * F.cross_entropy(model(xg), y, reduction="sum")
            (g,) = torch.autograd.grad(obj, xg)
            xi = thr.project(thr.step(xi.detach(), g, reg.step_size), x0)
    return xi.detach()


def _old_influence_attack(features, inf, x, label, attacked, eps, steps, step, rank_by):  # _attack_batch
    x = x.detach()
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            sel = inf.influence(features(x_adv), label, train_index=attacked)
            objective = rank_scores(sel, rank_by).sum()
            (g,) = torch.autograd.grad(objective, x_adv)
        x_adv = x_adv.detach() - step * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


# ------------------------------------------------------------------------------------------------------------
# pgd_attack


def test_pgd_budget_strings_and_default_step():
    model, (x, y) = _net(), _data()
    a = pgd_attack(model, x, y, eps="8/255", steps=4, generator=0)
    b = pgd_attack(model, x, y, eps=8 / 255, steps=4, generator=0)
    c = pgd_attack(model, x, y, eps=8 / 255, step_size=default_step_size(8 / 255, 4), steps=4, generator=0)
    d = pgd_attack(model, x, y, eps="8/255", step_size="5/255", steps=4, generator=0)  # 2.5 * 8 / 4 = 5
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert default_step_size(8 / 255, 10) == 2 / 255  # the old fixed default, exactly
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(model, x, y, eps="-1/255")
    with pytest.raises(ValueError, match="step_size"):
        pgd_attack(model, x, y, eps=0.1, step_size="a/b")


@pytest.mark.parametrize("threat,restarts", [("linf", 1), ("l2", 1), ("linf", 3), ("l2", 2)])
def test_pgd_matches_the_previous_implementation(threat, restarts):
    model, (x, y) = _net(nn.ReLU()), _data(6)
    eps = 8 / 255 if threat == "linf" else 0.3
    kw = dict(eps=eps, step_size=eps / 4, steps=5, restarts=restarts, threat=threat, generator=3)
    assert torch.equal(pgd_attack(model, x, y, **kw), _old_pgd_attack(model, x, y, **kw))
    kw.update(random_start=False, generator=None)
    assert torch.equal(pgd_attack(model, x, y, **kw), _old_pgd_attack(model, x, y, **kw))


def test_pgd_objective_hook_against_a_hand_loop():
    """A margin objective that uses the clean input: the hook's iterates are those of the written-out loop."""
    model, (x, y) = _net(), _data()
    thr = make_threat("linf", 0.05)

    def objective(m, xa, x0, yy):
        z = m(xa)
        other = z.scatter(1, yy[:, None], float("-inf")).amax(1)
        return other - z.gather(1, yy[:, None])[:, 0] + (xa - x0).flatten(1).pow(2).sum(1)

    gen = torch.Generator().manual_seed(5)
    xi = thr.random_start(x, gen)
    for _ in range(6):
        xg = xi.requires_grad_(True)
        (g,) = torch.autograd.grad(objective(model, xg, x, y).sum(), xg)
        xi = thr.project(xi.detach() + 0.01 * g.sign(), x).detach()
    out = pgd_attack(model, x, y, eps=0.05, step_size=0.01, steps=6, objective=objective, generator=5)
    assert torch.equal(out, xi)
    # the objective increased over the clean point, and y may be None when the objective does not need it
    assert (objective(model, out, x, y) > objective(model, x, x, y)).all()
    far = lambda m, xa, x0, _: (m(xa) - m(x0)).pow(2).sum(1)  # noqa: E731
    assert pgd_attack(model, x, None, eps=0.05, steps=2, objective=far, generator=0).shape == x.shape


def test_pgd_objective_brute_force_on_a_linear_model():
    """For a linear objective w.x the L-inf maximiser in the ball (inside [0, 1]) is x + eps sign(w)."""
    torch.manual_seed(0)
    w = torch.randn(C * H * W, dtype=torch.float64)
    x = torch.rand(3, C, H, W, dtype=torch.float64) * 0.5 + 0.25
    obj = lambda m, xa, x0, y: xa.flatten(1) @ w  # noqa: E731
    out = pgd_attack(nn.Identity(), x, None, eps=0.1, steps=3, objective=obj, random_start=False)
    torch.testing.assert_close(out, x + 0.1 * w.sign().view(1, C, H, W).expand_as(x), rtol=0, atol=1e-15)
    # brute force over the corners of a 2-pixel ball: the attack reaches the best corner
    x2 = torch.full((1, 1, 1, 2), 0.5, dtype=torch.float64)
    v = torch.tensor([1.0, -2.0], dtype=torch.float64)
    obj2 = lambda m, xa, x0, y: (xa.flatten(1) * v).sum(1) - 3 * xa.flatten(1).prod(1)  # noqa: E731
    corners = [
        x2 + 0.1 * torch.tensor(s, dtype=torch.float64).view(1, 1, 1, 2) for s in itertools.product((-1, 1), repeat=2)
    ]
    best = max(corners, key=lambda c: float(obj2(None, c, x2, None)))
    out2 = pgd_attack(nn.Identity(), x2, None, eps=0.1, step_size=0.1, steps=4, objective=obj2, random_start=False)
    torch.testing.assert_close(out2, best)


def test_pgd_restarts_keep_the_best_per_image():
    model, (x, y) = _net(), _data(6)
    kw = dict(eps=0.1, step_size=0.02, steps=2, threat="linf")
    gen = torch.Generator().manual_seed(9)
    runs = [pgd_attack(model, x, y, generator=gen, **kw) for _ in range(4)]  # the same draws as 4 restarts
    out = pgd_attack(model, x, y, restarts=4, generator=9, **kw)
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(model(r), y, reduction="none") for r in runs])
    pick = losses.argmax(0)
    expected = torch.stack([runs[int(pick[i])][i] for i in range(len(x))])
    assert torch.equal(out, expected)
    # with an objective too (here: minus the loss, so the restart with the *lowest* loss wins)
    neg = lambda m, xa, x0, yy: -F.cross_entropy(m(xa), yy, reduction="none")  # noqa: E731
    gen = torch.Generator().manual_seed(9)
    runs = [pgd_attack(model, x, y, objective=neg, generator=gen, **kw) for _ in range(3)]
    out = pgd_attack(model, x, y, objective=neg, restarts=3, generator=9, **kw)
    with torch.no_grad():
        vals = torch.stack([neg(model, r, x, y) for r in runs])
    pick = vals.argmax(0)
    assert torch.equal(out, torch.stack([runs[int(pick[i])][i] for i in range(len(x))]))


def test_pgd_init_and_argument_errors():
    model, (x, y) = _net(), _data()
    start = (x + 0.3).clamp(0, 1)
    out = pgd_attack(model, x, y, eps=0.05, steps=0, init=start)
    torch.testing.assert_close(out, make_threat("linf", 0.05).project(start, x))
    with pytest.raises(ValueError, match="at most one"):
        pgd_attack(model, x, y, loss_fn=lambda z, t: z.sum(1), objective=lambda m, xa, x0, t: xa.sum((1, 2, 3)))
    with pytest.raises(ValueError, match="`y`"):
        pgd_attack(model, x, None)
    with pytest.raises(ValueError, match=r"\(5,\) tensor"):
        pgd_attack(model, x, y, steps=1, objective=lambda m, xa, x0, t: xa.sum())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd_attack(model, x * 3, y)


# ------------------------------------------------------------------------------------------------------------
# the regularizers' inner maximisations through pgd_attack: identical to the hand-written loops


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_trades_adversary_and_penalty_unchanged(mode):
    base, (x, y) = _net(bn=True), _data()
    base.train()
    reg = TRADES(eps="8/255", steps=4, attack_mode=mode)
    m_old, m_new, m_pen = (copy.deepcopy(base) for _ in range(3))  # train-mode BatchNorm updates its statistics
    torch.manual_seed(11)
    with eval_mode(m_old) if mode == "eval" else contextlib.nullcontext():
        old = _old_trades_adversary(reg, m_old, x)
    torch.manual_seed(11)
    with eval_mode(m_new) if mode == "eval" else contextlib.nullcontext():
        assert torch.equal(reg.adversary(m_new, x), old)
    # the whole penalty, as ClassifierModule computes it, against the old loop in the same sequence of calls
    m_ref = copy.deepcopy(base)
    torch.manual_seed(11)
    logits = m_pen(x)
    pen = reg.penalty(m_pen, x, x, y, logits).penalty
    assert m_pen.training and m_pen[1].training
    torch.manual_seed(11)
    logits_ref = m_ref(x)
    with eval_mode(m_ref) if mode == "eval" else contextlib.nullcontext():
        xa = _old_trades_adversary(reg, m_ref, x)
    kl = F.kl_div(F.log_softmax(m_ref(xa), dim=1), F.softmax(logits_ref, dim=1), reduction="batchmean")
    assert torch.equal(pen, kl)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_art_training_input_unchanged(mode):
    model, (x, y) = _net(nn.ReLU()), _data()
    reg = ART(eps="8/255", steps=3, k=10, attack_mode=mode)
    torch.manual_seed(4)
    old = _old_art_training_input(reg, model, x, y)
    torch.manual_seed(4)
    assert torch.equal(reg.training_input(model, x, y), old)


@pytest.mark.parametrize("cls", [IGNorm, IGSumNorm])
def test_rar_maximisation_unchanged(cls):
    model, (x, y) = _net(), _data(4)
    reg = cls(eps="4/255", steps=2, ig_steps=3)
    for ce_w, ig_w in ((0.0, 1.0), (1.0, 0.5)):
        torch.manual_seed(2)
        old = _old_rar_maximise(reg, model, x, y, ce_w, ig_w)
        torch.manual_seed(2)
        assert torch.equal(reg._maximise(model, x, y, ce_w, ig_w), old)


def _influence_setup():
    torch.manual_seed(0)
    feat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.Tanh())
    xtr = torch.rand(80, 3, 8, 8)
    ytr = (xtr.mean((1, 2, 3)) > 0.5).long()
    with torch.no_grad():
        phi = feat(xtr)
    w, b = fit_linear_head(phi, ytr, num_classes=2, binary=True, l2=0.01)
    return feat, LastLayerInfluence(w, b, l2=0.01).fit(phi, ytr), torch.rand(6, 3, 8, 8)


@pytest.mark.parametrize("steps,step_size,rank_by", [(1, None, "helpful"), (3, 2 / 255, "harmful"), (2, None, "abs")])
def test_influence_attack_unchanged(steps, step_size, rank_by):
    feat, inf, x = _influence_setup()
    eps = 8 / 255
    res = attack_influence(feat, inf, x, eps="8/255", steps=steps, step_size=step_size, rank_by=rank_by)
    step = res.protocol["step_size"]
    assert step == (eps if steps == 1 and step_size is None else step_size or default_step_size(eps, steps))
    old = _old_influence_attack(feat, inf, x, res.label, res.attacked_index, eps, steps, step, rank_by)
    assert torch.equal(res.x_adv, old)
    if steps == 1:  # the paper's single step: a step of eps is the same as any larger step
        big = attack_influence(feat, inf, x, eps=eps, steps=1, step_size=default_step_size(eps, 1), rank_by=rank_by)
        assert torch.equal(big.x_adv, res.x_adv)


# ------------------------------------------------------------------------------------------------------------
# names: ``steps`` everywhere, ``attack_steps`` a deprecated alias


@pytest.mark.parametrize("cls", [ART, IGNorm, IGSumNorm, IGR])
def test_steps_and_the_deprecated_attack_steps_alias(cls):
    reg = cls(steps=2)
    assert reg.steps == 2 and reg.attack_steps == 2 and "steps=2" in repr(reg)
    with pytest.warns(DeprecationWarning, match="attack_steps.*deprecated"):
        old = cls(attack_steps=4)
    assert old.steps == 4 and old.step_size == default_step_size(8 / 255, 4)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="`steps` only"):
        cls(steps=2, attack_steps=4)
    with pytest.raises(ValueError, match="`steps`"):
        cls(steps=-1)
    # the registry / configs pass keywords: both names work there too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert create_regularizer(cls.name, attack_steps=5).steps == 5
    assert create_regularizer(cls.name, steps=5).steps == 5


def test_art_alias_gives_the_same_adversary():
    model, (x, y) = _net(nn.ReLU()), _data()
    torch.manual_seed(0)
    new = ART(steps=2, k=10).training_input(model, x, y)
    with pytest.warns(DeprecationWarning):
        reg = ART(attack_steps=2, k=10)
    torch.manual_seed(0)
    assert torch.equal(reg.training_input(model, x, y), new)


# ------------------------------------------------------------------------------------------------------------
# budgets: numbers or strings such as "8/255" in every regularizer and in attack_influence


@pytest.mark.parametrize(
    "make_str,make_num",
    [
        (
            lambda: PGDAdversarialTraining(eps="8/255", step_size="2/255", steps=2),
            lambda: PGDAdversarialTraining(eps=8 / 255, step_size=2 / 255, steps=2),
        ),
        (
            lambda: TRADES(eps="8/255", step_size="2/255", steps=2),
            lambda: TRADES(eps=8 / 255, step_size=2 / 255, steps=2),
        ),
        (
            lambda: ART(eps="8/255", step_size="3/255", steps=2, k=8),
            lambda: ART(eps=8 / 255, step_size=3 / 255, steps=2, k=8),
        ),
        (
            lambda: IGNorm(eps="4/255", step_size="1/255", steps=1, ig_steps=2),
            lambda: IGNorm(eps=4 / 255, step_size=1 / 255, steps=1, ig_steps=2),
        ),
        (
            lambda: IGSumNorm(eps="4/255", step_size="1/255", steps=1, ig_steps=2),
            lambda: IGSumNorm(eps=4 / 255, step_size=1 / 255, steps=1, ig_steps=2),
        ),
        (
            lambda: IGR(eps="4/255", step_size="1/255", steps=1, ig_steps=2),
            lambda: IGR(eps=4 / 255, step_size=1 / 255, steps=1, ig_steps=2),
        ),
        (lambda: CURE(h="96/255"), lambda: CURE(h=96 / 255)),
    ],
    ids=["pgd_at", "trades", "art", "ig_norm", "ig_sum_norm", "igr", "cure"],
)
def test_budget_strings_in_every_regularizer(make_str, make_num):
    model, (x, y) = _net(nn.ReLU()), _data(4)
    a, b = make_str(), make_num()
    for attr in ("eps", "step_size", "h"):
        if hasattr(b, attr):
            assert getattr(a, attr) == getattr(b, attr) and isinstance(getattr(a, attr), float)
    torch.manual_seed(3)
    la = regularized_loss(model, a, x, y).loss
    torch.manual_seed(3)
    lb = regularized_loss(model, b, x, y).loss
    assert torch.equal(la, lb)


@pytest.mark.parametrize("cls", [PGDAdversarialTraining, TRADES, ART, IGNorm, IGSumNorm, IGR])
def test_bad_budgets_name_the_argument(cls):
    with pytest.raises(ValueError, match="`eps`"):
        cls(eps="eight/255")
    with pytest.raises(ValueError, match="`step_size`"):
        cls(step_size="-1/255")


def test_published_step_sizes_stay_explicit_and_none_gives_the_rule():
    assert PGDAdversarialTraining().step_size == 2 / 255 and PGDAdversarialTraining().steps == 7
    assert TRADES().step_size == 2 / 255 and TRADES().steps == 10
    assert ART().steps == 3 and ART().step_size == default_step_size(8 / 255, 3)
    assert PGDAdversarialTraining(step_size=None).step_size == default_step_size(8 / 255, 7)
    assert IGR(eps="4/255", steps=4).step_size == default_step_size(4 / 255, 4)


def test_attack_influence_budget_strings():
    feat, inf, x = _influence_setup()
    a = attack_influence(feat, inf, x, eps="8/255", steps=2, step_size="3/255")
    b = attack_influence(feat, inf, x, eps=8 / 255, steps=2, step_size=3 / 255)
    assert torch.equal(a.x_adv, b.x_adv) and a.protocol["eps"] == 8 / 255 and a.protocol["step_size"] == 3 / 255
    r1 = attack_influence(feat, inf, x, eps="8/255", attack="random_sign", generator=4)
    r2 = attack_influence(feat, inf, x, eps=8 / 255, attack="random_sign", generator=torch.Generator().manual_seed(4))
    assert torch.equal(r1.x_adv, r2.x_adv)
    with pytest.raises(ValueError, match="`eps`"):
        attack_influence(feat, inf, x, eps="1/0")


# ------------------------------------------------------------------------------------------------------------
# one eval_mode: a submodule deliberately frozen in eval mode inside a training model stays frozen


def _frozen_bn_net() -> nn.Module:
    model = _net(nn.ReLU(), bn=True).train()
    model[1].eval()  # BatchNorm frozen (e.g. fine-tuning with fixed statistics)
    return model


def _assert_frozen(model: nn.Module, stats: torch.Tensor) -> None:
    assert model.training and not model[1].training
    assert all(m.training for i, m in enumerate(model) if i != 1)
    assert torch.equal(model[1].running_mean, stats)


@pytest.mark.parametrize(
    "make,call",
    [
        (lambda: PGDAdversarialTraining(steps=2), "training_input"),
        (lambda: TRADES(steps=2), "penalty"),
        (lambda: ART(steps=1, k=8), "training_input"),
        (lambda: ART(steps=1, k=8), "penalty"),
        (lambda: IGNorm(steps=1, ig_steps=2), "penalty"),
        (lambda: IGSumNorm(steps=1, ig_steps=2), "training_input"),
        (lambda: IGR(steps=1, ig_steps=2), "penalty"),
    ],
    ids=["pgd_at", "trades", "art_input", "art_penalty", "ig_norm", "ig_sum_norm", "igr"],
)
def test_regularizers_keep_a_frozen_batchnorm_frozen(make, call):
    model, (x, y) = _frozen_bn_net(), _data(4)
    stats = model[1].running_mean.clone()
    reg = make()
    if call == "training_input":
        reg.training_input(model, x, y)
    else:
        reg.penalty(model, x, x, y, model(x))
    _assert_frozen(model, stats)
    if isinstance(reg, ART):  # the surrogate wraps the model itself: the frozen submodule is the model's own
        soft = reg.surrogate(model)
        assert soft.model is model and soft.model.training and not soft.model[1].training


def test_eval_mode_is_one_function_and_keeps_frozen_submodules():
    import fragdefense.hessian.hvp as hvp
    import fragdefense.influence.params as params
    import fragdefense.regularizers as regs
    from fragdefense.regularizers import base
    from fragdefense.utils import conventions

    assert regs.eval_mode is base.eval_mode is hvp.eval_mode is params._eval_mode is conventions.eval_mode
    model = _frozen_bn_net()
    with eval_mode(model) as m:
        assert m is model and not any(mod.training for mod in model.modules())
    _assert_frozen(model, model[1].running_mean.clone())


def test_influence_and_hessian_keep_a_frozen_batchnorm_frozen():
    from fragdefense.hessian import input_hessian, param_hessian
    from fragdefense.influence import ParameterInfluence

    model, (x, y) = _frozen_bn_net(), _data(6)
    stats = model[1].running_mean.clone()
    param_hessian(model, F.cross_entropy, (x, y))
    _assert_frozen(model, stats)
    op = input_hessian(model, x, objective="loss", y=y)
    op(torch.randn(len(x), C * H * W, dtype=torch.float64))
    _assert_frozen(model, stats)
    inf = ParameterInfluence(model, params="6", damping=0.1, solver="exact").fit(x, y)
    inf.influence(x[:2], y[:2])
    _assert_frozen(model, stats)


# ------------------------------------------------------------------------------------------------------------
# seeding: ``generator`` takes None, an int seed or a torch.Generator; ``seed`` is a deprecated alias


def test_attributions_take_an_int_generator_and_seed_is_a_deprecated_alias():
    from fragdefense.attributions.robust import local_smooth, uniform_ball_noise, uniform_grad
    from fragdefense.attributions.smoothgrad import smoothgrad

    model, (x, _) = _net(), _data(3)
    t = torch.tensor([0, 1, 2])
    calls = [
        lambda **kw: smoothgrad(model, x, t, n_samples=3, sigma=0.1, **kw),
        lambda **kw: uniform_grad(model, x, t, n_samples=3, ball="l2", **kw),
        lambda **kw: local_smooth(model, x, t, n_samples=2, iters=2, **kw),
    ]
    for f in calls:
        a = f(generator=7)
        assert torch.equal(a, f(generator=torch.Generator().manual_seed(7)))
        with pytest.warns(DeprecationWarning, match="`seed=` is deprecated"):
            assert torch.equal(a, f(seed=7))
        assert not torch.equal(a, f(generator=8))
        with pytest.raises(ValueError, match="either `generator` or `seed`"):
            f(generator=1, seed=1)
        with pytest.raises(TypeError, match="`generator`"):
            f(generator="7")
    u = uniform_ball_noise(2, x.shape, "linf", generator=3, dtype=x.dtype)
    assert torch.equal(
        u, uniform_ball_noise(2, x.shape, "linf", generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    )


def test_hessian_generators_and_radii_budgets():
    from fragdefense.hessian import HessianOperator, hutchinson, lanczos, map_change_along_directions, slq

    a = torch.randn(6, 6, dtype=torch.float64)
    op = HessianOperator.from_matrix(a + a.T)
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    assert torch.equal(hutchinson(op, 5, generator=2).estimate, hutchinson(op, 5, generator=g()).estimate)
    assert torch.equal(lanczos(op, k=2, generator=2).eigenvalues, lanczos(op, k=2, generator=g()).eigenvalues)
    assert torch.equal(slq(op, 3, 2, generator=2).nodes, slq(op, 3, 2, generator=g()).nodes)
    with pytest.raises(TypeError, match="`generator`"):
        hutchinson(op, 5, generator=2.5)
    net, (x, _) = _net(nn.ReLU()), _data(2)
    kw = dict(beta=5.0, n_random=1, topk=4, max_iter=5, generator=0)
    p1 = map_change_along_directions(net, x, radii=("8/255",), **kw)
    p2 = map_change_along_directions(net, x, radii=(8 / 255,), **kw)
    assert p1.radii == p2.radii == [8 / 255]
    torch.testing.assert_close(p1.metrics["grad_change"], p2.metrics["grad_change"], rtol=0, atol=0)
