"""Attacks on interpretations (Ghorbani, Abid & Zou, Algorithm 1), batched and device-agnostic.

For a batch of images ``x_t`` with the original model's predicted labels ``c``, every attack ascends a
dissimilarity ``D`` between the map of the perturbed image and the original map, by steps
``x <- Proj(x + alpha * step(grad D))`` inside the eps-ball and ``[0, 1]``. The attacks are registered in
:mod:`fragdefense.attacks.registry` (``register_attack`` adds one); the built-in ones:

==================  ========================================================================
attack              D (ascended; ``I`` = normalised map of the softplus surrogate)
==================  ========================================================================
``topk``            ``-sum_{i in B} I(x)_i``, ``B`` = the ``k`` largest entries of the clean map
``mass_center``     ``|| C(I(x)) - C(I(x_t)) ||_2`` (centre of mass, pixels)
``targeted``        ``sum_{i in A} I(x)_i`` for a target region mask ``A``
``manipulate``      ``-( mean((HW I(x) - HW I_target)^2) + gamma ||p(x) - p(x_t)||^2 )`` (Dombrowski et al.)
``random_walk``     no gradient: steps along random sign directions (the authors' random baseline loop)
``random_sign``     one shot ``x_t + eps * sign(N(0, I))`` (the paper's random baseline)
==================  ========================================================================

Gradients go through :func:`fragdefense.models.softplus_surrogate`, which evaluates every ReLU *call* of the
model (modules, ``F.relu``, ``torch.relu``) as ``softplus(beta z) / beta`` (a ReLU network's map is piecewise
constant in ``x``, so its gradient is zero almost everywhere); ``beta`` is fixed or grows geometrically over the
iterations. A model with no ReLU is attacked through itself, with a warning naming the activations it calls.
An ascent gradient that is identically zero on every step is never reported as robustness: the image is
flagged (``zero_gradient``), a warning is raised and the summary carries it. A method without a differentiable
path (captum methods, user callables, or too costly to unroll) can be attacked through a ``surrogate`` method's
map (e.g. ``local_smooth`` via ``saliency``): the ascent direction then comes from the surrogate's map, while
the label check, the iterate selection and every metric use ``method``.
Every ``check_every`` steps (and at the last step) the iterate is checked on the *original*
network: its predicted label and its map. Among the checked iterates that keep the label, the one with
the best ``criterion`` is returned; if none keeps the label the clean image is returned
(``perturbed=False``). Images misclassified at the start (when labels ``y`` are given) are skipped and
counted. All reported metrics (:mod:`fragdefense.metrics.registry`) compare maps of the original network.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attacks.registry import (
    ATTACKS,
    CRITERIA,
    AttackContext,
    get_attack,
    get_criterion,
    list_attacks,
    topk_mask_of,
)
from fragdefense.attacks.threat import ThreatModel, make_threat
from fragdefense.attributions import resolve_attribution, to_map
from fragdefense.attributions.gradient import saliency
from fragdefense.attributions.registry import AttributionSpec
from fragdefense.metrics import functional as MF
from fragdefense.metrics.registry import compute_metrics
from fragdefense.models.outputs import OutputFn, check_logits, with_output
from fragdefense.models.softplus import set_softplus_beta
from fragdefense.models.surrogate import softplus_surrogate
from fragdefense.utils.checks import as_model_dtype, check_images, check_int_in_range
from fragdefense.utils.conventions import eval_mode, make_generator, parse_budget, randn, resolve_step_size

__all__ = [
    "INTERPRETATION_ATTACKS",
    "CRITERIA",
    "PROTOCOLS",
    "InterpretationAttackResult",
    "attack_interpretation",
    "beta_schedule",
]

#: the attack registry (name -> :class:`~fragdefense.attacks.registry.AttackSpec`; iterating yields names)
INTERPRETATION_ATTACKS = ATTACKS

#: Published protocols (see docs/background.md). Numbers from different protocols are not comparable.
PROTOCOLS: dict[str, dict[str, Any]] = {
    # Ghorbani et al. (ImageNet, pixels 0-255): alpha = 0.5/255, P = 300, no random start, beta = 1.
    "ghorbani": {"steps": 300, "step_size": 0.5 / 255, "random_start": False, "restarts": 1, "beta": 1.0},
    # IFIA as used by ART on CIFAR-10: top-k on IG (100 steps), k = 100, eps = 8/255, alpha = 1/255,
    # 50 iterations, uniform random start, softplus beta = 50, best iterate by Kendall tau.
    "ifia": {
        "attack": "topk",
        "method": "integrated_gradients",
        "method_opts": {"steps": 100},
        "k": 100,
        "eps": 8 / 255,
        "step_size": 1 / 255,
        "steps": 50,
        "random_start": True,
        "restarts": 1,
        "beta": 50.0,
        "criterion": "kendall",
    },
}
PROTOCOLS["rar"] = {**PROTOCOLS["ifia"], "restarts": 3}  # RAR (Chen et al.): IFIA with 3 restarts


def beta_schedule(beta: float | Sequence[float], steps: int) -> list[float]:
    """Per-step softplus beta: a number (fixed) or ``(start, end)`` growing geometrically.

    >>> [round(b) for b in beta_schedule((10, 100), 3)]
    [10, 32, 100]
    """
    if isinstance(beta, (int, float)):
        if not beta > 0:
            raise ValueError(f"`beta` must be > 0, got {beta!r}")
        return [float(beta)] * steps
    vals = [float(v) for v in beta]
    if len(vals) != 2 or min(vals) <= 0:
        raise ValueError(f"`beta` must be a number > 0 or a (start, end) pair of numbers > 0, got {beta!r}")
    if steps == 1:
        return [vals[1]]
    r = math.log(vals[1] / vals[0])
    return [vals[0] * math.exp(r * i / (steps - 1)) for i in range(steps)]


@dataclass
class InterpretationAttackResult:
    """Output of :func:`attack_interpretation`. Per-image tensors cover the *attacked* images only
    (``index`` gives their position in the input batch); ``x_adv`` covers the whole batch (the clean
    image where an image was skipped).

    ``perturbed`` is true where the returned image differs from the clean one; ``zero_gradient`` where the ascent
    gradient was identically zero on every step (the attack could not move the map: not evidence of
    robustness); ``warnings`` holds every such message."""

    x_adv: Tensor
    index: Tensor
    label: Tensor
    label_kept: Tensor
    perturbed: Tensor
    best_iter: Tensor
    clean_map: Tensor
    adv_map: Tensor
    metrics: dict[str, Tensor]
    n_images: int
    n_skipped: int
    protocol: dict[str, Any] = field(default_factory=dict)
    zero_gradient: Tensor | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def n_attacked(self) -> int:
        return int(self.index.numel())

    def summary(self) -> dict[str, Any]:
        """Means over the attacked images (plus counts, and ``zero_gradient_rate`` / ``warnings`` when the
        attack could not move some images)."""
        out: dict[str, Any] = {
            "n_images": self.n_images,
            "n_attacked": self.n_attacked,
            "n_skipped": self.n_skipped,
        }
        if self.n_attacked:
            out["label_kept_rate"] = float(self.label_kept.float().mean())
            out["perturbed_rate"] = float(self.perturbed.float().mean())
            if self.zero_gradient is not None:
                out["zero_gradient_rate"] = float(self.zero_gradient.float().mean())
            for k, v in self.metrics.items():
                out[k] = float(v.double().mean())
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out

    def records(self) -> list[dict[str, Any]]:
        """One dict per attacked image: its batch index, label, flags and metric values."""
        rows = []
        for j in range(self.n_attacked):
            row = {
                "index": int(self.index[j]),
                "label": int(self.label[j]),
                "label_kept": bool(self.label_kept[j]),
                "perturbed": bool(self.perturbed[j]),
                "best_iter": int(self.best_iter[j]),
            }
            if self.zero_gradient is not None:
                row["zero_gradient"] = bool(self.zero_gradient[j])
            row.update({k: float(v[j]) for k, v in self.metrics.items()})
            rows.append(row)
        return rows


class _Maps:
    """Map and label of the *original* network at ``x`` (one pass for saliency)."""

    def __init__(self, model: nn.Module, method: AttributionSpec, opts: dict[str, Any], reduce: str) -> None:
        self.model, self.method, self.opts, self.reduce = model, method, opts, reduce
        self.fused = method.fn is saliency and set(opts) <= {"abs"}

    def __call__(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if self.fused:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                logits = self.model(xg)
                (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xg)
            if self.opts.get("abs"):
                g = g.abs()
            return to_map(g, self.reduce).detach(), logits.detach().argmax(1)
        with torch.no_grad():
            pred = self.model(x).argmax(1)
        return to_map(self.method(self.model, x, target, **self.opts), self.reduce).detach(), pred


def _make_surrogate(model: nn.Module, beta: float) -> nn.Module:
    """The surrogate the ascent differentiates (module-level so ``benchmarks/bench_attacks.py`` can time the
    module-swap form against it in one run)."""
    return softplus_surrogate(model, beta)


def _ascent_grad(loss: Tensor, xg: Tensor) -> Tensor:
    """``d loss / d xg``, zeros where ``loss`` does not depend on ``xg`` (e.g. a linear model's saliency)."""
    if not loss.requires_grad:
        return torch.zeros_like(xg)
    (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
    return torch.zeros_like(xg) if g is None else g


def attack_interpretation(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    attack: str = "topk",
    method: str | Any = "saliency",
    method_opts: dict[str, Any] | None = None,
    surrogate: str | Any | None = None,
    surrogate_opts: dict[str, Any] | None = None,
    eps: float | str = 8 / 255,
    step_size: float | str | None = None,
    steps: int = 50,
    restarts: int = 1,
    random_start: bool = False,
    k: int = 100,
    criterion: str = "auto",
    beta: float | Sequence[float] = 50.0,
    threat: str | ThreatModel = "linf",
    target_mask: Tensor | None = None,
    target_map: Tensor | None = None,
    gamma: float = 10.0,
    reduce: str = "abs_sum",
    lens_window: int = 1,
    check_every: int = 1,
    generator: torch.Generator | int | Sequence[torch.Generator | int] | None = None,
    output_fn: OutputFn | None = None,
    attack_opts: dict[str, Any] | None = None,
    progress: bool = False,
) -> InterpretationAttackResult:
    """Attack the interpretation of ``model`` on a batch (Ghorbani et al., Algorithm 1).

    Args:
        model: any classifier ``nn.Module``, images in ``[0, 1]`` -> logits. It is run in eval mode (every
            submodule's mode is restored afterwards); its parameters' gradients are not touched.
        x: images ``(B, C, H, W)`` in ``[0, 1]``.
        y: true labels ``(B,)``; images the model misclassifies are skipped and counted. ``None``: attack all.
        attack: a registered attack (:func:`~fragdefense.attacks.list_attacks`): ``topk``, ``mass_center``,
            ``targeted``, ``manipulate``, ``random_walk``, ``random_sign`` or one added by ``register_attack``.
        method: the explainer: a registered attribution name (:func:`fragdefense.attributions.list_attributions`),
            a callable ``f(model, x, target) -> (B, C, H, W)`` or a captum ``Attribution`` object;
            ``method_opts`` its options (e.g. ``{"steps": 100}`` for IG). Gradient attacks need a method that
            supports ``create_graph``, or a ``surrogate``.
        surrogate: optional differentiable explainer whose map (on the softplus surrogate, ``create_graph=True``)
            gives the ascent direction instead of ``method``'s (a transfer / surrogate-gradient attack);
            ``surrogate_opts`` its options. ``None`` (default): ``method`` itself. Recorded in the protocol.
        eps: budget in pixel units of ``[0, 1]`` images (L-inf or L2 per ``threat``): a number or ``"8/255"``.
        step_size: alpha (default ``2.5 * eps / steps``, the shared rule of docs/conventions.md); ``steps``:
            iterations P; ``restarts``: independent runs.
        random_start: start each run at a uniform random point of the eps-ball.
        k: top-k size for the ``topk`` attack and the top-k / LENS metrics.
        criterion: best-iterate selection (``auto``: the attack's registered default: top-k intersection for
            ``topk`` and the random attacks, centre shift for ``mass_center``, target mass / MSE for targeted
            attacks); or ``kendall`` (IFIA), ``spearman``, ``dissimilarity`` (the attack's own objective), or a
            name added by ``register_criterion``.
        beta: softplus surrogate sharpness, fixed or ``(start, end)`` (geometric growth, Dombrowski et al.).
        threat: ``"linf"``, ``"l2"`` or a :class:`~fragdefense.attacks.ThreatModel`.
        target_mask: ``(B, H, W)`` region ``A`` for ``targeted``; ``target_map``: ``(B, H, W)`` map for
            ``manipulate`` (normalised to sum 1 internally); ``gamma``: output-preservation weight there.
        reduce: channel reduction of :func:`~fragdefense.attributions.to_map`.
        lens_window: window half-width of the reported LENS recall.
        check_every: check label and criterion on the original network every N steps (1 = every step,
            as the authors; larger is faster). The last step is always checked.
        generator: seed (``int``) or ``torch.Generator`` for random starts / directions (``None``: global RNG), or
            a list with one seed / generator per image of ``x`` (each image then draws its own random numbers, so
            its result does not depend on the batch it is attacked in).
        output_fn: for models whose ``forward`` returns a tuple / dict / dataclass: an index, a key or a
            callable selecting the logits.
        attack_opts: free-form options of a user-registered attack (``ctx.extra`` of its objective).
        progress: show a progress bar over the iterations.

    Returns:
        :class:`InterpretationAttackResult` with ``metrics`` (original-network maps, clean vs returned): every
        metric of :func:`fragdefense.metrics.registry.list_metrics` that applies (``topk_intersection``,
        ``spearman``, ``kendall``, ``center_shift``, ``lens_recall``, and ``target_mass`` / ``target_mse`` for
        targeted attacks), plus ``linf_distance``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> from fragdefense.models import create_model
        >>> net = create_model("small_cnn", num_classes=10, width=4)
        >>> res = attack_interpretation(net, torch.rand(2, 3, 16, 16), attack="topk", eps="4/255",
        ...                             steps=3, k=20, beta=10.0)
        >>> res.x_adv.shape, bool(res.label_kept.all())
        (torch.Size([2, 3, 16, 16]), True)
    """
    spec = get_attack(attack)
    mspec = resolve_attribution(method, "method")
    opts = dict(method_opts or {})
    x = as_model_dtype(check_images(x, "x"), model)
    if x.shape[0] == 0:
        raise ValueError(f"`x` must be a non-empty batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    eps = parse_budget(eps, "eps")
    steps = check_int_in_range(steps, "steps", 1)
    restarts = check_int_in_range(restarts, "restarts", 1)
    check_every = check_int_in_range(check_every, "check_every", 1)
    k = check_int_in_range(k, "k", 1, h * w)
    alpha = resolve_step_size(step_size, eps, steps)
    thr = threat if isinstance(threat, ThreatModel) else make_threat(threat, eps)
    if thr.eps != eps:
        raise ValueError(f"`threat` has eps={thr.eps} but `eps`={eps}")
    gradient_attack = spec.needs_gradient
    gspec = mspec if surrogate is None else resolve_attribution(surrogate, "surrogate")
    grad_opts = opts if surrogate is None else dict(surrogate_opts or {})
    if gradient_attack and not gspec.create_graph:
        raise ValueError(
            f"attack {attack!r} back-propagates through the map, but "
            f"`{'method' if surrogate is None else 'surrogate'}`={gspec.name!r} does not support "
            f"create_graph; use a gradient-free attack ({', '.join(list_attacks(needs_gradient=False))}), a "
            "differentiable method, or a differentiable `surrogate`"
        )
    if y is not None:
        if not isinstance(y, Tensor) or y.shape != (b,):
            raise ValueError(f"`y` must be a LongTensor of shape ({b},), got {getattr(y, 'shape', type(y))}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"`y` must hold integer class labels, got dtype {y.dtype}")
        y = y.to(x.device)
    for name, t in (("target_mask", target_mask), ("target_map", target_map)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (b, h, w)):
            raise ValueError(f"`{name}` must have shape ({b}, {h}, {w}), got {getattr(t, 'shape', type(t))}")
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"`{name}` must be finite (no NaN or Inf)")
    for req in spec.requires:
        if {"target_mask": target_mask, "target_map": target_map}[req] is None:
            raise ValueError(f"attack {attack!r} needs `{req}` of shape (B, H, W) = ({b}, {h}, {w})")
    crit_name = spec.criterion if criterion == "auto" else criterion
    get_criterion(crit_name)
    betas = beta_schedule(beta, steps)
    generator = make_generator(generator, x.device)
    if isinstance(generator, list) and len(generator) != b:
        raise ValueError(f"`generator` as a list must hold one seed or generator per image ({b}), got {len(generator)}")
    net = with_output(model, output_fn)

    protocol = {
        "attack": attack,
        "method": mspec.name,
        "method_opts": opts,
        **({"surrogate": gspec.name, "surrogate_opts": grad_opts} if surrogate is not None else {}),
        "eps": eps,
        "step_size": alpha,
        "steps": steps,
        "restarts": restarts,
        "random_start": bool(random_start),
        "k": k,
        "criterion": crit_name,
        "beta": beta if isinstance(beta, (int, float)) else list(beta),
        "threat": thr.name,
        "reduce": reduce,
        "lens_window": lens_window,
        "check_every": check_every,
    }
    gamma = float(gamma)
    random_start = bool(random_start)
    notes: list[str] = []
    with eval_mode(model):
        relu_maps = _Maps(net, mspec, opts, reduce)
        with torch.no_grad():
            logits0 = check_logits(net(x), b, "model" if output_fn is None else "output_fn(model(x))")
        pred0 = logits0.argmax(1)
        if y is not None and ((y < 0) | (y >= logits0.shape[1])).any():
            raise ValueError(f"`y` must hold class labels in [0, {logits0.shape[1] - 1}], got {y.tolist()}")
        active = torch.ones(b, dtype=torch.bool, device=x.device) if y is None else pred0 == y
        index = active.nonzero().flatten()
        x_adv_full = x.detach().clone()
        if index.numel() == 0:
            empty = torch.empty(0, device=x.device)
            return InterpretationAttackResult(
                x_adv_full,
                index,
                pred0[index],
                empty.bool(),
                empty.bool(),
                empty.long(),
                x.new_zeros(0, h, w),
                x.new_zeros(0, h, w),
                {},
                b,
                b,
                protocol,
                empty.bool(),
                ["no image was attacked: the model misclassifies every image of the batch"],
            )
        x0, c = x[index].detach(), pred0[index]
        if isinstance(generator, list):  # per-image generators: keep those of the attacked images
            generator = [generator[i] for i in index.tolist()]
        tmask = target_mask[index].to(x) if target_mask is not None else None
        tmap = target_map[index].to(x) if target_map is not None else None
        if tmap is not None:
            tmap = tmap / tmap.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1)
        clean_map, _ = relu_maps(x0, c)
        with torch.no_grad():
            p0 = F.softmax(net(x0), dim=1) if spec.uses_logits else None
        ctx = AttackContext(
            clean_map=clean_map,
            topk_mask=topk_mask_of(clean_map, k),
            clean_center=MF.center_of_mass(clean_map),
            k=k,
            target_mask=tmask,
            target_map=tmap,
            clean_probs=p0,
            gamma=gamma,
            extra=dict(attack_opts or {}),
            objective=spec.objective,
        )
        crit_fn = get_criterion(crit_name)
        n = x0.shape[0]
        best_x = x0.clone()
        best_score = torch.full((n,), -math.inf, device=x.device, dtype=torch.float64)
        best_iter = torch.full((n,), -1, dtype=torch.long, device=x.device)
        moved_grad = torch.zeros(n, dtype=torch.bool, device=x.device)
        soft = _make_surrogate(net, betas[0]) if gradient_attack else None

        def consider(xc: Tensor, it: int) -> None:
            m, pred = relu_maps(xc, c)
            keep = pred == c
            s = crit_fn(m, ctx).double()
            better = keep & (s > best_score)
            best_score[better] = s[better]
            best_iter[better] = it
            best_x[better] = xc[better].detach()

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=restarts * (1 if spec.one_shot else steps), desc=f"{attack}/{mspec.name}", leave=False)
        try:
            for r in range(restarts):
                if spec.one_shot:
                    noise = randn(x0.shape, generator, x.device, x.dtype)
                    consider(thr.project(x0 + thr.eps * noise.sign(), x0), r)
                    if bar is not None:
                        bar.update(1)
                    continue
                xi = thr.random_start(x0, generator) if random_start else x0.clone()
                for p in range(steps):
                    if gradient_attack:
                        assert soft is not None
                        set_softplus_beta(soft, betas[p])
                        xg = xi.detach().requires_grad_(True)
                        m = to_map(gspec(soft, xg, c, create_graph=True, **grad_opts), reduce)
                        if r == 0 and p == 0 and getattr(soft, "n_relu_calls", 1) == 0:
                            notes.append(
                                "softplus surrogate: the model calls no ReLU (activations found: "
                                f"{soft.describe_activations()}); the ascent uses the model itself"
                            )
                        ctx.logits = soft(xg) if spec.uses_logits else None
                        g = _ascent_grad(spec.objective(m, ctx).sum(), xg)
                        ctx.logits = None
                        moved_grad |= g.flatten(1).abs().amax(1) > 0
                    else:
                        g = thr.random_direction(x0, generator)
                    xi = thr.project(thr.step(xi.detach(), g, alpha), x0)
                    if (p + 1) % check_every == 0 or p == steps - 1:
                        consider(xi, r * steps + p + 1)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()

        adv_map, pred_adv = relu_maps(best_x, c)
        metric_opts = {"k": k, "window": lens_window, "target_mask": tmask, "target_map": tmap}
        metrics = compute_metrics(adv_map, clean_map, metric_opts)
        metrics["linf_distance"] = (best_x - x0).flatten(1).abs().amax(1)
        zero_grad = ~moved_grad if gradient_attack else torch.zeros(n, dtype=torch.bool, device=x.device)
        if bool(zero_grad.any()):
            notes.append(
                f"{int(zero_grad.sum())} of {n} images: the ascent gradient of attack {attack!r} on "
                f"{gspec.name!r} was identically zero on every step, so the attack could not move their maps; "
                "their metrics are NOT evidence of robustness (a piecewise-linear model without smoothing, or an "
                "explainer whose map does not depend on the input)"
            )
        for msg in notes:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        x_adv_full[index] = best_x
        return InterpretationAttackResult(
            x_adv=x_adv_full,
            index=index,
            label=c,
            label_kept=pred_adv == c,
            perturbed=(best_x != x0).flatten(1).any(1),
            best_iter=best_iter,
            clean_map=clean_map,
            adv_map=adv_map,
            metrics={k_: v.detach() for k_, v in metrics.items()},
            n_images=b,
            n_skipped=b - int(index.numel()),
            protocol=protocol,
            zero_gradient=zero_grad,
            warnings=notes,
        )
