"""Attacks on interpretations (Ghorbani, Abid & Zou, Algorithm 1), batched and device-agnostic.

For a batch of images ``x_t`` with the original (ReLU) model's predicted labels ``c``, every attack
ascends a dissimilarity ``D`` between the map of the perturbed image and the original map, by steps
``x <- Proj(x + alpha * sign(grad D))`` inside the eps-ball and ``[0, 1]``:

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

Gradients go through :func:`fragdefense.models.to_softplus` (a ReLU network's map is piecewise constant
in ``x``, so its gradient is zero almost everywhere); ``beta`` is fixed or grows geometrically over the
iterations. A method without a differentiable path (or too costly to unroll) can be attacked through a
``surrogate`` method's map (e.g. ``local_smooth`` via ``saliency``): the ascent direction then comes from the
surrogate's map, while the label check, the iterate selection and every metric use ``method``.
Every ``check_every`` steps (and at the last step) the iterate is checked on the *original*
network: its predicted label and its map. Among the checked iterates that keep the label, the one with
the best ``criterion`` is returned; if none keeps the label the clean image is returned
(``perturbed=False``). Images misclassified at the start (when labels ``y`` are given) are skipped and
counted. All reported metrics compare maps of the original network.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attacks.threat import ThreatModel, make_threat
from fragdefense.attributions import attribute, get_attribution, supports_create_graph, to_map
from fragdefense.metrics import functional as MF
from fragdefense.models.softplus import set_softplus_beta, to_softplus
from fragdefense.utils.checks import check_images, check_int_in_range, check_nonneg_float

__all__ = [
    "INTERPRETATION_ATTACKS",
    "CRITERIA",
    "PROTOCOLS",
    "InterpretationAttackResult",
    "attack_interpretation",
    "beta_schedule",
]

INTERPRETATION_ATTACKS = ("topk", "mass_center", "targeted", "manipulate", "random_walk", "random_sign")
CRITERIA = ("topk", "kendall", "spearman", "center_shift", "target_mass", "target_mse", "dissimilarity")
_AUTO_CRITERION = {
    "topk": "topk",
    "mass_center": "center_shift",
    "targeted": "target_mass",
    "manipulate": "target_mse",
    "random_walk": "topk",
    "random_sign": "topk",
}

#: Published protocols (REFERENCE.md section 2). Numbers from different protocols are not comparable.
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
    image where an image was skipped)."""

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

    @property
    def n_attacked(self) -> int:
        return int(self.index.numel())

    def summary(self) -> dict[str, float | int]:
        """Means over the attacked images (plus counts)."""
        out: dict[str, float | int] = {
            "n_images": self.n_images,
            "n_attacked": self.n_attacked,
            "n_skipped": self.n_skipped,
        }
        if self.n_attacked:
            out["label_kept_rate"] = float(self.label_kept.float().mean())
            out["perturbed_rate"] = float(self.perturbed.float().mean())
            for k, v in self.metrics.items():
                out[k] = float(v.double().mean())
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
            row.update({k: float(v[j]) for k, v in self.metrics.items()})
            rows.append(row)
        return rows


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _Maps:
    """Map and label of the *original* network at ``x`` (one pass for saliency)."""

    def __init__(self, model: nn.Module, method: str, opts: dict[str, Any], reduce: str) -> None:
        self.model, self.method, self.opts, self.reduce = model, method, opts, reduce
        self.fused = method == "saliency" and set(opts) <= {"abs"}

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
        return to_map(attribute(self.method, self.model, x, target, **self.opts), self.reduce).detach(), pred


def _criterion_fn(
    name: str, clean: Tensor, k: int, target_mask: Tensor | None, target_map: Tensor | None, diss: Callable
) -> Callable[[Tensor], Tensor]:
    """Score to *maximise* over iterates (computed on the original network's map)."""
    if name == "topk":
        return lambda m: -MF.topk_intersection(m, clean, k)
    if name == "kendall":
        return lambda m: -MF.kendall_tau(m, clean)
    if name == "spearman":
        return lambda m: -MF.spearman(m, clean)
    if name == "center_shift":
        return lambda m: MF.center_shift(m, clean)
    if name == "target_mass":
        if target_mask is None:
            raise ValueError("criterion 'target_mass' needs `target_mask`")
        return lambda m: (m * target_mask).sum((1, 2))
    if name == "target_mse":
        if target_map is None:
            raise ValueError("criterion 'target_mse' needs `target_map`")
        return lambda m: -((m - target_map) ** 2).flatten(1).mean(1)
    if name == "dissimilarity":
        return lambda m: diss(m, None)
    raise ValueError(f"unknown `criterion`={name!r}; expected 'auto' or one of {CRITERIA}")


def attack_interpretation(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    attack: str = "topk",
    method: str = "saliency",
    method_opts: dict[str, Any] | None = None,
    surrogate: str | None = None,
    surrogate_opts: dict[str, Any] | None = None,
    eps: float = 8 / 255,
    step_size: float | None = None,
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
    generator: torch.Generator | int | None = None,
    progress: bool = False,
) -> InterpretationAttackResult:
    """Attack the interpretation of ``model`` on a batch (Ghorbani et al., Algorithm 1).

    Args:
        model: the original (ReLU) classifier, images in ``[0, 1]`` -> logits. It is run in eval mode
            (its mode is restored afterwards); its parameters' gradients are not touched.
        x: images ``(B, C, H, W)`` in ``[0, 1]``.
        y: true labels ``(B,)``; images the model misclassifies are skipped and counted. ``None``: attack all.
        attack: one of ``topk``, ``mass_center``, ``targeted``, ``manipulate``, ``random_walk``, ``random_sign``.
        method: attribution method name (:func:`fragdefense.attributions.list_attributions`) and
            ``method_opts`` its options (e.g. ``{"steps": 100}`` for IG). Gradient attacks need a method that
            supports ``create_graph``, or a ``surrogate``.
        surrogate: optional attribution method whose map (on the softplus copy, ``create_graph=True``)
            gives the ascent direction instead of ``method``'s (a transfer / surrogate-gradient attack);
            ``surrogate_opts`` its options. ``None`` (default): ``method`` itself. Recorded in the protocol.
        eps: budget in pixel units of ``[0, 1]`` images (L-inf or L2 per ``threat``).
        step_size: alpha (default ``eps / 8``); ``steps``: iterations P; ``restarts``: independent runs.
        random_start: start each run at a uniform random point of the eps-ball.
        k: top-k size for the ``topk`` attack and the top-k / LENS metrics.
        criterion: best-iterate selection (``auto`` picks per attack: top-k intersection for ``topk`` and
            ``random_walk``, centre shift for ``mass_center``, target mass / MSE for targeted attacks);
            or ``kendall`` (IFIA), ``spearman``, ``dissimilarity``.
        beta: softplus surrogate sharpness, fixed or ``(start, end)`` (geometric growth, Dombrowski et al.).
        threat: ``"linf"``, ``"l2"`` or a :class:`~fragdefense.attacks.ThreatModel`.
        target_mask: ``(B, H, W)`` region ``A`` for ``targeted``; ``target_map``: ``(B, H, W)`` map for
            ``manipulate`` (normalised to sum 1 internally); ``gamma``: output-preservation weight there.
        reduce: channel reduction of :func:`~fragdefense.attributions.to_map`.
        lens_window: window half-width of the reported LENS recall.
        check_every: check label and criterion on the original network every N steps (1 = every step,
            as the authors; larger is faster). The last step is always checked.
        generator: ``torch.Generator`` or integer seed for random starts / directions.
        progress: show a progress bar over the iterations.

    Returns:
        :class:`InterpretationAttackResult` with ``metrics`` (original-network maps, clean vs returned):
        ``topk_intersection``, ``spearman``, ``kendall``, ``center_shift``, ``lens_recall`` (and
        ``target_mass`` / ``target_mse`` for targeted attacks).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> from fragdefense.models import create_model
        >>> net = create_model("small_cnn", num_classes=10, width=4)
        >>> res = attack_interpretation(net, torch.rand(2, 3, 16, 16), attack="topk", eps=4 / 255,
        ...                             steps=3, k=20, beta=10.0)
        >>> res.x_adv.shape, bool(res.label_kept.all())
        (torch.Size([2, 3, 16, 16]), True)
    """
    if attack not in INTERPRETATION_ATTACKS:
        raise ValueError(f"unknown `attack`={attack!r}; expected one of {INTERPRETATION_ATTACKS}")
    get_attribution(method)  # validates the name
    opts = dict(method_opts or {})
    x = check_images(x, "x")
    b, _, h, w = x.shape
    eps = check_nonneg_float(eps, "eps")
    steps = check_int_in_range(steps, "steps", 1)
    restarts = check_int_in_range(restarts, "restarts", 1)
    check_every = check_int_in_range(check_every, "check_every", 1)
    k = check_int_in_range(k, "k", 1, h * w)
    alpha = check_nonneg_float(eps / 8 if step_size is None else step_size, "step_size")
    thr = threat if isinstance(threat, ThreatModel) else make_threat(threat, eps)
    if thr.eps != eps:
        raise ValueError(f"`threat` has eps={thr.eps} but `eps`={eps}")
    gradient_attack = attack not in ("random_walk", "random_sign")
    if surrogate is not None:
        get_attribution(surrogate)
    grad_method = method if surrogate is None else surrogate
    grad_opts = opts if surrogate is None else dict(surrogate_opts or {})
    if gradient_attack and not supports_create_graph(grad_method):
        raise ValueError(
            f"attack {attack!r} back-propagates through the map, but "
            f"`{'method' if surrogate is None else 'surrogate'}`={grad_method!r} does not support "
            "create_graph; use random_walk / random_sign, a differentiable method, or a differentiable `surrogate`"
        )
    if y is not None:
        if not isinstance(y, Tensor) or y.shape != (b,):
            raise ValueError(f"`y` must be a LongTensor of shape ({b},), got {getattr(y, 'shape', type(y))}")
        y = y.to(x.device)
    for name, t in (("target_mask", target_mask), ("target_map", target_map)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (b, h, w)):
            raise ValueError(f"`{name}` must have shape ({b}, {h}, {w}), got {getattr(t, 'shape', type(t))}")
    if attack == "targeted" and target_mask is None:
        raise ValueError("attack 'targeted' needs `target_mask` (B, H, W): the region A to move the map into")
    if attack == "manipulate" and target_map is None:
        raise ValueError("attack 'manipulate' needs `target_map` (B, H, W): the map to drive the explanation to")
    crit_name = _AUTO_CRITERION[attack] if criterion == "auto" else criterion
    if crit_name not in CRITERIA:
        raise ValueError(f"unknown `criterion`={criterion!r}; expected 'auto' or one of {CRITERIA}")
    betas = beta_schedule(beta, steps)
    if isinstance(generator, int):
        generator = torch.Generator(device=x.device).manual_seed(generator)

    protocol = {
        "attack": attack,
        "method": method,
        "method_opts": opts,
        **({"surrogate": surrogate, "surrogate_opts": grad_opts} if surrogate is not None else {}),
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
    with _eval_mode(model):
        b, _, h, w = x.shape
        relu_maps = _Maps(model, method, opts, reduce)
        with torch.no_grad():
            pred0 = model(x).argmax(1)
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
            )
        x0, c = x[index].detach(), pred0[index]
        tmask = target_mask[index].to(x) if target_mask is not None else None
        tmap = target_map[index].to(x) if target_map is not None else None
        if tmap is not None:
            tmap = tmap / tmap.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1)
        clean_map, _ = relu_maps(x0, c)
        flat = clean_map.flatten(1)
        # B = the k largest entries of the clean map (ties broken by lower index, as the metric)
        order = torch.argsort(flat, dim=1, descending=True, stable=True)[:, :k]
        bmask = torch.zeros_like(flat).scatter_(1, order, 1.0).view_as(clean_map)
        c_clean = MF.center_of_mass(clean_map)
        hw = float(h * w)
        with torch.no_grad():
            p0 = F.softmax(model(x0), dim=1) if attack == "manipulate" else None

        def dissimilarity(m: Tensor, logits: Tensor | None) -> Tensor:
            if attack in ("topk", "random_walk", "random_sign"):
                return -(m * bmask).sum((1, 2))
            if attack == "mass_center":
                return (MF.center_of_mass(m) - c_clean).norm(dim=1)
            if attack == "targeted":
                return (m * tmask).sum((1, 2))
            out = -((hw * m - hw * tmap) ** 2).flatten(1).mean(1)  # manipulate
            if logits is not None:
                out = out - gamma * ((F.softmax(logits, 1) - p0) ** 2).sum(1)
            return out

        score_fn = _criterion_fn(crit_name, clean_map, k, tmask, tmap, dissimilarity)
        n = x0.shape[0]
        best_x = x0.clone()
        best_score = torch.full((n,), -math.inf, device=x.device, dtype=torch.float64)
        best_iter = torch.full((n,), -1, dtype=torch.long, device=x.device)
        soft = to_softplus(model, betas[0]).eval() if gradient_attack else None

        def consider(xc: Tensor, it: int) -> None:
            m, pred = relu_maps(xc, c)
            keep = pred == c
            s = score_fn(m).double()
            better = keep & (s > best_score)
            best_score[better] = s[better]
            best_iter[better] = it
            best_x[better] = xc[better].detach()

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=restarts * (1 if attack == "random_sign" else steps), desc=f"{attack}/{method}", leave=False
            )
        try:
            for r in range(restarts):
                if attack == "random_sign":
                    noise = torch.randn(x0.shape, generator=generator, device=x.device, dtype=x.dtype)
                    consider(thr.project(x0 + thr.eps * noise.sign(), x0), r)
                    if bar is not None:
                        bar.update(1)
                    continue
                xi = thr.random_start(x0, generator) if random_start else x0.clone()
                for p in range(steps):
                    if gradient_attack:
                        set_softplus_beta(soft, betas[p])
                        xg = xi.detach().requires_grad_(True)
                        m = to_map(attribute(grad_method, soft, xg, c, create_graph=True, **grad_opts), reduce)
                        logits = soft(xg) if attack == "manipulate" else None
                        (g,) = torch.autograd.grad(dissimilarity(m, logits).sum(), xg)
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
        metrics = {
            "topk_intersection": MF.topk_intersection(adv_map, clean_map, k),
            "spearman": MF.spearman(adv_map, clean_map),
            "kendall": MF.kendall_tau(adv_map, clean_map),
            "center_shift": MF.center_shift(adv_map, clean_map),
            "lens_recall": MF.lens_topk(clean_map, adv_map, k, lens_window, mode="recall"),
            "linf_distance": (best_x - x0).flatten(1).abs().amax(1),
        }
        if tmask is not None:
            metrics["target_mass"] = (adv_map * tmask).sum((1, 2))
        if tmap is not None:
            metrics["target_mse"] = ((adv_map - tmap) ** 2).flatten(1).mean(1)
        x_adv_full[index] = best_x
        return InterpretationAttackResult(
            x_adv=x_adv_full,
            index=index,
            label=c,
            label_kept=pred_adv == c,
            perturbed=best_iter >= 0,
            best_iter=best_iter,
            clean_map=clean_map,
            adv_map=adv_map,
            metrics={k_: v.detach() for k_, v in metrics.items()},
            n_images=b,
            n_skipped=b - int(index.numel()),
            protocol=protocol,
        )
