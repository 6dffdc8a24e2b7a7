"""Training-objective regularizers (attribution-robustness defenses), one small ``nn.Module`` each.

The :class:`~fragdefense.lit.ClassifierModule` calls, every training step,

* :meth:`Regularizer.training_input` - may replace the training input (adversarial methods);
* :meth:`Regularizer.loss_terms` - the penalty, weighted by ``weight * warmup(epoch)``, and values to log;

and :meth:`Regularizer.prepare_model` once before training. :class:`Compose` sums several. Objectives and
papers are in each class's docstring and in `docs/background.md` §5.

=================  ====================================  ===========================
name               class                                 objective
=================  ====================================  ===========================
``input_grad``     :class:`InputGradient`                CE + l ||grad_x CE||^2
``ig_norm``        :class:`IGNorm`                       CE + l ||IG^l(x, x')||_1
``ig_sum_norm``    :class:`IGSumNorm`                    CE(x') + b ||IG^l(x, x')||_1
``art``            :class:`ART`                          CE(x_a) + w softplus(d_ap - d_an)
``ssr``            :class:`SSR`                          CE + w lambda_max(input Hessian)
``igr``            :class:`IGR`                          base + l (1 - cos(IG(x), IG(x')))
``pgd_at``         :class:`PGDAdversarialTraining`       CE(PGD(x))
``trades``         :class:`TRADES`                       CE + b KL(p(x) || p(x'))
``cure``           :class:`CURE`                         CE + l ||grad(x + hz) - grad(x)||^2
``softplus_beta``  :class:`SoftplusBeta`                 softplus(beta) activations
=================  ====================================  ===========================
"""

from fragdefense.regularizers.adversarial import TRADES, PGDAdversarialTraining
from fragdefense.regularizers.art import ART, SoftplusBeta, alignment_triplet
from fragdefense.regularizers.base import (
    Compose,
    Regularizer,
    RegularizerOutput,
    StepLoss,
    eval_mode,
    regularized_loss,
)
from fragdefense.regularizers.gradient import CURE, InputGradient
from fragdefense.regularizers.integrated import IGR, IGNorm, IGSumNorm, loss_path_ig
from fragdefense.regularizers.registry import REGULARIZERS, create_regularizer, list_regularizers, register_regularizer
from fragdefense.regularizers.ssr import SSR, ce_input_hessian_lambda_max, input_jacobian

__all__ = [
    "Regularizer",
    "RegularizerOutput",
    "Compose",
    "eval_mode",
    "regularized_loss",
    "StepLoss",
    "InputGradient",
    "CURE",
    "IGNorm",
    "IGSumNorm",
    "IGR",
    "loss_path_ig",
    "ART",
    "alignment_triplet",
    "SoftplusBeta",
    "SSR",
    "ce_input_hessian_lambda_max",
    "input_jacobian",
    "PGDAdversarialTraining",
    "TRADES",
    "REGULARIZERS",
    "register_regularizer",
    "create_regularizer",
    "list_regularizers",
]
