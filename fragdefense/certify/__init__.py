"""Certified attributions by randomized smoothing.

* :func:`certify_attribution` - pixel-level certificates of a sparsified attribution map (Anani, Lorenz, Fritz &
  Schiele, "Pixel-level Certified Explanations via Randomized Smoothing"; certification as in Fischer, Baader &
  Vechev, "Scalable Certified Segmentation via Randomized Smoothing").
* :func:`sparsified_smoothgrad_certificate`, :func:`topk_overlap_bound` - a certified lower bound on the top-k
  overlap of sparsified SmoothGrad (Levine, Singla & Feizi, "Certifiably Robust Interpretation in Deep Learning").
* :mod:`fragdefense.certify.metrics` - certified rate vs radius, certified localization, certified deletion.
* :mod:`fragdefense.certify.stats` - batched binomial tests, Clopper-Pearson bounds, Holm / Bonferroni, ``Phi^-1``.

>>> import torch
>>> from fragdefense.certify import certify_attribution
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
>>> res = certify_attribution(net, torch.rand(2, 3, 8, 8), "saliency", sigma=0.25, n=100, generator=[0, 1])
>>> res.labels.shape, round(res.common_radius, 4), res.certified_rate_at([0.0, 0.1]).shape
(torch.Size([2, 8, 8]), 0.1686, torch.Size([2, 2]))
"""

from fragdefense.certify.metrics import DeletionResult, certified_deletion, certified_localization, certified_rate_curve
from fragdefense.certify.smoothing import (
    CORRECTIONS,
    CertifiedAttribution,
    SmoothGradCertificate,
    certify_attribution,
    sparsified_smoothgrad_certificate,
    sparsify_top_k,
    top_percent_to_k,
    topk_overlap_bound,
)
from fragdefense.certify.stats import (
    binom_test_one_sided,
    bonferroni,
    clopper_pearson_lower,
    clopper_pearson_upper,
    holm,
    norm_ppf,
)

__all__ = [
    "CORRECTIONS",
    "CertifiedAttribution",
    "certify_attribution",
    "SmoothGradCertificate",
    "sparsified_smoothgrad_certificate",
    "topk_overlap_bound",
    "sparsify_top_k",
    "top_percent_to_k",
    "certified_rate_curve",
    "certified_localization",
    "certified_deletion",
    "DeletionResult",
    "binom_test_one_sided",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "bonferroni",
    "holm",
    "norm_ppf",
]
