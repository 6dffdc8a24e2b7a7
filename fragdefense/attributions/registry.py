"""Name -> attribution function registry with one call shape for every method."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

from fragdefense.attributions._common import CREATE_GRAPH_METHODS, TargetType
from fragdefense.attributions.gradcam import gradcam
from fragdefense.attributions.gradient import input_x_gradient, saliency
from fragdefense.attributions.integrated_gradients import integrated_gradients
from fragdefense.attributions.propagation import deeplift, lrp
from fragdefense.attributions.smoothgrad import smoothgrad

__all__ = [
    "ATTRIBUTIONS",
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


def list_attributions() -> list[str]:
    """Registered method names (sorted).

    >>> list_attributions()
    ['deeplift', 'gradcam', 'input_x_gradient', 'integrated_gradients', 'lrp', 'saliency', 'smoothgrad']
    """
    return sorted(ATTRIBUTIONS)


def get_attribution(name: str) -> AttributionFn:
    """The function registered under ``name``; unknown names raise ``ValueError`` listing the names.

    >>> get_attribution("saliency").__name__
    'saliency'
    """
    if not isinstance(name, str) or name not in ATTRIBUTIONS:
        raise ValueError(f"unknown attribution method `name`={name!r}; registered: {', '.join(list_attributions())}")
    return ATTRIBUTIONS[name]


def supports_create_graph(name: str) -> bool:
    """Whether method ``name`` returns a differentiable map with ``create_graph=True``
    (``saliency``, ``input_x_gradient``, ``integrated_gradients``, ``smoothgrad``, ``gradcam``: yes;
    ``deeplift``, ``lrp``: no, captum engine).

    >>> supports_create_graph("integrated_gradients"), supports_create_graph("deeplift")
    (True, False)
    """
    get_attribution(name)
    return name in CREATE_GRAPH_METHODS


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
    if create_graph and name not in CREATE_GRAPH_METHODS:
        raise ValueError(
            f"`create_graph=True` is not supported by {name!r}; methods supporting create_graph: "
            f"{', '.join(CREATE_GRAPH_METHODS)}"
        )
    return fn(model, x, target, create_graph=create_graph, **opts)
