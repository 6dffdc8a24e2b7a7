"""Differentiable attribution (saliency) maps: plain torch, captum only as engine for DeepLIFT/LRP.

Every method has one call shape::

    method(model, x, target=None, *, create_graph=False, **opts) -> Tensor (B, C, H, W)

``x`` are images ``(B, C, H, W)`` in ``[0, 1]``; ``target`` is ``None`` (predicted class), an ``int``
or a ``LongTensor (B,)``. With ``create_graph=True`` the result is differentiable w.r.t. the input and
the model parameters (attacks and regularisers back-propagate through it); otherwise it is detached.
The model's train/eval mode and its parameters' ``requires_grad`` are never changed.

=======================  =============  ==========================================================
method                   create_graph   definition
=======================  =============  ==========================================================
``saliency``             yes            ``d s_c / dx`` (raw gradient; ``abs=True`` for ``|.|``)
``input_x_gradient``     yes            ``x * d s_c / dx``
``integrated_gradients`` yes            ``(x - x0) * mean_i d s_c(x0 + i/m (x - x0)) / dx``
``smoothgrad``           yes            mean (sq / var) of gradients at ``x + sigma * N(0, I)``
``gradcam``              yes            ReLU(sum_k mean(dS/dA_k) A_k), upsampled, ``C = 1``
``deeplift``             no (captum)    DeepLIFT Rescale
``lrp``                  no (captum)    LRP-epsilon
=======================  =============  ==========================================================

Explanation-side defenses (:mod:`fragdefense.attributions.robust`, listed by
:func:`list_robust_attributions`, resolved by the same :func:`get_attribution` / :func:`attribute`):

=======================  =============  ==========================================================
``beta_smooth``          yes (exact)    gradient of the softplus(beta) copy (Dombrowski et al.)
``uniform_grad``         yes            mean gradient over uniform noise in an L-inf / L2 ball
``local_smooth``         yes (unrolled) mask learned over noisy copies with an L1 penalty
=======================  =============  ==========================================================

:func:`to_map` reduces channels (default ``sum_c |a_c|``) and normalises each map to sum 1.

>>> import torch
>>> from fragdefense.attributions import attribute, to_map
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
>>> maps = to_map(attribute("saliency", net, torch.rand(2, 3, 4, 4)))
>>> maps.shape, torch.allclose(maps.sum((1, 2)), torch.ones(2))
(torch.Size([2, 4, 4]), True)
"""

from fragdefense.attributions._common import CREATE_GRAPH_METHODS
from fragdefense.attributions.gradcam import find_last_conv, gradcam
from fragdefense.attributions.gradient import input_x_gradient, saliency
from fragdefense.attributions.integrated_gradients import IG_METHODS, ig_rule, integrated_gradients
from fragdefense.attributions.maps import REDUCTIONS, to_map
from fragdefense.attributions.propagation import deeplift, lrp
from fragdefense.attributions.registry import (
    ATTRIBUTIONS,
    ROBUST_ATTRIBUTIONS,
    AttributionFn,
    AttributionSpec,
    attribute,
    get_attribution,
    list_attributions,
    list_robust_attributions,
    register_attribution,
    resolve_attribution,
    supports_create_graph,
    unregister_attribution,
)
from fragdefense.attributions.robust import (
    BALLS,
    ROBUST_CREATE_GRAPH_METHODS,
    beta_smooth,
    local_smooth,
    local_smooth_objective,
    uniform_ball_noise,
    uniform_grad,
)
from fragdefense.attributions.smoothgrad import SMOOTHGRAD_VARIANTS, smoothgrad

__all__ = [
    "ATTRIBUTIONS",
    "AttributionFn",
    "AttributionSpec",
    "register_attribution",
    "resolve_attribution",
    "unregister_attribution",
    "BALLS",
    "CREATE_GRAPH_METHODS",
    "IG_METHODS",
    "REDUCTIONS",
    "ROBUST_ATTRIBUTIONS",
    "ROBUST_CREATE_GRAPH_METHODS",
    "SMOOTHGRAD_VARIANTS",
    "attribute",
    "beta_smooth",
    "deeplift",
    "find_last_conv",
    "get_attribution",
    "gradcam",
    "ig_rule",
    "input_x_gradient",
    "integrated_gradients",
    "list_attributions",
    "list_robust_attributions",
    "local_smooth",
    "local_smooth_objective",
    "lrp",
    "saliency",
    "smoothgrad",
    "supports_create_graph",
    "to_map",
    "uniform_ball_noise",
    "uniform_grad",
]
