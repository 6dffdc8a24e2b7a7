"""Training-objective regularizers (defenses). The base interface is here; the defenses issue adds the
methods. A regularizer is an ``nn.Module`` the :class:`~fragdefense.lit.ClassifierModule` calls each step:

* :meth:`Regularizer.training_input` may replace the training input (adversarial methods);
* :meth:`Regularizer.penalty` returns a scalar added to the loss with weight ``weight * warmup(epoch)``.
"""

from fragdefense.regularizers.base import Regularizer, RegularizerOutput

__all__ = ["Regularizer", "RegularizerOutput"]
