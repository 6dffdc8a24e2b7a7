"""Name -> attribution method registry with one call shape for every method, and the resolution of user
explainers (callables, captum ``Attribution`` objects) into the same shape."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fragdefense.attributions._common import CREATE_GRAPH_METHODS, TargetType
from fragdefense.attributions.gradcam import gradcam
from fragdefense.attributions.gradient import input_x_gradient, saliency
from fragdefense.attributions.integrated_gradients import integrated_gradients
from fragdefense.attributions.propagation import deeplift, lrp
from fragdefense.attributions.robust import ROBUST_CREATE_GRAPH_METHODS, beta_smooth, local_smooth, uniform_grad
from fragdefense.attributions.smoothgrad import smoothgrad
from fragdefense.utils.checks import as_model_dtype

__all__ = [
    "AttributionSpec",
    "register_attribution",
    "unregister_attribution",
    "resolve_attribution",
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


@dataclass(frozen=True)
class AttributionSpec:
    """A registered (or resolved) attribution method: its name, function and capabilities.

    ``create_graph``: the map is differentiable w.r.t. the input with ``create_graph=True`` (gradient attacks
    and training regularizers can back-propagate through it); ``robust``: an explanation-side defense.
    """

    name: str
    fn: AttributionFn
    create_graph: bool = False
    robust: bool = False
    description: str = ""

    def __call__(
        self, model: nn.Module, x: Tensor, target: TargetType = None, *, create_graph: bool = False, **opts: Any
    ) -> Tensor:
        if create_graph and not self.create_graph:
            raise ValueError(
                f"`create_graph=True` is not supported by {self.name!r}; methods supporting create_graph: "
                f"{', '.join(n for n, s in _REGISTRY.items() if s.create_graph)}"
            )
        if isinstance(x, Tensor):
            x = as_model_dtype(x, model)
        return self.fn(model, x, target, create_graph=create_graph, **opts)


_REGISTRY: dict[str, AttributionSpec] = {}


def register_attribution(
    name: str,
    fn: AttributionFn | None = None,
    *,
    create_graph: bool = False,
    robust: bool = False,
    description: str = "",
) -> Any:
    """Register an attribution method (usable as a decorator). Every consumer (attacks, monitors, evaluation,
    tables, configs) resolves methods through this registry.

    Args:
        name: the method's name.
        fn: ``fn(model, x, target=None, *, create_graph=False, **opts) -> (B, C, H, W)``.
        create_graph: whether ``fn`` returns a map differentiable w.r.t. ``x`` when ``create_graph=True``.
        robust: an explanation-side defense (listed by :func:`list_robust_attributions`).

    Example:
        >>> import torch
        >>> @register_attribution("grad_sq", create_graph=True)
        ... def grad_sq(model, x, target=None, *, create_graph=False):
        ...     return saliency(model, x, target, create_graph=create_graph) ** 2
        >>> supports_create_graph("grad_sq"), "grad_sq" in list_attributions()
        (True, True)
        >>> unregister_attribution("grad_sq")
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")

    def deco(f: AttributionFn) -> AttributionFn:
        if not callable(f):
            raise TypeError(f"attribution {name!r} must be callable, got {type(f).__name__}")
        if name in _REGISTRY:
            raise ValueError(f"attribution method {name!r} is already registered")
        _REGISTRY[name] = AttributionSpec(name, f, bool(create_graph), bool(robust), description)
        _sync()
        return f

    return deco if fn is None else deco(fn)


def unregister_attribution(name: str) -> None:
    """Remove a registered method (for tests and notebooks)."""
    _REGISTRY.pop(name, None)
    _sync()


#: every registered attribution method by name (live view, explanation defenses excluded)
ATTRIBUTIONS: dict[str, AttributionFn] = {}
#: explanation-side defenses (:mod:`fragdefense.attributions.robust`), same call shape (live view)
ROBUST_ATTRIBUTIONS: dict[str, AttributionFn] = {}


def _sync() -> None:
    ATTRIBUTIONS.clear()
    ROBUST_ATTRIBUTIONS.clear()
    for n, spec in _REGISTRY.items():
        (ROBUST_ATTRIBUTIONS if spec.robust else ATTRIBUTIONS)[n] = spec.fn


for _name, _fn in (
    ("saliency", saliency),
    ("input_x_gradient", input_x_gradient),
    ("integrated_gradients", integrated_gradients),
    ("smoothgrad", smoothgrad),
    ("deeplift", deeplift),
    ("lrp", lrp),
    ("gradcam", gradcam),
):
    register_attribution(_name, _fn, create_graph=_name in CREATE_GRAPH_METHODS)
for _name, _fn in (("beta_smooth", beta_smooth), ("local_smooth", local_smooth), ("uniform_grad", uniform_grad)):
    register_attribution(_name, _fn, create_graph=_name in ROBUST_CREATE_GRAPH_METHODS, robust=True)


def list_attributions() -> list[str]:
    """Registered method names (sorted; explanation defenses excluded).

    >>> list_attributions()
    ['deeplift', 'gradcam', 'input_x_gradient', 'integrated_gradients', 'lrp', 'saliency', 'smoothgrad']
    """
    return sorted(n for n, s in _REGISTRY.items() if not s.robust)


def list_robust_attributions() -> list[str]:
    """Registered explanation-side defenses (sorted); they are resolved by the same :func:`get_attribution`.

    >>> list_robust_attributions()
    ['beta_smooth', 'local_smooth', 'uniform_grad']
    """
    return sorted(n for n, s in _REGISTRY.items() if s.robust)


def get_attribution(name: str) -> AttributionFn:
    """The function registered under ``name``; unknown names raise ``ValueError`` listing the names.

    >>> get_attribution("saliency").__name__
    'saliency'
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown attribution method `name`={name!r}; registered: {', '.join(list_attributions())}; "
            f"explanation defenses: {', '.join(list_robust_attributions())}"
        )
    return _REGISTRY[name].fn


def supports_create_graph(name: str) -> bool:
    """Whether method ``name`` returns a differentiable map with ``create_graph=True``
    (``saliency``, ``input_x_gradient``, ``integrated_gradients``, ``smoothgrad``, ``gradcam``: yes;
    ``deeplift``, ``lrp``: no, captum engine; ``beta_smooth``, ``uniform_grad``: yes; ``local_smooth``: yes,
    unrolled through its optimisation steps).

    >>> supports_create_graph("integrated_gradients"), supports_create_graph("deeplift")
    (True, False)
    """
    get_attribution(name)
    return _REGISTRY[name].create_graph


def _is_captum_attribution(obj: Any) -> bool:
    try:
        from captum.attr import Attribution
    except ImportError:  # pragma: no cover - captum is a dependency
        return False
    return isinstance(obj, Attribution)


def _rebind_captum(obj: Any, model: nn.Module) -> Any:
    """A shallow copy of a captum ``Attribution`` whose forward function is ``model`` (the same object when it
    already is); wrapped attributions (``NoiseTunnel``) are re-bound recursively."""
    if getattr(obj, "forward_func", None) is model and not hasattr(obj, "attribution_method"):
        return obj
    new = copy.copy(obj)
    if hasattr(new, "attribution_method"):
        new.attribution_method = _rebind_captum(new.attribution_method, model)
    if hasattr(new, "forward_func"):
        new.forward_func = model
    return new


def resolve_attribution(method: str | AttributionFn | Any, name: str = "method") -> AttributionSpec:
    """Turn what a user passes as an explainer into an :class:`AttributionSpec`:

    * a registered name;
    * a callable ``f(model, x, target) -> (B, C, H, W)``; it supports ``create_graph`` when it takes a
      ``create_graph`` keyword (or has an attribute ``supports_create_graph = True``);
    * a captum ``Attribution`` object (e.g. ``captum.attr.Saliency(model)``), called as
      ``obj.attribute(x, target=target, **opts)`` with its forward function bound to the model being explained
      (so the same object explains the original network and, in random attacks, any perturbed input). Captum
      cannot be differentiated through: gradient attacks need a differentiable ``surrogate`` method.

    >>> import torch
    >>> from captum.attr import InputXGradient
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    >>> spec = resolve_attribution(InputXGradient(net))
    >>> spec.name, spec.create_graph, spec(net, torch.rand(2, 3, 2, 2), torch.tensor([0, 1])).shape
    ('captum.InputXGradient', False, torch.Size([2, 3, 2, 2]))
    """
    if isinstance(method, AttributionSpec):
        return method
    if isinstance(method, str):
        if method not in _REGISTRY:
            _unknown(method, name)
        return _REGISTRY[method]
    if _is_captum_attribution(method):
        obj = method

        def captum_fn(
            model: nn.Module, x: Tensor, target: TargetType = None, *, create_graph: bool = False, **opts: Any
        ) -> Tensor:
            if target is None:
                with torch.no_grad():
                    target = model(x).argmax(1)
            return _rebind_captum(obj, model).attribute(x, target=target, **opts).detach()

        return AttributionSpec(f"captum.{type(obj).__name__}", captum_fn, create_graph=False)
    if callable(method):
        f = method
        try:
            params = inspect.signature(f).parameters
        except (TypeError, ValueError):
            params = {}
        takes_cg = "create_graph" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        differentiable = bool(getattr(f, "supports_create_graph", "create_graph" in params))

        def user_fn(
            model: nn.Module, x: Tensor, target: TargetType = None, *, create_graph: bool = False, **opts: Any
        ) -> Tensor:
            out = f(model, x, target, create_graph=create_graph, **opts) if takes_cg else f(model, x, target, **opts)
            if not isinstance(out, Tensor) or out.shape[0] != x.shape[0] or out.ndim != 4:
                raise ValueError(
                    f"explainer `{name}`={getattr(f, '__name__', f)!r} must return attributions (B, C, H, W) "
                    f"for x of shape {tuple(x.shape)}, got {getattr(out, 'shape', type(out).__name__)}"
                )
            return out if create_graph else out.detach()

        label = getattr(f, "__name__", type(f).__name__)
        return AttributionSpec(label, user_fn, create_graph=differentiable)
    raise TypeError(
        f"`{name}` must be a registered method name ({', '.join(list_attributions())}), a callable "
        f"f(model, x, target) -> (B, C, H, W) or a captum Attribution object; got {type(method).__name__}"
    )


def _unknown(method: str, name: str) -> None:
    raise ValueError(
        f"unknown attribution method `{name}`={method!r}; registered: {', '.join(list_attributions())}; "
        f"explanation defenses: {', '.join(list_robust_attributions())}; or pass a callable "
        "f(model, x, target) or a captum Attribution object"
    )


def attribute(
    name: str | AttributionFn | Any,
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    **opts: Any,
) -> Tensor:
    """Run the method ``name`` (a registered name, a callable or a captum ``Attribution``; see
    :func:`resolve_attribution`), i.e. ``get_attribution(name)(model, x, target, create_graph=..., **opts)``.

    ``create_graph=True`` with a method that does not support it raises ``ValueError``; unknown
    ``opts`` raise ``TypeError`` naming the option.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
        >>> attribute("integrated_gradients", net, torch.rand(2, 3, 4, 4), steps=10).shape
        torch.Size([2, 3, 4, 4])
    """
    return resolve_attribution(name, "name")(model, x, target, create_graph=create_graph, **opts)
