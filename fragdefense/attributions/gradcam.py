"""Grad-CAM (Selvaraju et al. 2017), differentiable (own implementation, captum is the test reference)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.attributions._common import (
    TargetType,
    check_model,
    check_target_form,
    check_x,
    grad_input,
    resolve_target,
    target_scores,
)
from fragdefense.attributions._common import check_logits as _check_logits

__all__ = ["gradcam", "find_last_conv"]


def find_last_conv(model: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` of ``model`` in ``model.modules()`` (registration) order.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> find_last_conv(net) is net[2]
    True
    """
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    if last is None:
        raise ValueError("`layer` must be given: `model` contains no nn.Conv2d to use as the default Grad-CAM layer")
    return last


def _resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    if layer is None:
        return find_last_conv(model)
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"`layer`={layer!r} is not a submodule name of `model` (see model.named_modules())")
        return modules[layer]
    if not isinstance(layer, nn.Module) or not any(m is layer for m in model.modules()):
        raise ValueError("`layer` must be a submodule of `model`, its name, or None (last nn.Conv2d)")
    return layer


def gradcam(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    layer: nn.Module | str | None = None,
    relu: bool = True,
) -> Tensor:
    """Grad-CAM upsampled to the input size, shape ``(B, 1, H, W)`` (a single channel: ``C = 1``).

    With ``A`` the output ``(B, K, h, w)`` of ``layer`` and ``s_c`` the target logit:
    ``cam = ReLU(sum_k alpha_k A_k)``, ``alpha_k = mean_{ij} ds_c/dA_kij``, then bilinear upsampling
    (``align_corners=False``) to ``(H, W)``. Equals captum's ``LayerGradCam(model, layer)`` with
    ``relu_attributions=relu`` followed by ``LayerAttribution.interpolate(..., (H, W), "bilinear")``.

    Args:
        model, x, target: as in :func:`~fragdefense.attributions.saliency` (``target=None``: predicted
            class from the same forward pass).
        create_graph: supported. ``True`` keeps the graph so the map is differentiable w.r.t. ``x`` and
            the parameters (for a ReLU network the weights ``alpha`` are piecewise constant in ``x``).
        layer: the module whose output is used (a module of ``model`` or its name in
            ``model.named_modules()``); default: the last ``nn.Conv2d``. It must run once per forward
            and return a ``(B, K, h, w)`` tensor.
        relu: apply the ReLU of the Grad-CAM definition (captum's default is ``False``).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))
        >>> cam = gradcam(net, torch.rand(2, 3, 8, 8))
        >>> cam.shape, bool((cam >= 0).all())
        (torch.Size([2, 1, 8, 8]), True)
    """
    check_model(model)
    check_x(x)
    form = check_target_form(target, x.shape[0])
    mod = _resolve_layer(model, layer)
    captured: list[Tensor] = []

    def hook(_m: nn.Module, _inp: Any, out: Any) -> Tensor:
        if not isinstance(out, Tensor):
            raise ValueError(f"`layer` must output a tensor (B, K, h, w), got {type(out).__name__}")
        captured.append(out)
        return out.clone()  # later in-place ops (e.g. ReLU(inplace=True)) cannot modify the captured A

    inp = grad_input(x, create_graph)
    handle = mod.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = _check_logits(model(inp), x.shape[0])
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"`layer` must run exactly once per forward pass, it ran {len(captured)} times")
    act = captured[0]
    if act.ndim != 4 or act.shape[0] != x.shape[0]:
        raise ValueError(f"`layer` output must have shape (B, K, h, w), got {tuple(act.shape)}")
    with torch.enable_grad():
        t = logits.detach().argmax(1) if form is None else resolve_target(form, x.shape[0], logits.shape[1], x.device)
        score = target_scores(logits, t, "logit")
        (grad,) = torch.autograd.grad(
            score, act, grad_outputs=torch.ones_like(score), create_graph=create_graph, allow_unused=True
        )
        if grad is None:
            grad = torch.zeros_like(act)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = (weights * act).sum(dim=1, keepdim=True)
        if relu:
            cam = F.relu(cam)
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam if create_graph else cam.detach()
