"""Integrated gradients (Sundararajan et al. 2017) with bounded-memory chunking and double backprop."""

from __future__ import annotations

from functools import partial
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from fragdefense.attributions._common import (
    OutputType,
    TargetType,
    check_chunk_size,
    check_model,
    check_output,
    check_x,
    chunk_rows,
    input_gradient,
    make_baseline,
    predicted_target,
    resolve_target,
)
from fragdefense.utils.checks import check_int_in_range

__all__ = ["integrated_gradients", "ig_rule", "IG_METHODS"]

IGMethod = Literal["riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
IG_METHODS: tuple[str, ...] = (
    "riemann_right",
    "riemann_left",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)


def ig_rule(method: str, steps: int) -> tuple[list[float], list[float]]:
    """Quadrature rule ``(alphas, weights)`` on ``[0, 1]`` for ``steps`` points (float64 values).

    ``riemann_right``: ``alpha_i = i/m``, ``w_i = 1/m`` (i = 1..m, the fragility papers' rule);
    ``riemann_left``/``riemann_middle``: ``(i-1)/m`` / ``(i-1/2)/m``; ``riemann_trapezoid``:
    ``alpha = linspace(0, 1, m)``, ``w = 1/m`` with the end weights halved (as captum);
    ``gausslegendre``: Gauss-Legendre nodes and weights mapped to ``[0, 1]`` (captum's default).

    >>> ig_rule("riemann_right", 4)
    ([0.25, 0.5, 0.75, 1.0], [0.25, 0.25, 0.25, 0.25])
    """
    if method not in IG_METHODS:
        raise ValueError(f"`method` must be one of {IG_METHODS}, got {method!r}")
    check_int_in_range(steps, "steps", 2 if method == "riemann_trapezoid" else 1)
    m = steps
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(m)
        return (0.5 * (1.0 + nodes)).tolist(), (0.5 * w).tolist()
    weights = [1.0 / m] * m
    if method == "riemann_right":
        alphas = [i / m for i in range(1, m + 1)]
    elif method == "riemann_left":
        alphas = [i / m for i in range(m)]
    elif method == "riemann_middle":
        alphas = [(i + 0.5) / m for i in range(m)]
    else:  # trapezoid
        alphas = [i / (m - 1) for i in range(m)]
        weights[0] /= 2
        weights[-1] /= 2
    return alphas, weights


def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    target: TargetType = None,
    *,
    create_graph: bool = False,
    steps: int = 50,
    baseline: float | Tensor | None = None,
    output: OutputType = "logit",
    method: IGMethod = "riemann_right",
    internal_batch_size: int | None = 128,
) -> Tensor:
    """Integrated gradients ``(x - x0) * sum_i w_i dF(x0 + alpha_i (x - x0))/dx``, shape ``(B, C, H, W)``.

    With the default ``method="riemann_right"`` this is the fragility papers' definition
    ``(x - x0) * mean_{i=1..m} dF(x0 + (i/m)(x - x0))/dx`` (m = ``steps``; the papers use 100).
    ``F`` is the target logit (``output="logit"``) or the target's softmax probability
    (``output="prob"``, as in Ghorbani et al.'s code). Completeness: ``sum(IG) ~ F(x) - F(x0)``, the
    error shrinks as ``steps`` grows.

    The ``B * steps`` interpolated images are built and differentiated in chunks of
    ``internal_batch_size`` rows (``None``: all at once), so the transient memory is bounded by one
    chunk; the result does not depend on the chunking (up to float rounding). Rows are ordered
    step-major like captum (row ``r`` = step ``r // B``, image ``r % B``).

    Args:
        model, x, target: as in :func:`~fragdefense.attributions.saliency`; ``target=None`` is the
            argmax of ``model(x)`` computed without grad.
        create_graph: supported. ``True`` returns a map differentiable w.r.t. ``x`` and the parameters
            (also when chunked: every chunk's graph is kept until the caller back-propagates, so memory
            then grows with ``B * steps`` as for any double backprop through IG).
        steps: number of quadrature points ``m``.
        baseline: ``None`` (zeros, black image), a number, or a tensor broadcastable to ``x``;
            treated as a constant.
        output: ``"logit"`` or ``"prob"``.
        method: quadrature rule, see :func:`ig_rule` (captum's ``IntegratedGradients`` rules).
        internal_batch_size: rows per chunk, ``>= 1``, or ``None`` for a single chunk.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
        >>> x = torch.rand(2, 3, 4, 4)
        >>> ig = integrated_gradients(net, x, target=2, steps=8, internal_batch_size=5)
        >>> torch.allclose(ig.sum((1, 2, 3)), net(x)[:, 2] - net(torch.zeros_like(x))[:, 2], atol=1e-5)
        True
    """
    check_model(model)
    check_x(x)
    check_output(output)
    chunk = check_chunk_size(internal_batch_size)
    alphas_l, weights_l = ig_rule(method, steps)
    t = predicted_target(model, x, target, check_range=False)
    x0 = make_baseline(baseline, x)
    xs = x if create_graph else x.detach()
    b_size = x.shape[0]
    alphas = torch.tensor(alphas_l, dtype=x.dtype, device=x.device)
    weights = torch.tensor(weights_l, dtype=x.dtype, device=x.device)
    diff = xs - x0
    total = torch.zeros_like(x)
    first = True
    for rows in chunk_rows(b_size * len(alphas_l), chunk, x.device):
        k, b = rows // b_size, rows % b_size
        z = x0[b] + alphas[k].view(-1, 1, 1, 1) * diff[b]
        if not z.requires_grad:
            z.requires_grad_(True)
        check = None if (target is None or not first) else partial(resolve_target, t, b_size, device=x.device)
        first = False
        g, _ = input_gradient(model, z, t[b], output, create_graph, resolved=True, on_num_classes=check)
        total = total.index_add(0, b, g * weights[k].view(-1, 1, 1, 1))
    attr = diff * total
    return attr if create_graph else attr.detach()
