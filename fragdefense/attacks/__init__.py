"""Attacks: on interpretations (Ghorbani et al. Algorithm 1, IFIA, Dombrowski's manipulation, random
baselines) and on labels (PGD; robust accuracy under PGD and AutoAttack in
:mod:`fragdefense.attacks.robust_accuracy`), with L-inf / L2 threat models."""

from fragdefense.attacks.interpretation import (
    CRITERIA,
    INTERPRETATION_ATTACKS,
    PROTOCOLS,
    InterpretationAttackResult,
    attack_interpretation,
    beta_schedule,
)
from fragdefense.attacks.pgd import pgd_attack
from fragdefense.attacks.registry import (
    ATTACKS,
    AttackContext,
    AttackSpec,
    get_attack,
    get_criterion,
    list_attacks,
    list_criteria,
    register_attack,
    register_criterion,
    unregister_attack,
)
from fragdefense.attacks.robust_accuracy import (
    LABEL_ATTACKS,
    RobustAccuracyResult,
    list_label_attacks,
    register_label_attack,
    robust_accuracy,
)
from fragdefense.attacks.threat import L2Threat, LinfThreat, ThreatModel, make_threat

__all__ = [
    "ATTACKS",
    "AttackContext",
    "AttackSpec",
    "get_attack",
    "get_criterion",
    "list_attacks",
    "list_criteria",
    "register_attack",
    "register_criterion",
    "unregister_attack",
    "CRITERIA",
    "INTERPRETATION_ATTACKS",
    "PROTOCOLS",
    "InterpretationAttackResult",
    "attack_interpretation",
    "beta_schedule",
    "pgd_attack",
    "L2Threat",
    "LinfThreat",
    "ThreatModel",
    "make_threat",
    "LABEL_ATTACKS",
    "RobustAccuracyResult",
    "list_label_attacks",
    "register_label_attack",
    "robust_accuracy",
]
