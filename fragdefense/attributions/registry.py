"""Name -> attribution function registry with one call shape for every method."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

from fragdefense.attributions._common import CREATE_GRAPH_METHODS, TargetType
from fragdefense.attributions.gradcam import gradcam
from fragdefense.attributions.gradient import input_x_gradient, saliency
from fragdefense.attributions.integrated_gradients import integrated_gradients
from fragdefense.attributions.propagation import deeplift, lrp
from fragdefense.attributions.robust import ROBUST_CREATE_GRAPH_METHODS, beta_smooth, local_smooth, uniform_grad
from fragdefense.attributions.smoothgrad import smoothgrad

__all__ = [
    "ATTRIBUTIONS",
    "ROBUST_ATTRIBUTIONS",
    "list_robust_attributions",
    "AttributionFn",
    "get_attribution",
    "list_attributions",
    "attribute",
    "supports_create_graph",
]


class AttributionFn(Protocol):
    """``method(model, x, target=None, *, create_graph=False, **opts) -> Tensor (B, C, H, W)``."""

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        target: TargetType = None,
        *,
        create_graph: bool = False,
        **opts: Any,
    ) -> Tensor: ...


#: every registered attribution method by name
ATTRIBUTIONS: dict[str, AttributionFn] = {
    "saliency": saliency,
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "deeplift": deeplift,
    "lrp": lrp,
    "gradcam": gradcam,
}

#: explanation-side defenses (:mod:`fragdefense.attributions.robust`), same call shape; resolved by
#: :func:`get_attribution` / :func:`attribute` like the methods of :data:`ATTRIBUTIONS`, listed separately
#: by :func:`list_robust_attributions`.
ROBUST_ATTRIBUTIONS: dict[str, AttributionFn] = {
    "beta_smooth": beta_smooth,
    "local_smooth": local_smooth,
    "uniform_grad": uniform_grad,
}

_ALL: dict[str, AttributionFn] = {**ATTRIBUTIONS, **ROBUST_ATTRIBUTIONS}
_ALL_CREATE_GRAPH: tuple[str, ...] = (*CREATE_GRAPH_METHODS, *ROBUST_CREATE_GRAPH_METHODS)


def list_attributions() -> list[str]:
    """Registered method names (sorted).

    >>> list_attributions()
    ['deeplift', 'gradcam', 'input_x_gradient', 'integrated_gradients', 'lrp', 'saliency', 'smoothgrad']
    """
    return sorted(ATTRIBUTIONS)


def list_robust_attributions() -> list[str]:
    """Registered explanation-side defenses (sorted); they are resolved by the same :func:`get_attribution`.

    >>> list_robust_attributions()
    ['beta_smooth', 'local_smooth', 'uniform_grad']
    """
    return sorted(ROBUST_ATTRIBUTIONS)


def get_attribution(name: str) -> AttributionFn:
    """The function registered under ``name``; unknown names raise ``ValueError`` listing the names.

    >>> get_attribution("saliency").__name__
    'saliency'
    """
    if not isinstance(name, str) or name not in _ALL:
        raise ValueError(
            f"unknown attribution method `name`={name!r}; registered: {', '.join(list_attributions())}; "
            f"explanation defenses: {', '.join(list_robust_attributions())}"
        )
    return _ALL[name]


def supports_create_graph(name: str) -> bool:
    """Whether method ``name`` returns a differentiable map with ``create_graph=True``
    (``saliency``, ``input_x_gradient``, ``integrated_gradients``, ``smoothgrad``, ``gradcam``: yes;
    ``deeplift``, ``lrp``: no, captum engine; ``beta_smooth``, ``uniform_grad``: yes; ``local_smooth``: yes,
    unrolled through its optimisation steps).

    >>> supports_create_graph("integrated_gradients"), supports_create_graph("deeplift")
    (True, False)
    """
    get_attribution(name)
    return name in _ALL_CREATE_GRAPH


def attribute(
    name: str,
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    **opts: Any,
) -> Tensor:
    """Run the method registered as ``name``, i.e.
    ``get_attribution(name)(model, x, target, create_graph=create_graph, **opts)``.

    ``create_graph=True`` with a method that does not support it raises ``ValueError``; unknown
    ``opts`` raise ``TypeError`` naming the option.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
        >>> attribute("integrated_gradients", net, torch.rand(2, 3, 4, 4), steps=10).shape
        torch.Size([2, 3, 4, 4])
    """
    fn = get_attribution(name)
    if create_graph and name not in _ALL_CREATE_GRAPH:
        raise ValueError(
            f"`create_graph=True` is not supported by {name!r}; methods supporting create_graph: "
            f"{', '.join(_ALL_CREATE_GRAPH)}"
        )
    return fn(model, x, target, create_graph=create_graph, **opts)
