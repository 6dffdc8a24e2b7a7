"""Models whose ``forward`` returns more than logits (tuples, dicts, dataclasses): select the logits once.

>>> import torch
>>> from torch import nn
>>> class TwoHeads(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc = nn.Linear(4, 3)
...     def forward(self, x):
...         z = self.fc(x.flatten(1))
...         return {"logits": z, "aux": z.detach()}
>>> net = with_output(TwoHeads(), "logits")
>>> net(torch.rand(2, 1, 2, 2)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["OutputSelector", "with_output", "check_logits"]

OutputFn = Callable[[Any], Tensor] | int | str


def _select(out: Any, output_fn: OutputFn) -> Any:
    if callable(output_fn):
        return output_fn(out)
    if isinstance(output_fn, str) and not isinstance(out, dict):
        return getattr(out, output_fn)
    return out[output_fn]


class OutputSelector(nn.Module):
    """``output_fn(model(x))``: ``output_fn`` is a callable, a key (dicts, attribute names) or an index (tuples).
    The wrapped model is a submodule (parameters shared)."""

    def __init__(self, model: nn.Module, output_fn: OutputFn) -> None:
        super().__init__()
        if not (callable(output_fn) or isinstance(output_fn, (int, str))) or isinstance(output_fn, bool):
            raise TypeError(
                "`output_fn` must be a callable output -> logits, a dict key / attribute name (str) or a tuple "
                f"index (int), got {output_fn!r}"
            )
        self.model = model
        self.output_fn = output_fn

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model(*args, **kwargs)
        try:
            return _select(out, self.output_fn)
        except (KeyError, IndexError, AttributeError, TypeError) as e:
            raise ValueError(
                f"`output_fn`={self.output_fn!r} cannot select the logits from the model's output of type "
                f"{type(out).__name__} ({type(e).__name__}: {e})"
            ) from None


def with_output(model: nn.Module, output_fn: OutputFn | None) -> nn.Module:
    """``model`` itself when ``output_fn`` is ``None``, else an :class:`OutputSelector` around it."""
    return model if output_fn is None else OutputSelector(model, output_fn)


def check_logits(out: Any, batch_size: int, where: str = "model") -> Tensor:
    """Raise a clear error unless ``out`` is a logits tensor ``(batch_size, K)``.

    >>> import torch
    >>> check_logits(torch.zeros(2, 5), 2).shape
    torch.Size([2, 5])
    """
    if not isinstance(out, Tensor):
        raise TypeError(
            f"`{where}` returned {type(out).__name__}, expected logits (B, K); for a model that returns a tuple, "
            "dict or dataclass pass `output_fn` (an index, a key or a callable selecting the logits)"
        )
    if out.ndim != 2 or out.shape[0] != batch_size:
        raise ValueError(f"`{where}` must return logits of shape ({batch_size}, K), got {tuple(out.shape)}")
    return out
