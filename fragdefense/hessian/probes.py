"""Probes of the geometric explanation of fragility (Ghorbani et al.; ``docs/background.md`` §6).

A perturbation ``delta`` moves the input gradient of the logit ``s_c`` by ``H delta + O(|delta|^2)`` (``H`` its
input Hessian; zero almost everywhere for a ReLU network, so the probes use the softplus(beta) surrogate).
The saliency map should therefore change most along the top eigenvectors of ``H`` while the prediction barely
moves (first order: ``s_c`` changes by ``g . delta``). These probes measure that:

* :func:`input_top_eigen` — top input-Hessian eigenpairs of every image of a batch (batched Lanczos).
* :func:`map_change_along_directions` — gradient / map change along the top eigenvectors versus random
  directions of the same L2 norm, at several radii.
* :func:`eigenvalues_vs_beta` — how the top eigenvalue scales with the softplus beta.
* :func:`fragility_vs_curvature` — per-image ``lambda_max`` against the top-k intersection left by the
  top-k attack (:func:`fragdefense.attacks.attack_interpretation`), with their Spearman correlation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fragdefense.attributions import to_map
from fragdefense.hessian.eigen import EigenResult, Which, lanczos
from fragdefense.hessian.hvp import OBJECTIVES, Objective, check_model_inputs, eval_mode, input_hessian
from fragdefense.metrics import functional as MF
from fragdefense.models.surrogate import softplus_surrogate
from fragdefense.utils.checks import check_choice, check_finite_float, check_images, check_int_in_range
from fragdefense.utils.conventions import make_generator, parse_budget

__all__ = [
    "input_top_eigen",
    "DirectionProbe",
    "map_change_along_directions",
    "eigenvalues_vs_beta",
    "fragility_vs_curvature",
    "spearman_1d",
    "surrogate",
]


def surrogate(model: nn.Module, beta: float | None) -> nn.Module:
    """The softplus(beta) surrogate of ``model`` (:func:`fragdefense.models.softplus_surrogate`: every ReLU call,
    module or functional, smoothed; parameters shared). ``beta=None``: ``model`` itself; a model that calls no
    ReLU is evaluated unchanged by the surrogate."""
    if beta is None:
        return model
    return softplus_surrogate(model, float(beta))


def spearman_1d(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D samples (average ranks for ties; NaN for fewer than 3 pairs).

    >>> spearman_1d(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 25.0, 40.0]))
    1.0
    """
    a, b = a.flatten().double(), b.flatten().double()
    if a.numel() != b.numel():
        raise ValueError(f"samples must have equal length, got {a.numel()} and {b.numel()}")
    ok = torch.isfinite(a) & torch.isfinite(b)
    if int(ok.sum()) < 3:
        return math.nan
    return float(MF.spearman(a[ok][None], b[ok][None])[0])


def _predicted(model: nn.Module, x: Tensor) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return model(x).argmax(1)


def input_top_eigen(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    *,
    objective: Objective = "logit",
    y: Tensor | None = None,
    k: int = 1,
    which: Which = "LM",
    max_iter: int = 40,
    tol: float = 1e-3,
    backend: str = "autograd",
    generator: torch.Generator | int | None = None,
) -> EigenResult:
    """Top-``k`` eigenpairs of each image's input Hessian (all images in one batched Lanczos run).

    ``which="LM"`` (default) ranks by magnitude: the eigenvalues that move the gradient most. Eigenvectors are
    ``(B, k, C*H*W)``. Use a smooth model (e.g. :func:`surrogate` of a ReLU network).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Softplus(beta=5.0), nn.Linear(8, 3)).double()
        >>> x = torch.rand(4, 3, 2, 2, dtype=torch.float64)
        >>> r = input_top_eigen(net, x, target=0, tol=1e-10)
        >>> H = torch.autograd.functional.hessian(lambda z: net(z[None])[0, 0], x[1])
        >>> lam = torch.linalg.eigvalsh(H.reshape(12, 12))
        >>> bool(torch.isclose(r.eigenvalues[1, 0].abs(), lam.abs().max()))
        True
    """
    op = input_hessian(model, x, target, objective=objective, y=y, backend=backend)  # type: ignore[arg-type]
    return lanczos(op, k, max_iter=max_iter, tol=tol, which=which, generator=generator)


@dataclass
class DirectionProbe:
    """Result of :func:`map_change_along_directions`.

    Per-image tensors ``(B, n_directions, n_radii)``: ``grad_change`` (``||g(x + r d) - g(x)|| / ||g(x)||``,
    raw input gradient of the logit on the surrogate), ``map_change`` (L1 distance of the normalised maps, in
    ``[0, 2]``), ``topk_intersection`` (of the normalised maps), ``logit_change`` (``|s_c(x + r d) - s_c(x)|``)
    and ``label_kept`` (surrogate's prediction unchanged). ``kinds`` names each direction (``"eig1+"``,
    ``"eig1-"``, ..., ``"random"``), ``eigenvalues (B, k)`` the input-Hessian eigenvalues used.
    """

    radii: list[float]
    kinds: list[str]
    eigenvalues: Tensor
    grad_norm: Tensor
    metrics: dict[str, Tensor]
    beta: float | None
    k: int
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Per radius: mean of every metric over images along the top eigenvector(s) and along random directions,
        and the ratios ``eigen / random`` (of the means, and the median of the per-image ratios)."""
        eig = torch.tensor([not kd.startswith("random") for kd in self.kinds])
        out: dict[str, Any] = {
            "radii": self.radii,
            "beta": self.beta,
            "k": self.k,
            "n_images": int(self.eigenvalues.shape[0]),
        }
        per_radius = []
        for ri, r in enumerate(self.radii):
            row: dict[str, Any] = {"radius": r}
            for name, t in self.metrics.items():
                v = t[:, :, ri].double()
                e, rnd = v[:, eig].mean(1), v[:, ~eig].mean(1)
                row[f"{name}_eigen"] = float(e.mean())
                row[f"{name}_random"] = float(rnd.mean())
                if name in ("grad_change", "map_change", "logit_change"):
                    row[f"{name}_ratio"] = float(e.mean() / rnd.mean().clamp_min(1e-300))
                    row[f"{name}_ratio_median"] = float((e / rnd.clamp_min(1e-300)).median())
            per_radius.append(row)
        out["per_radius"] = per_radius
        out["abs_lambda_max_mean"] = float(self.eigenvalues[:, 0].abs().double().mean())
        out["abs_lambda_max_median"] = float(self.eigenvalues[:, 0].abs().double().median())
        return out


def _grads(model: nn.Module, x: Tensor, target: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Input gradient of the target logit, the logit, and the prediction, in chunks (no range check)."""
    gs, ss, ps = [], [], []
    for xb, tb in zip(x.split(chunk), target.split(chunk)):
        with torch.enable_grad():
            xg = xb.detach().requires_grad_(True)
            logits = model(xg)
            s = logits.gather(1, tb[:, None])[:, 0]
            (g,) = torch.autograd.grad(s.sum(), xg)
        gs.append(g.detach())
        ss.append(s.detach())
        ps.append(logits.detach().argmax(1))
    return torch.cat(gs), torch.cat(ss), torch.cat(ps)


def map_change_along_directions(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None = None,
    *,
    beta: float | None = 10.0,
    radii: Sequence[float | str] = (0.05, 0.1, 0.2, 0.5, 1.0),
    k_eig: int = 1,
    n_random: int = 8,
    topk: int = 100,
    reduce: str = "abs_sum",
    max_iter: int = 40,
    tol: float = 1e-3,
    chunk: int = 256,
    generator: torch.Generator | int | None = None,
) -> DirectionProbe:
    """How much the saliency map changes along the top input-Hessian eigenvectors versus random directions.

    For each image, the top ``k_eig`` (largest-magnitude) eigenvectors ``v`` of the input Hessian of the logit
    ``s_c`` (``c`` = the prediction of ``model`` unless ``target`` is given) of the softplus(``beta``)
    surrogate are taken in both signs, and ``n_random`` Gaussian directions normalised to unit L2 norm; each
    direction ``d`` is applied as ``x + r d`` for every radius ``r`` (L2, pixel units of ``[0, 1]`` images; no
    clipping to the pixel range, which would change the direction). Maps and gradients are those of the
    surrogate, whose map is the one that varies smoothly (the ReLU network's map is piecewise constant).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> from fragdefense.models import create_model
        >>> net = create_model("small_cnn", num_classes=10, width=4).eval()
        >>> p = map_change_along_directions(net, torch.rand(3, 3, 8, 8), radii=(0.1,), n_random=2, topk=10,
        ...                                 generator=0)
        >>> p.metrics["grad_change"].shape, p.kinds
        (torch.Size([3, 4, 1]), ['eig1+', 'eig1-', 'random', 'random'])
    """
    x, target, _ = check_model_inputs(model, check_images(x, "x"), target)
    k_eig = check_int_in_range(k_eig, "k_eig", 1)
    n_random = check_int_in_range(n_random, "n_random", 1)
    radii = [parse_budget(r, "radii") for r in radii]  # L2 lengths in pixel units: numbers or "8/255"
    if not radii or min(radii) <= 0:
        raise ValueError(f"`radii` must be a non-empty list of numbers > 0, got {radii}")
    b, c, h, w = x.shape
    topk = check_int_in_range(topk, "topk", 1, h * w)
    gen = make_generator(generator, x.device)
    soft = surrogate(model, beta)
    x = x.detach()
    if target is None:
        target = _predicted(model, x)
    with eval_mode(soft):
        eig = input_top_eigen(soft, x, target, k=k_eig, which="LM", max_iter=max_iter, tol=tol, generator=gen)
        assert eig.eigenvectors is not None
        vecs = eig.eigenvectors.view(b, k_eig, c, h, w)
        rnd = torch.randn(b, n_random, c, h, w, generator=gen, device=x.device, dtype=x.dtype)
        rnd = rnd / rnd.flatten(2).norm(dim=2)[:, :, None, None, None]
        dirs = torch.cat([torch.stack([vecs, -vecs], 2).flatten(1, 2), rnd], 1)  # (B, D, C, H, W)
        kinds = [f"eig{i + 1}{s}" for i in range(k_eig) for s in "+-"] + ["random"] * n_random
        nd, nr = dirs.shape[1], len(radii)
        rr = torch.tensor(radii, dtype=x.dtype, device=x.device)
        xp = x[:, None, None] + rr[None, None, :, None, None, None] * dirs[:, :, None]  # (B, D, R, C, H, W)
        tgt = target[:, None, None].expand(b, nd, nr).reshape(-1)
        g0, s0, p0 = _grads(soft, x, target, chunk)
        gp, sp, pp = _grads(soft, xp.reshape(-1, c, h, w), tgt, chunk)
    gp = gp.view(b, nd, nr, c, h, w)
    g0n = g0.flatten(1).norm(dim=1).clamp_min(1e-30)
    grad_change = (gp - g0[:, None, None]).flatten(3).norm(dim=3) / g0n[:, None, None]
    m0 = to_map(g0, reduce)
    mp = to_map(gp.reshape(-1, c, h, w), reduce)
    m0r = m0[:, None, None].expand(b, nd, nr, h, w).reshape(-1, h, w)
    map_change = (mp - m0r).abs().flatten(1).sum(1).view(b, nd, nr)
    inter = MF.topk_intersection(mp, m0r, topk).view(b, nd, nr)
    logit_change = (sp.view(b, nd, nr) - s0[:, None, None]).abs()
    kept = (pp.view(b, nd, nr) == p0[:, None, None]).float()
    return DirectionProbe(
        radii=radii,
        kinds=kinds,
        eigenvalues=eig.eigenvalues.detach(),
        grad_norm=g0n.detach(),
        metrics={
            "grad_change": grad_change,
            "map_change": map_change,
            "topk_intersection": inter,
            "logit_change": logit_change,
            "label_kept": kept,
        },
        beta=beta,
        k=topk,
        extra={"lanczos_iters": eig.n_iter, "converged_rate": float(eig.converged.float().mean())},
    )


def eigenvalues_vs_beta(
    model: nn.Module,
    x: Tensor,
    betas: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0),
    target: Tensor | None = None,
    *,
    objective: Objective = "logit",
    y: Tensor | None = None,
    which: Which | None = None,
    max_iter: int = 40,
    tol: float = 1e-3,
    generator: int = 0,
) -> dict[str, Any]:
    """Top input-Hessian eigenvalue of every image for the softplus(beta) surrogate of ``model`` at each beta.

    ``objective="logit"`` ranks by magnitude (``which="LM"``), ``"loss"`` takes the largest algebraic value
    (``"LA"``; the loss Hessian of a piecewise-linear net, ``W^T (diag p - p p^T) W``, is positive semi-definite).
    Returns ``{"betas", "eigenvalues": [[per image] per beta], "abs_mean", "abs_median", "slope"}`` where
    ``slope`` is the least-squares slope of ``log median |lambda|`` against ``log beta``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> from fragdefense.models import create_model
        >>> net = create_model("small_cnn", num_classes=10, width=4).eval()
        >>> out = eigenvalues_vs_beta(net, torch.rand(2, 3, 8, 8), betas=(1.0, 10.0))
        >>> len(out["eigenvalues"]), len(out["eigenvalues"][0])
        (2, 2)
    """
    check_choice(objective, "objective", OBJECTIVES)
    which = which or ("LM" if objective == "logit" else "LA")
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or not betas:
        raise ValueError(f"`betas` must be a non-empty list of numbers > 0, got {betas!r}")
    betas = [check_finite_float(b, "betas", 0.0, lo_open=True) for b in betas]
    if objective == "loss" and y is None:
        raise ValueError("objective 'loss' needs the labels `y` (B,)")
    x, target, y = check_model_inputs(model, check_images(x, "x"), target, y)
    x = x.detach()
    if target is None and objective == "logit":
        target = _predicted(model, x)
    vals, iters = [], []
    for bt in betas:
        soft = surrogate(model, float(bt))
        r = input_top_eigen(
            soft, x, target, objective=objective, y=y, k=1, which=which, max_iter=max_iter, tol=tol, generator=generator
        )
        vals.append(r.eigenvalues[:, 0].detach().double().cpu())
        iters.append(r.n_iter)
    v = torch.stack(vals)  # (n_beta, B)
    med = v.abs().median(1).values
    lb, lm = torch.log(torch.tensor([float(b) for b in betas], dtype=torch.float64)), torch.log(med.clamp_min(1e-300))
    slope = (
        float(((lb - lb.mean()) * (lm - lm.mean())).sum() / ((lb - lb.mean()) ** 2).sum())
        if len(betas) > 1
        else math.nan
    )
    return {
        "betas": [float(b) for b in betas],
        "objective": objective,
        "which": which,
        "eigenvalues": v.tolist(),
        "abs_mean": v.abs().mean(1).tolist(),
        "abs_median": med.tolist(),
        "slope": slope,
        "lanczos_iters": iters,
    }


def fragility_vs_curvature(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 10.0,
    objective: Objective = "logit",
    attack: dict[str, Any] | None = None,
    max_iter: int = 40,
    tol: float = 1e-3,
    generator: int = 0,
) -> dict[str, Any]:
    """Per image: ``lambda_max`` of the softplus(``beta``) surrogate's input Hessian (of the predicted logit,
    largest magnitude; or of the loss, largest algebraic) and the top-k intersection left by the top-k attack
    on the saliency map (:func:`fragdefense.attacks.attack_interpretation`, options ``attack``; default eps
    8/255, 30 steps of 0.5/255, k = 100, the same beta); their Spearman correlation across images, also for
    ``|lambda_max| / ||grad||`` (the normalised map moves by ``H delta / ||g||``).

    Only the images ``model`` classifies correctly are attacked (as the attack's protocol).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> from fragdefense.models import create_model
        >>> net = create_model("small_cnn", num_classes=10, width=4).eval()
        >>> x = torch.rand(4, 3, 8, 8)
        >>> out = fragility_vs_curvature(net, x, net(x).argmax(1), attack={"steps": 2, "k": 10})
        >>> len(out["lambda_max"]) == len(out["topk_intersection"]) == 4
        True
    """
    from fragdefense.attacks import attack_interpretation

    check_choice(objective, "objective", OBJECTIVES)
    check_finite_float(beta, "beta", 0.0, lo_open=True)
    if y is None:
        raise ValueError("`y` must be a LongTensor of labels (B,): only correctly classified images are attacked")
    x, _, y = check_model_inputs(model, check_images(x, "x"), None, y)
    opts: dict[str, Any] = {"eps": 8 / 255, "steps": 30, "step_size": 0.5 / 255, "k": 100, "beta": beta}
    opts.update(attack or {})
    x = x.detach()
    res = attack_interpretation(model, x, y, attack="topk", method="saliency", generator=generator, **opts)
    idx = res.index
    soft = surrogate(model, beta)
    xs, c = x[idx], res.label
    which: Which = "LM" if objective == "logit" else "LA"
    lam = torch.empty(0)
    gnorm = torch.empty(0)
    if idx.numel():
        r = input_top_eigen(
            soft, xs, c, objective=objective, y=c, k=1, which=which, max_iter=max_iter, tol=tol, generator=generator
        )
        lam = r.eigenvalues[:, 0].detach().double().cpu()
        g, _, _ = _grads(soft, xs, c, 256)
        gnorm = g.flatten(1).norm(dim=1).double().cpu()
    inter = res.metrics["topk_intersection"].double().cpu() if idx.numel() else torch.empty(0)
    spear = res.metrics["spearman"].double().cpu() if idx.numel() else torch.empty(0)
    rel = lam.abs() / gnorm.clamp_min(1e-30)
    return {
        "beta": beta,
        "objective": objective,
        "protocol": res.protocol,
        "image_index": idx.cpu().tolist(),
        "lambda_max": lam.tolist(),
        "grad_norm": gnorm.tolist(),
        "topk_intersection": inter.tolist(),
        "map_spearman": spear.tolist(),
        "n_attacked": res.n_attacked,
        "n_skipped": res.n_skipped,
        "label_kept_rate": float(res.label_kept.float().mean()) if idx.numel() else math.nan,
        "mean_abs_lambda_max": float(lam.abs().mean()) if idx.numel() else math.nan,
        "mean_topk_intersection": float(inter.mean()) if idx.numel() else math.nan,
        "spearman_abs_lambda_vs_topk": spearman_1d(lam.abs(), inter),
        "spearman_rel_lambda_vs_topk": spearman_1d(rel, inter),
        "spearman_abs_lambda_vs_map_spearman": spearman_1d(lam.abs(), spear),
    }
