"""Base class of the training regularizers, and their composition (plain torch, no Lightning)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fragdefense.models.batchnorm import double_backward_batchnorm_
from fragdefense.utils.checks import as_model_dtype, check_images, check_int_in_range, check_labels, check_probability

# the one eval-mode context of the package (restores every submodule's own flag); re-exported here so that
# ``fragdefense.regularizers.eval_mode`` keeps working. Adversarial examples for training are generated in
# eval mode by default (as MadryLab ``robustness`` and TRADES do), so the attack does not update BatchNorm
# statistics.
from fragdefense.utils.conventions import eval_mode

__all__ = [
    "Regularizer",
    "RegularizerOutput",
    "Compose",
    "eval_mode",
    "per_sample_ce_input_grad",
    "same_input",
    "regularized_loss",
    "StepLoss",
    "check_max_samples",
    "check_attack_mode",
    "check_steps",
]


def check_attack_mode(mode: str) -> str:
    """``"eval"`` (attack with BatchNorm statistics frozen) or ``"train"``."""
    if mode not in ("eval", "train"):
        raise ValueError(f"`attack_mode` must be 'eval' or 'train', got {mode!r}")
    return mode


def check_steps(steps: int, attack_steps: int | None, default: int, owner: str) -> int:
    """The inner attack's iteration count ``steps`` (>= 0), with ``attack_steps`` its deprecated alias (older
    configs): the alias wins when given, with a ``DeprecationWarning``; both given and different is an error.

    >>> check_steps(3, None, 3, "ART")
    3
    """
    if attack_steps is not None:
        warnings.warn(
            f"{owner}: `attack_steps` is deprecated, use `steps` (the name every attack and regularizer uses)",
            DeprecationWarning,
            stacklevel=3,
        )
        if steps != default and steps != attack_steps:
            raise ValueError(f"{owner}: give `steps` only (got steps={steps!r} and attack_steps={attack_steps!r})")
        steps = attack_steps
    return check_int_in_range(steps, "steps", 0)


def check_max_samples(max_samples: int | None) -> int | None:
    """``None`` (the whole batch) or an int ``>= 1``: how many images of a batch an expensive penalty uses."""
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"`max_samples` must be an int >= 1 or None, got {max_samples!r}")
    return max_samples


def same_input(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` is ``b`` or a detached/grad-enabled view of the same storage (the clean input)."""
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr())


@dataclass
class RegularizerOutput:
    """What a regularizer contributes to one training step."""

    penalty: Tensor | None = None  # un-weighted scalar term
    logs: dict[str, Tensor] = field(default_factory=dict)


def per_sample_ce_input_grad(logits: Tensor, x: Tensor, y: Tensor, create_graph: bool = True) -> Tensor:
    """``d CE(logits_b, y_b) / d x_b`` for every sample (one backward of the summed loss; samples are
    independent in eval-mode or per-sample networks, and in train-mode BatchNorm the cross-sample terms are
    part of the true gradient of the batch loss)."""
    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return g


class Regularizer(nn.Module):
    """Base class: ``loss = task_loss(model(training_input(x))) + weight * warmup(epoch) * penalty``.

    Subclasses override any of:

    * :meth:`prepare_model` - change the model once before training (e.g. softplus activations);
    * :meth:`training_input` - replace the training input (adversarial training);
    * :meth:`penalty` - an extra term on the clean ``x`` and/or the training input.

    Args:
        weight: multiplier of the penalty term (lambda in the papers), ``>= 0``.
        warmup_epochs: the weight ramps linearly from 0 to ``weight`` over this many epochs.
    """

    name = "base"
    #: the task forward pass runs on an input that requires grad, so the penalty can differentiate
    #: ``logits`` w.r.t. ``x_train`` without a second forward pass
    needs_input_grad = False
    #: the penalty back-propagates through a first backward pass (input gradients, IG, Hessians): training-mode
    #: BatchNorm then gets the closed-form double backward (:func:`~fragdefense.models.double_backward_batchnorm_`)
    second_order = False

    def __init__(self, weight: float = 1.0, warmup_epochs: float = 0.0) -> None:
        super().__init__()
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= float(weight) < float("inf"):
            raise ValueError(f"`weight` must be a number >= 0 (finite), got {weight!r}")
        if not isinstance(warmup_epochs, (int, float)) or not 0 <= float(warmup_epochs) < float("inf"):
            raise ValueError(f"`warmup_epochs` must be a number >= 0, got {warmup_epochs!r}")
        self.weight = float(weight)
        self.warmup_epochs = float(warmup_epochs)

    def current_weight(self, epoch: float) -> float:
        """Weight after the linear warm-up at (fractional) ``epoch``.

        >>> Regularizer(weight=2.0, warmup_epochs=4).current_weight(1.0)
        0.5
        """
        if self.warmup_epochs <= 0:
            return self.weight
        return self.weight * min(1.0, float(epoch) / self.warmup_epochs)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Called once before training; returns the model to train (default: ``model`` itself; with
        :attr:`second_order`, its BatchNorm layers get a cheap exact double backward,
        :func:`~fragdefense.models.double_backward_batchnorm_`)."""
        if self.second_order:
            double_backward_batchnorm_(model)
        return model

    def model_config_update(self) -> dict:
        """Entries merged into the stored ``model_config`` so a checkpoint rebuilds the trained model."""
        return {}

    def training_input(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Input the task loss is computed on (default: ``x`` itself)."""
        return x

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        """Un-weighted penalty on the clean ``x`` / training input ``x_train`` (default: none).

        ``logits = model(x_train)`` from the task forward pass (with its graph).
        """
        return RegularizerOutput()

    def loss_terms(
        self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor, epoch: float
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Weighted penalty (``None`` when there is none) and the values to log (the raw terms)."""
        out = self.penalty(model, x, x_train, y, logits)
        logs = {k: v.detach() for k, v in out.logs.items()}
        if out.penalty is None:
            return None, logs
        logs.setdefault(self.name, out.penalty.detach())
        w = self.current_weight(epoch)
        return w * out.penalty, logs

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, warmup_epochs={self.warmup_epochs:g}"


class Compose(Regularizer):
    """Several regularizers summed: ``loss = task(training_input) + sum_i w_i(epoch) * penalty_i``.

    At most one member may replace the training input (e.g. ``pgd_at``); every member's penalty sees that
    input as ``x_train`` - so ``Compose([PGDAdversarialTraining(), IGR()])`` is IGR on Madry's adversarial
    examples. Model preparation is applied in order.

    >>> from fragdefense.regularizers import InputGradient, PGDAdversarialTraining
    >>> reg = Compose([PGDAdversarialTraining(steps=1), InputGradient(weight=0.1)])
    >>> [t.name for t in reg.terms]
    ['pgd_at', 'input_grad']
    """

    name = "compose"

    def __init__(self, terms: Sequence[Regularizer]) -> None:
        super().__init__(weight=1.0)
        terms = list(terms.values()) if isinstance(terms, dict) else list(terms)
        if not terms or not all(isinstance(t, Regularizer) for t in terms):
            raise ValueError("`terms` must be a non-empty list of Regularizer instances")
        replacing = [t.name for t in terms if type(t).training_input is not Regularizer.training_input]
        if len(replacing) > 1:
            raise ValueError(f"`terms`: at most one regularizer may replace the training input, got {replacing}")
        self.terms = nn.ModuleList(terms)
        self.needs_input_grad = any(t.needs_input_grad for t in terms)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        for t in self.terms:
            model = t.prepare_model(model)
        return model

    def model_config_update(self) -> dict:
        out: dict = {}
        for t in self.terms:
            out.update(t.model_config_update())
        return out

    def training_input(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        for t in self.terms:
            if type(t).training_input is not Regularizer.training_input:
                return t.training_input(model, x, y)
        return x

    def loss_terms(
        self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor, epoch: float
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        for t in self.terms:
            term, tl = t.loss_terms(model, x, x_train, y, logits, epoch)
            logs.update(tl)
            if term is not None:
                total = term if total is None else total + term
        return total, logs

    def extra_repr(self) -> str:
        return ""


@dataclass
class StepLoss:
    """One training step's loss and its parts (see :func:`regularized_loss`)."""

    loss: Tensor
    task: Tensor
    term: Tensor | None
    logs: dict[str, Tensor]
    logits: Tensor
    x_train: Tensor


def regularized_loss(
    model: nn.Module,
    regularizer: Regularizer | None,
    x: Tensor,
    y: Tensor,
    epoch: float = 0.0,
    label_smoothing: float = 0.0,
) -> StepLoss:
    """The training objective of one step, exactly as :class:`~fragdefense.lit.ClassifierModule` computes it:
    ``CE(model(x_train), y) + weight(epoch) * penalty`` with ``x_train = regularizer.training_input(x)``.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    >>> from fragdefense.regularizers import InputGradient
    >>> out = regularized_loss(net, InputGradient(weight=0.1), torch.rand(2, 3, 4, 4), torch.tensor([0, 2]))
    >>> bool(out.loss > out.task), sorted(out.logs)
    (True, ['input_grad'])

    Checked before any work: ``x`` a non-empty batch of images in ``[0, 1]`` (float64 images run in the model's
    dtype, :func:`~fragdefense.utils.checks.as_model_dtype`), ``y`` one integer label per image in
    ``[0, K - 1]`` (``K`` = ``model.num_classes`` when the model has it, else the logits' width, checked on the
    task forward pass before the loss), ``label_smoothing`` in ``[0, 1]``.
    """
    x = as_model_dtype(check_images(x, "x"), model)
    k = getattr(model, "num_classes", None)
    k = k if isinstance(k, int) and not isinstance(k, bool) else None
    y = check_labels(y, x.shape[0], k, "y")
    label_smoothing = check_probability(label_smoothing, "label_smoothing")
    reg = regularizer
    x_train = reg.training_input(model, x, y) if reg is not None else x
    if reg is not None and reg.needs_input_grad:
        x_train = x_train.detach().requires_grad_(True)
    logits = model(x_train)
    if k is None:
        check_labels(y, x.shape[0], logits.shape[-1], "y")
    task = nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
    term, logs = (None, {}) if reg is None else reg.loss_terms(model, x, x_train, y, logits, epoch)
    loss = task if term is None else task + term
    return StepLoss(loss, task, term, logs, logits, x_train)
