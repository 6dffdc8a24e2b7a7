"""Gradient attributions: simple gradient (saliency) and gradient x input.

Both support ``create_graph=True`` (the map is differentiable w.r.t. the input and the parameters).
"""

from __future__ import annotations

from torch import Tensor, nn

from fragdefense.attributions._common import (
    OutputType,
    TargetType,
    check_model,
    check_output,
    check_target_form,
    check_x,
    grad_input,
    input_gradient,
)

__all__ = ["saliency", "input_x_gradient"]


def saliency(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    abs: bool = False,
    output: OutputType = "logit",
) -> Tensor:
    """Simple gradient (SG): ``g = d s_c(x) / dx`` per channel, shape ``(B, C, H, W)``.

    ``s_c`` is the pre-softmax logit of class ``c`` (``output="prob"``: the softmax probability).
    One forward and one backward pass for the whole batch.

    Args:
        model: ``nn.Module`` mapping images ``(B, C, H, W)`` in ``[0, 1]`` to logits ``(B, K)``. Its
            train/eval mode is left as the caller set it.
        x: images ``(B, C, H, W)`` in ``[0, 1]``.
        target: ``None`` = the predicted class (argmax of the logits, taken from the same forward
            pass), an ``int``, or a ``LongTensor (B,)``.
        create_graph: supported. ``True`` returns a map differentiable w.r.t. ``x`` and the model
            parameters (double back-propagation); ``False`` returns a detached tensor.
        abs: return ``|g|`` (captum's ``Saliency`` default is ``abs=True``; ours is the raw gradient).
        output: ``"logit"`` (default) or ``"prob"``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
        >>> x = torch.rand(2, 3, 4, 4)
        >>> g = saliency(net, x, target=1)
        >>> torch.allclose(g, net[1].weight[1].view(1, 3, 4, 4).expand(2, -1, -1, -1))
        True
    """
    check_model(model)
    check_x(x)
    check_output(output)
    form = check_target_form(target, x.shape[0])
    inp = grad_input(x, create_graph)
    g, _ = input_gradient(model, inp, form, output, create_graph)
    if abs:
        g = g.abs()
    return g if create_graph else g.detach()


def input_x_gradient(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    output: OutputType = "logit",
) -> Tensor:
    """Gradient x input: ``x * d s_c(x) / dx``, shape ``(B, C, H, W)`` (as captum ``InputXGradient``).

    ``create_graph``: supported (differentiable w.r.t. ``x`` and the parameters). ``target`` and
    ``output`` as in :func:`saliency`.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
        >>> x = torch.rand(2, 3, 4, 4)
        >>> a = input_x_gradient(net, x, target=torch.tensor([0, 4]))
        >>> torch.allclose(a.sum((1, 2, 3)), net(x)[[0, 1], [0, 4]] - net[1].bias[[0, 4]])
        True
    """
    g = saliency(model, x, target, create_graph=create_graph, output=output)
    return x * g if create_graph else x.detach() * g
