"""Propagation-rule attributions with captum as the engine: DeepLIFT (Rescale) and LRP-epsilon.

Neither supports ``create_graph=True``: captum computes them with modified backward hooks and a
plain ``torch.autograd.grad`` (no graph), so a second-order gradient would be silently wrong
(captum issues #361, #652). Attacks on these maps use the ReLU graph's first-order signal elsewhere.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from fragdefense.attributions._common import (
    CREATE_GRAPH_METHODS,
    TargetType,
    check_model,
    check_x,
    make_baseline,
    predicted_target,
)
from fragdefense.utils.checks import check_nonneg_float

__all__ = ["deeplift", "lrp"]


def _no_create_graph(name: str, create_graph: bool) -> None:
    if create_graph:
        raise ValueError(
            f"`create_graph=True` is not supported by {name!r} (computed by captum without a graph); "
            f"methods supporting create_graph: {', '.join(CREATE_GRAPH_METHODS)}"
        )


def deeplift(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    baseline: float | Tensor | None = None,
    eps: float = 1e-10,
) -> Tensor:
    """DeepLIFT with the Rescale rule (Shrikumar et al. 2017) via captum ``DeepLift``, ``(B, C, H, W)``.

    ``(x - x0) * m``, where the multipliers ``m`` replace every nonlinearity's local derivative by the
    ratio ``(f(z) - f(z0)) / (z - z0)`` between the input and the baseline pass (summation-to-delta:
    ``sum = s_c(x) - s_c(x0)``). The nonlinearities captum supports (ReLU, ELU, LeakyReLU, Sigmoid,
    Tanh, Softplus, MaxPool, Softmax) must be ``nn.Module`` s used once per forward; subclasses of them
    (e.g. the softplus modules of :func:`~fragdefense.models.to_softplus`) get their base class's rule
    (captum alone matches exact types and would silently use plain gradients for them).

    Args:
        model, x, target: as in :func:`~fragdefense.attributions.saliency` (``target=None``: argmax of
            ``model(x)`` without grad).
        create_graph: **not supported** (raises ``ValueError`` when ``True``); the result is detached.
        baseline: ``None`` (zeros), a number, or a tensor broadcastable to ``x``.
        eps: captum's threshold below which ``z - z0`` falls back to the gradient.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 3))
        >>> x = torch.rand(2, 3, 4, 4)
        >>> a = deeplift(net, x, target=0)
        >>> torch.allclose(a.sum((1, 2, 3)), net(x)[:, 0] - net(torch.zeros_like(x))[:, 0], atol=1e-5)
        True
    """
    from captum.attr import DeepLift
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    _no_create_graph("deeplift", create_graph)
    check_model(model)
    check_x(x)
    eps = check_nonneg_float(eps, "eps")
    t = predicted_target(model, x, target)
    x0 = make_baseline(baseline, x).contiguous()
    # captum matches nonlinearities by exact type: register subclasses of supported modules (e.g. the
    # softplus of fragdefense.models.to_softplus) with their base class's rule for this call only
    bases = tuple(SUPPORTED_NON_LINEAR)
    added = {
        type(m): SUPPORTED_NON_LINEAR[next(b for b in bases if isinstance(m, b))]
        for m in model.modules()
        if type(m) not in SUPPORTED_NON_LINEAR and isinstance(m, bases)
    }
    SUPPORTED_NON_LINEAR.update(added)
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.filterwarnings("ignore", message=r"Setting forward, backward hooks")
            attr = DeepLift(model, multiply_by_inputs=True, eps=eps).attribute(
                x.detach().clone().requires_grad_(True), x0, target=t
            )
    finally:
        for k in added:
            del SUPPORTED_NON_LINEAR[k]
    return attr.detach()


def _leaf_layers(model: nn.Module) -> list[nn.Module]:
    """Leaf modules in the order captum's LRP collects them."""
    out: list[nn.Module] = []
    for child in model.children():
        if len(list(child.children())) == 0:
            out.append(child)
        else:
            out.extend(_leaf_layers(child))
    return out


def lrp(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    epsilon: float = 1e-9,
) -> Tensor:
    """LRP with the epsilon rule (Bach et al. 2015) via captum ``LRP``, shape ``(B, C, H, W)``.

    ``R_j = sum_k a_j w_jk / (z_k + epsilon * sign(z_k)) R_k`` from the target logit down to the input
    (conservation ``sum R ~ s_c(x)`` up to biases and ``epsilon``). Every leaf layer of type ``Conv2d``,
    ``Linear``, ``BatchNorm2d``, ``MaxPool``, ``AvgPool2d``, ``AdaptiveAvgPool2d`` or ``Flatten`` without
    a user-set ``rule`` attribute gets captum's ``EpsilonRule(epsilon)``; user-set rules are used and
    restored afterwards (captum itself deletes them). ``ReLU``/``Dropout``/``Tanh`` pass relevance
    through; other leaf modules (e.g. ``Softplus``, residual blocks' empty shortcuts) make captum fail
    and raise ``ValueError``.

    For an :class:`~fragdefense.models.ImageClassifier`, LRP runs on ``model.backbone`` with the
    normalised input ``(x - mean) / std`` (the normalisation is the input encoding, not a layer):
    the relevance of each normalised pixel is returned, so conservation holds. captum applied to the
    wrapper would instead return that relevance divided by ``std``.

    Args:
        model, x, target: as in :func:`~fragdefense.attributions.saliency`.
        create_graph: **not supported** (raises ``ValueError`` when ``True``); the result is detached.
        epsilon: stabiliser of the epsilon rule (captum's default ``1e-9``).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8, bias=False),
        ...                           torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=False))
        >>> x = torch.rand(2, 3, 4, 4)
        >>> r = lrp(net, x, target=1)
        >>> torch.allclose(r.sum((1, 2, 3)), net(x)[:, 1], atol=1e-5)
        True
    """
    from captum.attr import LRP
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES
    from captum.attr._utils.lrp_rules import EpsilonRule

    from fragdefense.models import ImageClassifier

    _no_create_graph("lrp", create_graph)
    check_model(model)
    check_x(x)
    epsilon = check_nonneg_float(epsilon, "epsilon")
    t = predicted_target(model, x, target)
    if isinstance(model, ImageClassifier):
        net: nn.Module = model.backbone
        inp = ((x.detach() - model.mean) / model.std).contiguous().requires_grad_(True)
    else:
        net, inp = model, x.detach().clone().requires_grad_(True)
    layers = _leaf_layers(net)
    user_rules = {id(m): m.rule for m in layers if hasattr(m, "rule")}
    ruled = (*SUPPORTED_LAYERS_WITH_RULES, nn.Flatten)
    try:
        for m in layers:
            # isinstance, not captum's exact type match: fragdefense's BatchNorm variants (double backward for
            # second-order training, eval-mode affine in softplus copies) are BatchNorm layers to LRP
            if id(m) not in user_rules and isinstance(m, ruled):
                m.rule = EpsilonRule(epsilon=epsilon)
        with torch.enable_grad():
            attr = LRP(net).attribute(inp, target=t)
    except TypeError as e:
        if "has no rule defined" in str(e):
            raise ValueError(f"lrp: `model` has a layer captum's LRP cannot handle: {e}") from e
        raise
    finally:
        for m in layers:
            if id(m) in user_rules:
                m.rule = user_rules[id(m)]
            elif hasattr(m, "rule"):
                del m.rule
    return attr.detach()
