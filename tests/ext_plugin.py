"""An extension package outside fragdefense: one model, one attack, one metric, one defense and one explainer,
each a function or class plus its registration (what docs/extending.md describes). Loaded by the commands with
``plugins=[ext_plugin]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fragdefense.attacks import register_attack
from fragdefense.attributions import register_attribution, saliency
from fragdefense.metrics.registry import register_metric
from fragdefense.models import register_model
from fragdefense.regularizers import Regularizer, RegularizerOutput, register_regularizer


# --- a model: functional ReLUs (the attack smooths them too) ---------------------------------------------------
class ExtNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.c1(x))
        z = torch.relu(self.c2(z))
        return self.fc(z.mean((2, 3)))


@register_model("ext_net")
def ext_net(num_classes: int = 10, width: int = 8) -> nn.Module:
    return ExtNet(num_classes, width)


# --- an attack: push map mass off the clean top-k pixels onto the rest -----------------------------------------
@register_attack("ext_spread", criterion="dissimilarity", description="spread the map off its top-k pixels")
def ext_spread(m: torch.Tensor, ctx) -> torch.Tensor:
    return (m * (1 - ctx.topk_mask)).amax((1, 2)) - (m * ctx.topk_mask).sum((1, 2))


# --- a metric: L1 distance of the maps -------------------------------------------------------------------------
@register_metric("ext_l1", label="L1 map distance", similarity=False)
def ext_l1(adv: torch.Tensor, clean: torch.Tensor, opts: dict) -> torch.Tensor:
    return (adv - clean).abs().flatten(1).sum(1)


# --- an explainer: squared gradient (differentiable) -----------------------------------------------------------
@register_attribution("ext_grad_sq", create_graph=True)
def ext_grad_sq(model, x, target=None, *, create_graph=False):
    return saliency(model, x, target, create_graph=create_graph) ** 2


# --- a defense: penalise the logit norm ------------------------------------------------------------------------
@register_regularizer
class ExtLogitPenalty(Regularizer):
    name = "ext_logit_penalty"

    def penalty(self, model, x, x_train, y, logits) -> RegularizerOutput:
        return RegularizerOutput(logits.pow(2).mean())
