"""The attack on influence functions of Ghorbani, Abid & Zou (``docs/background.md`` §4), batched over test images.

For a test image ``x`` (label ``y``), the influence vector ``I(., x)`` over the training set comes from a
:class:`~fragdefense.influence.LastLayerInfluence` on the features of a frozen network. The attack takes the
``n_attacked`` (3) most influential training points of the clean image and moves ``x`` by signed-gradient
steps (one step of size ``eps`` by default) that *reduce* their influence score; the gradient flows through
the influence, the head and the features to the pixels (the Hessian and the training set are fixed). The
perturbation is projected onto the L-inf ``eps``-ball and ``[0, 1]``; the label is *not* enforced (reported
as ``label_kept``). Baseline: random sign noise ``eps * sign(N(0, I))``.

Metrics (per image): Spearman rank correlation between the clean and the perturbed influence vectors
(:func:`fragdefense.metrics.functional.spearman`) and how many of the clean top-``k`` training points are
still in the top-``k`` after the perturbation.

"Most influential" is set by ``rank_by``: ``"helpful"`` (default; largest ``-I``, the training points whose
up-weighting most lowers the test loss — captum's "proponents"), ``"harmful"`` (largest ``I``) or ``"abs"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fragdefense.attacks.pgd import pgd_attack
from fragdefense.influence.last_layer import LastLayerInfluence
from fragdefense.metrics import functional as MF
from fragdefense.utils.checks import as_model_dtype, check_choice, check_images, check_int_in_range, check_labels
from fragdefense.utils.conventions import make_generator, parse_budget, resolve_step_size

__all__ = ["attack_influence", "influence_scores", "rank_scores", "InfluenceAttackResult", "INFLUENCE_ATTACKS"]

#: Attacks offered by :func:`attack_influence`.
INFLUENCE_ATTACKS = ("gradient", "random_sign")
RANK_BY = ("helpful", "harmful", "abs")


def rank_scores(influence: Tensor, rank_by: str = "helpful") -> Tensor:
    """The scores whose largest entries are the "most influential" training points (see the module docstring).

    >>> rank_scores(torch.tensor([[-2.0, 1.0]]), "helpful"), rank_scores(torch.tensor([[-2.0, 1.0]]), "abs")
    (tensor([[ 2., -1.]]), tensor([[2., 1.]]))
    """
    check_choice(rank_by, "rank_by", RANK_BY)
    if rank_by == "helpful":
        return -influence
    return influence if rank_by == "harmful" else influence.abs()


def influence_scores(
    features: Callable[[Tensor], Tensor],
    influence: LastLayerInfluence,
    x: Tensor,
    y: Tensor | None = None,
    *,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Influence vectors ``(B, N)`` of images ``x`` and the head's predicted labels ``(B,)`` (no grad).

    ``y`` (the labels in the test loss) defaults to the predicted labels. Checked up front: ``x`` a non-empty
    batch of images in ``[0, 1]`` (run in the dtype of ``features``' parameters), ``y`` integer labels in
    ``[0, influence.n_classes - 1]``.
    """
    x = _checked_inputs(features, influence, x, y)
    check_int_in_range(batch_size, "batch_size", 1)
    outs, preds = [], []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            phi = features(x[s : s + batch_size])
            pred = influence.predict(phi)
            yb = pred if y is None else y[s : s + batch_size].to(pred.device)
            outs.append(influence.influence(phi, yb))
            preds.append(pred)
    return torch.cat(outs), torch.cat(preds)


def _checked_inputs(features: Callable[[Tensor], Tensor], influence: LastLayerInfluence, x: Tensor, y: Any) -> Tensor:
    """``x`` checked (non-empty images in ``[0, 1]``) and cast to the features' dtype; ``y`` ``None`` or labels of
    the head's classes."""
    if not isinstance(influence, LastLayerInfluence):
        raise TypeError(f"`influence` must be a fitted LastLayerInfluence, got {type(influence).__name__}")
    x = as_model_dtype(check_images(x, "x"), features)
    if y is not None:
        check_labels(y, x.shape[0], influence.n_classes, "y")
    return x


@dataclass
class InfluenceAttackResult:
    """Output of :func:`attack_influence` (all tensors on the device of the images, batch first)."""

    x_adv: Tensor
    influence_clean: Tensor
    influence_adv: Tensor
    attacked_index: Tensor  # (B, n_attacked) training indices whose influence was reduced
    topk_clean: Tensor  # (B, k) most influential training indices before
    topk_adv: Tensor  # (B, k) after
    spearman: Tensor  # (B,)
    topk_kept: Tensor  # (B,) int: clean top-k points still in the top-k
    label: Tensor  # (B,) labels used in the test loss
    pred_clean: Tensor
    pred_adv: Tensor
    attacked_score_drop: Tensor  # (B,) sum of rank scores of the attacked points, before minus after
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def label_kept(self) -> Tensor:
        """``(B,)`` bool: the predicted label did not change."""
        return self.pred_clean == self.pred_adv

    def summary(self) -> dict[str, float]:
        """Means over the batch: ``spearman``, ``topk_kept``, ``label_kept_rate``, ``attacked_score_drop``."""
        return {
            "spearman": float(self.spearman.double().mean()),
            "topk_kept": float(self.topk_kept.double().mean()),
            "label_kept_rate": float(self.label_kept.double().mean()),
            "attacked_score_drop": float(self.attacked_score_drop.double().mean()),
        }

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per image."""
        return [
            {
                "index": i,
                "label": int(self.label[i]),
                "pred_clean": int(self.pred_clean[i]),
                "pred_adv": int(self.pred_adv[i]),
                "label_kept": bool(self.label_kept[i]),
                "spearman": float(self.spearman[i]),
                "topk_kept": int(self.topk_kept[i]),
                "topk_clean": self.topk_clean[i].tolist(),
                "topk_adv": self.topk_adv[i].tolist(),
                "attacked_score_drop": float(self.attacked_score_drop[i]),
            }
            for i in range(len(self.spearman))
        ]


def attack_influence(
    features: Callable[[Tensor], Tensor],
    influence: LastLayerInfluence,
    x: Tensor,
    y: Tensor | None = None,
    *,
    eps: float | str = 8 / 255,
    attack: str = "gradient",
    n_attacked: int = 3,
    k: int = 5,
    steps: int = 1,
    step_size: float | str | None = None,
    rank_by: str = "helpful",
    generator: torch.Generator | int | None = None,
    batch_size: int = 256,
) -> InfluenceAttackResult:
    """Perturb test images so that their most influential training points change (see the module docstring).

    Args:
        features: differentiable map from images ``(B, C, H, W)`` in ``[0, 1]`` to the head's input ``(B, D)``
            (e.g. :func:`~fragdefense.influence.feature_extractor` of a network).
        influence: a fitted :class:`LastLayerInfluence` (its head gives the logits, labels and influences).
        x: test images ``(B, C, H, W)`` in ``[0, 1]``.
        y: labels in the test loss ``(B,)`` (default: the clean prediction). Kept fixed during the attack.
        eps: L-inf budget in pixel units of ``[0, 1]``, a number or a string such as ``"8/255"``.
        attack: ``"gradient"`` (the paper's signed-gradient attack) or ``"random_sign"`` (baseline).
        n_attacked: the attack reduces the summed rank score of the clean top-``n_attacked`` training points.
        k: size of the top-``k`` sets compared by ``topk_kept``.
        steps, step_size: signed-gradient steps (:func:`~fragdefense.attacks.pgd_attack` without random start,
            descending the attacked points' scores); default ``1`` step of size ``eps``: the paper's attack; with
            more steps the default ``step_size`` is the shared rule ``2.5 * eps / steps``
            (:func:`~fragdefense.utils.conventions.default_step_size`); every iterate is projected.
        rank_by: ``"helpful"``, ``"harmful"`` or ``"abs"`` (see :func:`rank_scores`).
        generator: random source of ``random_sign``: ``None`` (global RNG), an ``int`` seed or a generator.
        batch_size: images per batch.

    Every argument is checked before any work (images non-empty and in ``[0, 1]``, float64 images run in the
    dtype of ``features``' parameters; ``y`` integer labels of the head's classes; ``attack``, ``rank_by``,
    ``n_attacked``, ``k``, ``steps``, ``batch_size``, ``eps``).

    Example:
        >>> from torch import nn
        >>> from fragdefense.influence import fit_linear_head
        >>> _ = torch.manual_seed(0)
        >>> feat = nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.Tanh())
        >>> xtr = torch.rand(60, 3, 4, 4); ytr = (xtr.mean((1, 2, 3)) > 0.5).long()
        >>> with torch.no_grad(): phi = feat(xtr)
        >>> w, b = fit_linear_head(phi, ytr, num_classes=2, binary=True, l2=0.1)
        >>> inf = LastLayerInfluence(w, b, l2=0.1).fit(phi, ytr)
        >>> res = attack_influence(feat, inf, torch.rand(4, 3, 4, 4), eps=8 / 255, k=5)
        >>> res.spearman.shape, res.topk_kept.shape, bool((res.x_adv >= 0).all())
        (torch.Size([4]), torch.Size([4]), True)
    """
    x = _checked_inputs(features, influence, x, y)
    eps = parse_budget(eps, "eps")
    check_choice(attack, "attack", INFLUENCE_ATTACKS)
    check_choice(rank_by, "rank_by", RANK_BY)
    n_train = influence.n_train
    check_int_in_range(n_attacked, "n_attacked", 1, n_train)
    check_int_in_range(k, "k", 1, n_train)
    check_int_in_range(steps, "steps", 1)
    check_int_in_range(batch_size, "batch_size", 1)
    # one step: the paper's step of size eps (any larger L-inf step projects to the same point)
    step = eps if step_size is None and steps == 1 else resolve_step_size(step_size, eps, steps)
    generator = make_generator(generator, x.device)

    parts: dict[str, list[Tensor]] = {}
    for s in range(0, len(x), batch_size):
        xb = x[s : s + batch_size]
        yb = None if y is None else y[s : s + batch_size]
        out = _attack_batch(features, influence, xb, yb, eps, attack, n_attacked, k, steps, step, rank_by, generator)
        for key, v in out.items():
            parts.setdefault(key, []).append(v)
    cat = {key: torch.cat(v) for key, v in parts.items()}
    return InfluenceAttackResult(
        **cat,
        protocol={
            "attack": attack,
            "eps": eps,
            "eps_255": eps * 255,
            "n_attacked": n_attacked,
            "k": k,
            "steps": steps,
            "step_size": step,
            "rank_by": rank_by,
            "label_enforced": False,
            "n_train": n_train,
        },
    )


def _attack_batch(
    features: Callable[[Tensor], Tensor],
    inf: LastLayerInfluence,
    x: Tensor,
    y: Tensor | None,
    eps: float,
    attack: str,
    n_attacked: int,
    k: int,
    steps: int,
    step: float,
    rank_by: str,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    clean, pred = influence_scores(features, inf, x, y)
    label = pred if y is None else y.to(pred.device)
    score_clean = rank_scores(clean, rank_by)
    attacked = score_clean.topk(n_attacked, dim=1).indices
    x = x.detach()
    if attack == "random_sign":
        noise = (
            torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if generator is not None
            else (torch.randn_like(x))
        )
        x_adv = (x + eps * noise.sign()).clamp(0.0, 1.0)
    else:

        def lower_attacked(f: Callable[[Tensor], Tensor], xa: Tensor, x0: Tensor, yy: Tensor) -> Tensor:
            sel = inf.influence(f(xa), yy, train_index=attacked)  # (B, n_attacked)
            return -rank_scores(sel, rank_by).sum(1)  # ascend minus the score: descend the attacked points

        kw = dict(eps=eps, step_size=step, steps=steps, random_start=False)
        x_adv = pgd_attack(features, x, label, objective=lower_attacked, **kw)  # type: ignore[arg-type]
    x_adv = x_adv.detach()
    adv, pred_adv = influence_scores(features, inf, x_adv, label)
    score_adv = rank_scores(adv, rank_by)
    topk_kept = (MF.topk_intersection(score_clean, score_adv, k) * k).round().long()
    drop = score_clean.gather(1, attacked).sum(1) - score_adv.gather(1, attacked).sum(1)
    return {
        "x_adv": x_adv,
        "influence_clean": clean,
        "influence_adv": adv,
        "attacked_index": attacked,
        "topk_clean": score_clean.topk(k, dim=1).indices,
        "topk_adv": score_adv.topk(k, dim=1).indices,
        "spearman": MF.spearman(clean, adv),
        "topk_kept": topk_kept,
        "label": label,
        "pred_clean": pred,
        "pred_adv": pred_adv,
        "attacked_score_drop": drop,
    }
