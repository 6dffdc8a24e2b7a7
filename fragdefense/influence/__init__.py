"""Influence functions (Koh & Liang), the attack on them (Ghorbani et al.), and their solvers.

* :class:`LastLayerInfluence` — exact influence through a linear last layer on frozen features (factored
  per-sample gradients, explicit Hessian, Cholesky); :func:`fit_linear_head` trains such a head to its optimum.
* :class:`ParameterInfluence` — any parameter subset: per-sample gradients with ``torch.func.vmap``, inverse
  Hessian-vector products by ``exact``, ``cg``, ``lissa`` or ``arnoldi`` (:mod:`fragdefense.influence.solvers`).
* :func:`attack_influence` — the signed-gradient attack that changes a test image's most influential training
  points, with a random-sign baseline.

Sign convention: ``I(z_j, z) = -grad L(z)^T H^-1 grad L(z_j)`` (Koh & Liang's ``I_up,loss``); negative values
are helpful training points. captum's influence scores are ``-I`` (with ``hessian_reg = N * damping``).

>>> import torch
>>> from fragdefense.influence import LastLayerInfluence, fit_linear_head
>>> _ = torch.manual_seed(0)
>>> phi, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
>>> w, b = fit_linear_head(phi, y, num_classes=3, l2=0.1)
>>> LastLayerInfluence(w, b, l2=0.1).fit(phi, y).influence(phi[:1], y[:1]).shape
torch.Size([1, 30])
"""

from fragdefense.influence.attack import (
    INFLUENCE_ATTACKS,
    InfluenceAttackResult,
    attack_influence,
    influence_scores,
    rank_scores,
)
from fragdefense.influence.last_layer import (
    LastLayerInfluence,
    feature_extractor,
    features_and_logits,
    find_head,
    fit_linear_head,
)
from fragdefense.influence.params import ParameterInfluence, select_parameters
from fragdefense.influence.solvers import (
    SOLVERS,
    arnoldi,
    conjugate_gradient,
    lissa,
    low_rank_inverse,
    solve_exact,
    top_eigenvalue,
)

__all__ = [
    "INFLUENCE_ATTACKS",
    "InfluenceAttackResult",
    "LastLayerInfluence",
    "ParameterInfluence",
    "SOLVERS",
    "arnoldi",
    "attack_influence",
    "conjugate_gradient",
    "feature_extractor",
    "features_and_logits",
    "find_head",
    "fit_linear_head",
    "influence_scores",
    "lissa",
    "low_rank_inverse",
    "rank_scores",
    "select_parameters",
    "solve_exact",
    "top_eigenvalue",
]
