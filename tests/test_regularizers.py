"""Defenses as training regularizers: parameter gradients (finite differences, closed forms), SSR's
lambda_max against the explicit input Hessian, eps-ball feasibility, a few steps reduce each term, Compose,
warm-up, configs and end-to-end training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from fragdefense.cli._config import compose_config
from fragdefense.cli.train import train
from fragdefense.models import create_model, load_checkpoint_model
from fragdefense.regularizers import (
    ART,
    CURE,
    IGR,
    REGULARIZERS,
    SSR,
    TRADES,
    Compose,
    IGNorm,
    IGSumNorm,
    InputGradient,
    PGDAdversarialTraining,
    Regularizer,
    SoftplusBeta,
    alignment_triplet,
    ce_input_hessian_lambda_max,
    create_regularizer,
    list_regularizers,
    loss_path_ig,
    regularized_loss,
)

B, C, H, W, K = 3, 2, 4, 4, 3
FD_RTOL = 1e-5  # float64 central differences, h = 1e-6


def _net(act: nn.Module | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1),
        act if act is not None else nn.Softplus(beta=3.0),
        nn.Flatten(),
        nn.Linear(4 * H * W, 6),
        copy.deepcopy(act) if act is not None else nn.Softplus(beta=3.0),
        nn.Linear(6, K),
    ).double()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2])
    return x, y


def step_loss(reg: Regularizer, model: nn.Module, x, y, epoch: float = 10.0, seed: int = 0):
    """What ClassifierModule.training_step computes (seeded so the random starts are repeatable)."""
    torch.manual_seed(seed)
    out = regularized_loss(model, reg, x, y, epoch)
    return out.task, out.term, out.logs, out.x_train


def check_param_fd(fn, model: nn.Module, n_dirs: int = 2, h: float = 1e-6, rtol: float = FD_RTOL) -> None:
    """Directional derivatives of the scalar ``fn()`` w.r.t. all parameters: autograd vs central differences."""
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(fn(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    assert sum(g.abs().sum() for g in grads) > 0
    gen = torch.Generator().manual_seed(7)
    for _ in range(n_dirs):
        vs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, v in zip(params, vs):
                p.add_(h * v)
        fp = fn().detach()  # evaluated with grad enabled: the penalties differentiate internally
        with torch.no_grad():
            for p, v in zip(params, vs):
                p.sub_(2 * h * v)
        fm = fn().detach()
        with torch.no_grad():
            for p, v in zip(params, vs):
                p.add_(h * v)
        fd = (fp - fm) / (2 * h)
        ad = sum((g * v).sum() for g, v in zip(grads, vs))
        torch.testing.assert_close(ad, fd, rtol=rtol, atol=1e-9)


# ---------------------------------------------------------------- closed forms and finite differences


def test_input_grad_matches_closed_form_on_linear_model(data):
    x, y = data
    lin = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K)).double()
    _, term, logs, _ = step_loss(InputGradient(weight=2.0), lin, x, y)
    wmat, b = lin[1].weight, lin[1].bias
    p = torch.softmax(x.flatten(1) @ wmat.T + b, 1)
    g = (p - F.one_hot(y, K).double()) @ wmat  # d CE_b / d x_b = W^T (p_b - e_y)
    expected = g.pow(2).sum(1).mean()
    torch.testing.assert_close(logs["input_grad"], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(term, 2.0 * expected, rtol=1e-12, atol=0)
    # and its parameter gradient equals the closed form's
    (gw,) = torch.autograd.grad(term, wmat)
    (gw_ref,) = torch.autograd.grad(
        2.0 * ((torch.softmax(x.flatten(1) @ wmat.T + b, 1) - F.one_hot(y, K)) @ wmat).pow(2).sum(1).mean(), wmat
    )
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)


def _fixed(reg: Regularizer, xa):
    """Freeze a regularizer's inner maximisation at ``xa`` (Danskin: the gradient treats x' as constant)."""
    if isinstance(reg, TRADES):
        reg.adversary = lambda model, x: xa
    elif isinstance(reg, IGNorm):
        reg._maximise = lambda *a, **k: xa
    elif isinstance(reg, IGR):
        reg._adversary = lambda *a, **k: xa
    return reg


@pytest.mark.parametrize(
    "make",
    [
        lambda: InputGradient(),
        lambda: InputGradient(norm="l1"),
        lambda: CURE(h=0.05),
        lambda: SSR(),
        lambda: SSR(channel_average=False),
        lambda: TRADES(),
        lambda: IGNorm(ig_steps=3),
        lambda: IGR(ig_steps=3),
        lambda: ART(k=None, beta=5.0),
        lambda: ART(k=10, beta=5.0),
    ],
    ids=["input_grad", "input_grad_l1", "cure", "ssr", "ssr_full", "trades", "ig_norm", "igr", "art", "art_topk"],
)
def test_penalty_parameter_gradient_matches_finite_differences(make, data):
    x, y = data
    model = _net()
    xa = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)).clamp(0, 1)
    reg = _fixed(make(), xa)
    x_train = xa if isinstance(reg, ART) else x

    def fn():
        xt = x_train.detach().requires_grad_(True) if reg.needs_input_grad else x_train
        term, _ = reg.loss_terms(model, x, xt, y, model(xt), 10.0)
        return term

    check_param_fd(fn, model)


def test_loss_path_ig_gradient_and_completeness(data):
    x, y = data
    model = _net()
    xa = (x + 0.05).clamp(0, 1)
    ig = loss_path_ig(model, x, xa, y, steps=400, create_graph=False)
    ce = F.cross_entropy(model(xa), y, reduction="none") - F.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(ig.sum((1, 2, 3)), ce, rtol=5e-3, atol=1e-6)
    chunked = loss_path_ig(model, x, xa, y, steps=7, create_graph=False, internal_batch_size=3)
    torch.testing.assert_close(
        chunked, loss_path_ig(model, x, xa, y, steps=7, create_graph=False), rtol=1e-12, atol=1e-14
    )
    check_param_fd(lambda: loss_path_ig(model, x, xa, y, steps=4).abs().sum(), model)


def test_alignment_triplet_matches_explicit_cosines(data):
    x, y = data
    model = _net()
    trip = alignment_triplet(model, x, y, k=None)
    xs = x.clone().requires_grad_(True)
    logits = model(xs)
    for b in range(B):
        wrong = max((c for c in range(K) if c != y[b]), key=lambda c: logits[b, c].item())
        gy = torch.autograd.grad(logits[b, y[b]], xs, retain_graph=True)[0][b].flatten()
        gn = torch.autograd.grad(logits[b, wrong], xs, retain_graph=True)[0][b].flatten()
        cos = lambda u, v: (u @ v) / (u.norm() * v.norm())  # noqa: E731
        d_ap, d_an = 1 - cos(x[b].flatten(), gy), 1 - cos(x[b].flatten(), gn)
        torch.testing.assert_close(trip[b], F.softplus(d_ap - d_an), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- SSR's lambda_max


@pytest.mark.parametrize("channels,channel_average", [(2, False), (1, True)])
def test_ssr_lambda_max_equals_explicit_input_hessian(channels, channel_average):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(channels, 5, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * H * W, 8),
        nn.ReLU(),
        nn.Linear(8, 4),
    ).double()
    x = torch.rand(4, channels, H, W, dtype=torch.float64)
    lam = ce_input_hessian_lambda_max(net, x, channel_average=channel_average)
    for b in range(4):
        f = lambda z, b=b: F.cross_entropy(net(z.view(1, channels, H, W)), torch.tensor([b % 4]))  # noqa: E731
        hess = torch.autograd.functional.hessian(f, x[b].flatten())
        top = torch.linalg.eigvalsh(hess)[-1]
        torch.testing.assert_close(lam[b], top, rtol=1e-10, atol=1e-14)
    # and the SSR penalty is their mean
    out = SSR(channel_average=channel_average).penalty(net, x, x, torch.zeros(4, dtype=torch.long), net(x))
    torch.testing.assert_close(out.penalty, lam.mean(), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- adversarial inputs stay feasible


@pytest.mark.parametrize(
    "make",
    [
        lambda: PGDAdversarialTraining(eps="8/255", steps=3),
        lambda: PGDAdversarialTraining(eps=0.5, steps=3, threat="l2"),
        lambda: IGSumNorm(eps="8/255", steps=2, ig_steps=2),
        lambda: ART(eps="8/255", steps=2, k=None),
    ],
    ids=["pgd_at", "pgd_at_l2", "ig_sum_norm", "art"],
)
def test_training_inputs_stay_in_ball_and_range(make):
    torch.manual_seed(0)
    x = torch.rand(6, C, H, W, dtype=torch.float64)
    x[0] = 0.0
    x[1] = 1.0
    y = torch.arange(6) % K
    model = _net(nn.ReLU())
    reg = make()
    xa = reg.training_input(model, x, y)
    assert xa.shape == x.shape and not xa.requires_grad
    assert xa.min() >= 0 and xa.max() <= 1
    d = (xa - x).flatten(1)
    if getattr(reg, "threat", "linf") == "l2":
        assert (d.norm(dim=1) <= reg.eps + 1e-9).all()
    else:
        assert d.abs().max() <= reg.eps + 1e-9
    assert d.abs().max() > 0  # it moved


def test_inner_adversaries_stay_in_ball():
    torch.manual_seed(0)
    x = torch.rand(5, C, H, W, dtype=torch.float64)
    y = torch.arange(5) % K
    model = _net()
    eps = 4 / 255
    for xa in (
        TRADES(eps=eps, steps=3).adversary(model, x),
        IGNorm(eps=eps, steps=2, ig_steps=2)._maximise(model, x, y, 0.0, 1.0),
        IGR(eps=eps, steps=2)._adversary(model, x, y),
    ):
        assert xa.min() >= 0 and xa.max() <= 1 and (xa - x).abs().max() <= eps + 1e-9


def test_pgd_at_attacks_in_eval_mode_and_restores_train_mode():
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, K))
    model.train()
    before = model[1].running_mean.clone()
    x, y = torch.rand(4, C, H, W), torch.arange(4) % K
    PGDAdversarialTraining(steps=3).training_input(model, x, y)
    assert model.training
    torch.testing.assert_close(model[1].running_mean, before)  # the attack did not touch BatchNorm statistics


# ---------------------------------------------------------------- optimisation reduces each term


@pytest.mark.parametrize("name", [n for n in list_regularizers() if n != "softplus_beta"])
def test_few_steps_reduce_own_term(name):
    torch.manual_seed(0)
    x = torch.rand(16, C, H, W, dtype=torch.float64)
    y = torch.arange(16) % K
    model = _net(nn.ReLU()) if name == "ssr" else _net()
    kw = {"ig_steps": 3, "steps": 2} if name in ("ig_norm", "ig_sum_norm", "igr") else {}
    if name == "art":
        kw = {"steps": 2, "k": 8}
    if name in ("pgd_at", "trades"):
        kw = {"steps": 3}
    reg = create_regularizer(name, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)

    def own_term(seed: int):
        task, term, _, x_train = step_loss(reg, model, x, y, seed=seed)
        # adversarial training's own objective is the adversarial cross-entropy
        return term if term is not None else task

    first = own_term(123).detach()
    for i in range(30):
        opt.zero_grad()
        own_term(i).backward()
        opt.step()
    last = own_term(123).detach()
    assert last < 0.8 * first, f"{name}: {first.item():.4g} -> {last.item():.4g}"


# ---------------------------------------------------------------- composition, warm-up, errors


def test_compose_sums_weighted_terms(data):
    x, y = data
    model = _net()
    a, b = InputGradient(weight=0.5), SSR(weight=2.0, warmup_epochs=4)
    comp = Compose([a, b])
    assert comp.needs_input_grad
    _, total, logs, _ = step_loss(comp, model, x, y, epoch=1.0)
    _, ta, _, _ = step_loss(a, model, x, y, epoch=1.0)
    _, tb, _, _ = step_loss(b, model, x, y, epoch=1.0)
    torch.testing.assert_close(total, ta + tb, rtol=1e-12, atol=0)
    torch.testing.assert_close(tb, 0.25 * 2.0 * logs["ssr"], rtol=1e-12, atol=0)  # warm-up 1/4
    assert set(logs) == {"input_grad", "ssr"}


def test_compose_pgd_at_igr_uses_the_adversarial_input(data):
    x, y = data
    model = _net()
    comp = create_regularizer(["pgd_at", "igr"], pgd_at={"steps": 2}, igr={"ig_steps": 2})
    igr = comp.terms[1]
    igr._adversary = lambda *a, **k: pytest.fail("IGR must use pgd_at's input when composed")
    _, term, logs, x_train = step_loss(comp, model, x, y)
    assert (x_train - x).abs().max() > 0 and term is not None and "igr_cos" in logs
    with pytest.raises(ValueError, match="at most one regularizer may replace"):
        Compose([PGDAdversarialTraining(), ART()])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: create_regularizer("nope"), "unknown regularizer `name`='nope'"),
        (lambda: InputGradient(weight=-1), "`weight` must be a number >= 0"),
        (lambda: InputGradient(norm="l3"), "`norm` must be"),
        (lambda: InputGradient(warmup_epochs=-2), "`warmup_epochs`"),
        (lambda: PGDAdversarialTraining(eps=-0.1), "eps"),
        (lambda: PGDAdversarialTraining(steps=-1), "steps"),
        (lambda: PGDAdversarialTraining(attack_mode="sometimes"), "`attack_mode`"),
        (lambda: PGDAdversarialTraining(threat="l7"), "threat"),
        (lambda: TRADES(eps="eight"), "eps|8/255"),
        (lambda: IGNorm(ig_steps=0), "ig_steps"),
        (lambda: ART(beta=0), "`beta`"),
        (lambda: SoftplusBeta(beta=-1), "`beta`"),
        (lambda: CURE(h=0), "`h`"),
        (lambda: Compose([]), "`terms`"),
        (lambda: create_regularizer(["pgd_at"], igr={}), "not in the list"),
        (lambda: SoftplusBeta().prepare_model(nn.Linear(2, 2)), "no nn.ReLU"),
    ],
)
def test_bad_arguments_fail_with_their_name(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_registry_covers_every_config_option():
    from pathlib import Path

    from fragdefense.cli._config import config_dir

    opts = {p.stem for p in (Path(config_dir()) / "regularizer").glob("*.yaml")}
    assert set(REGULARIZERS) <= opts
    for name in REGULARIZERS:
        cfg = compose_config("train", [f"regularizer={name}"])
        reg = instantiate(cfg.regularizer, _convert_="all")
        assert type(reg) is REGULARIZERS[name]
        # the config mirrors the constructor: every key is a constructor argument
        import inspect

        params = set(inspect.signature(REGULARIZERS[name]).parameters)
        assert set(cfg.regularizer) - {"_target_"} <= params


# ---------------------------------------------------------------- end to end

TINY = [
    "data.n_train=96",
    "data.n_test=32",
    "data.batch_size=32",
    "data.probe_size=8",
    "model.width=8",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "~callbacks.fragility",
    "~callbacks.progress_bar",
]


def test_train_with_composed_regularizer_logs_its_terms(tmp_path):
    cfg = compose_config(
        "train",
        [
            *TINY,
            "regularizer=pgd_at_igr",
            "regularizer.terms.0.steps=1",
            "regularizer.terms.1.ig_steps=2",
            f"run_dir={tmp_path}",
        ],
    )
    out = train(cfg)
    m = out["final_epoch_metrics"]
    assert out["regularizer"] == "compose"
    assert "train/reg/igr" in m and "train/reg/igr_cos" in m and "train/reg_term" in m


def test_softplus_beta_training_round_trips_through_the_checkpoint(tmp_path):
    cfg = compose_config("train", [*TINY, "regularizer=softplus_beta", "regularizer.beta=7", f"run_dir={tmp_path}"])
    out = train(cfg)
    model = load_checkpoint_model(out["last_checkpoint"])
    acts = [m for m in model.modules() if isinstance(m, nn.Softplus)]
    assert acts and all(a.beta == 7.0 for a in acts)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = create_model("small_cnn", num_classes=10, width=8, softplus_beta=7.0)
    assert sum(isinstance(m, nn.Softplus) for m in ref.modules()) == len(acts)


def test_max_samples_penalises_the_first_images_only(data):
    x, y = data
    model = _net()
    sub = SSR(max_samples=2).penalty(model, x, x, y, model(x)).penalty
    torch.testing.assert_close(sub, SSR().penalty(model, x[:2], x[:2], y[:2], model(x[:2])).penalty)
    xa = (x + 0.02).clamp(0, 1)
    torch.testing.assert_close(
        IGR(max_samples=2, ig_steps=3).penalty(model, x, xa, y, model(xa)).penalty,
        IGR(ig_steps=3).penalty(model, x[:2], xa[:2], y[:2], model(xa[:2])).penalty,
    )
    with pytest.raises(ValueError, match="`max_samples`"):
        SSR(max_samples=0)
