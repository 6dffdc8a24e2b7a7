"""Base class of the training regularizers (plain torch, no Lightning)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = ["Regularizer", "RegularizerOutput"]


@dataclass
class RegularizerOutput:
    """What a regularizer contributes to one training step."""

    penalty: Tensor | None = None  # un-weighted scalar term
    logs: dict[str, Tensor] = field(default_factory=dict)


class Regularizer(nn.Module):
    """Base class: ``loss = task_loss(model(training_input(x))) + weight * warmup(epoch) * penalty``.

    Args:
        weight: multiplier of the penalty term (lambda in the papers).
        warmup_epochs: the weight ramps linearly from 0 to ``weight`` over this many epochs.
    """

    name = "base"

    def __init__(self, weight: float = 1.0, warmup_epochs: float = 0.0) -> None:
        super().__init__()
        if float(weight) < 0:
            raise ValueError(f"`weight` must be >= 0, got {weight!r}")
        if float(warmup_epochs) < 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {warmup_epochs!r}")
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

    def training_input(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Input the task loss is computed on (default: ``x`` itself)."""
        return x

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        """Penalty on the clean ``x`` / training input ``x_train`` (default: none)."""
        return RegularizerOutput()
