"""Shared helpers of the attribution methods: argument validation, target resolution, the batched
target-score gradient and row-chunking of expanded batches (IG steps, SmoothGrad samples)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from fragdefense.utils.checks import check_images

__all__ = [
    "CREATE_GRAPH_METHODS",
    "TargetType",
    "OutputType",
    "check_model",
    "allow_unbounded_inputs",
    "check_x",
    "check_target_form",
    "resolve_target",
    "predicted_target",
    "target_scores",
    "grad_input",
    "input_gradient",
    "make_baseline",
    "chunk_rows",
    "check_chunk_size",
    "check_output",
]

TargetType = int | Tensor | Sequence[int] | None
OutputType = Literal["logit", "prob"]

_OUTPUTS = ("logit", "prob")

#: registered methods whose result is differentiable with ``create_graph=True``
CREATE_GRAPH_METHODS: tuple[str, ...] = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
)


def check_model(model: nn.Module) -> nn.Module:
    """``model`` must be a callable ``nn.Module`` mapping ``(B, C, H, W)`` to logits ``(B, K)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module returning logits (B, K), got {type(model).__name__}")
    return model


_UNBOUNDED_INPUTS: contextvars.ContextVar[bool] = contextvars.ContextVar("fragdefense_unbounded_inputs", default=False)


@contextlib.contextmanager
def allow_unbounded_inputs() -> Iterator[None]:
    """Lift the ``[0, 1]`` range check of :func:`check_x` (used by every registered attribution method) for the calls
    made in this block, in this thread / async context only (a :class:`contextvars.ContextVar`; other threads keep
    the check). Shape, dtype and finiteness are still checked. Used by randomized smoothing, whose noisy images
    ``x + eps`` leave ``[0, 1]`` by construction.

    >>> x = torch.full((1, 1, 2, 2), 1.5)
    >>> with allow_unbounded_inputs():
    ...     check_x(x).shape
    torch.Size([1, 1, 2, 2])
    >>> check_x(x)
    Traceback (most recent call last):
    ...
    ValueError: `x` must hold pixel values in [0, 1] (models normalise internally), got min=1.5, max=1.5
    """
    token = _UNBOUNDED_INPUTS.set(True)
    try:
        yield
    finally:
        _UNBOUNDED_INPUTS.reset(token)


def check_x(x: Tensor) -> Tensor:
    """Images ``(B, C, H, W)`` in ``[0, 1]`` (range not checked inside :func:`allow_unbounded_inputs`), floating,
    finite, non-empty batch."""
    if isinstance(x, Tensor) and x.numel() == 0:
        raise ValueError(f"`x` must be a non-empty batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    check_images(x.detach() if isinstance(x, Tensor) else x, "x", unit_range=not _UNBOUNDED_INPUTS.get())
    return x


def check_output(output: str) -> str:
    if output not in _OUTPUTS:
        raise ValueError(f"`output` must be one of {_OUTPUTS}, got {output!r}")
    return output


def check_chunk_size(internal_batch_size: int | None) -> int | None:
    """``None`` (no chunking) or an int ``>= 1``."""
    if internal_batch_size is None:
        return None
    if isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int):
        raise TypeError(f"`internal_batch_size` must be an int >= 1 or None, got {type(internal_batch_size).__name__}")
    if internal_batch_size < 1:
        raise ValueError(f"`internal_batch_size` must be >= 1 or None, got {internal_batch_size}")
    return internal_batch_size


def check_target_form(target: TargetType, batch_size: int) -> int | Tensor | None:
    """Validate the *form* of ``target`` (range is checked once the number of classes is known).

    Returns ``None``, an ``int``, or a 1-D integer tensor of length ``batch_size``.
    """
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError("`target` must be None, an int class index or a LongTensor (B,), got bool")
    if isinstance(target, int):
        return target
    if isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            raise TypeError("`target` given as a sequence must contain only ints")
        target = torch.tensor(list(target), dtype=torch.long)
    if not isinstance(target, Tensor):
        raise TypeError(f"`target` must be None, an int class index or a LongTensor (B,), got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"`target` must have an integer dtype (class indices), got {target.dtype}")
    if target.ndim == 0:
        return int(target)
    if target.ndim != 1 or target.shape[0] != batch_size:
        raise ValueError(
            f"`target` must be an int or have shape (B,) = ({batch_size},), got shape {tuple(target.shape)}"
        )
    return target


def resolve_target(target: int | Tensor, batch_size: int, num_classes: int, device: torch.device) -> Tensor:
    """Turn a validated ``int`` / ``(B,)`` target into a ``LongTensor (B,)`` on ``device``; check range."""
    if isinstance(target, int):
        if not 0 <= target < num_classes:
            raise ValueError(f"`target` must be a class index in [0, {num_classes}), got {target}")
        return torch.full((batch_size,), target, dtype=torch.long, device=device)
    t = target.to(device=device, dtype=torch.long)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"`target` entries must be class indices in [0, {num_classes}), got min={lo}, max={hi}")
    return t


def check_logits(logits: object, rows: int) -> Tensor:
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != rows:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"`model` must return logits of shape (B, K) = ({rows}, K), got {shape}")
    return logits


def predicted_target(model: nn.Module, x: Tensor, target: TargetType, *, check_range: bool = True) -> Tensor:
    """``LongTensor (B,)``: validated ``target``, or (``target=None``) the argmax of ``model(x)``
    computed without grad. With ``check_range`` the range of a given target is checked against the
    model's number of classes (one no-grad forward); without it, no forward is run for a given target
    and the caller checks the range on its first forward (see :func:`input_gradient`)."""
    form = check_target_form(target, x.shape[0])
    if form is not None and not check_range:
        if isinstance(form, int):
            if form < 0:
                raise ValueError(f"`target` must be a class index >= 0, got {form}")
            return torch.full((x.shape[0],), form, dtype=torch.long, device=x.device)
        return form.to(device=x.device, dtype=torch.long)
    with torch.no_grad():
        logits = check_logits(model(x.detach()), x.shape[0])
    if form is None:
        return logits.argmax(dim=1)
    return resolve_target(form, x.shape[0], logits.shape[1], x.device)


def target_scores(logits: Tensor, target: Tensor, output: str) -> Tensor:
    """Score ``(N,)`` of the target class: the logit, or the softmax probability (``output="prob"``)."""
    if output == "prob":
        return torch.softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    return logits.gather(1, target[:, None])[:, 0]


def grad_input(x: Tensor, create_graph: bool) -> Tensor:
    """The tensor to differentiate with respect to: ``x`` itself when building a graph through a
    caller's ``x`` that requires grad, otherwise a detached copy that requires grad (no side effect on
    the caller's tensor, no graph leaks into the caller's history when ``create_graph=False``)."""
    if create_graph and x.requires_grad:
        return x
    return x.detach().requires_grad_(True)


def _grad(score: Tensor, inp: Tensor, create_graph: bool) -> Tensor:
    if not score.requires_grad:
        raise RuntimeError(
            "the model's output does not depend on its input through autograd (does the model call "
            ".detach() or run under torch.no_grad internally?)"
        )
    (g,) = torch.autograd.grad(
        score, inp, grad_outputs=torch.ones_like(score), create_graph=create_graph, allow_unused=True
    )
    return torch.zeros_like(inp) if g is None else g


def input_gradient(
    model: nn.Module,
    inp: Tensor,
    target: int | Tensor | None,
    output: str,
    create_graph: bool,
    *,
    resolved: bool = False,
    on_num_classes: Callable[[int], object] | None = None,
) -> tuple[Tensor, Tensor]:
    """Batched ``d score_{target_n}(inp_n) / d inp_n`` with one forward and one backward pass.

    ``target``: ``None`` (argmax of this forward's logits), a form accepted by
    :func:`check_target_form` (range-checked here), or with ``resolved=True`` a ``LongTensor (N,)`` on
    ``inp``'s device that is used as is. Returns the gradient and the ``LongTensor`` target.
    ``inp`` must require grad. ``on_num_classes(K)`` is called after the forward pass (range checks).
    """
    with torch.enable_grad():
        logits = check_logits(model(inp), inp.shape[0])
        if on_num_classes is not None:
            on_num_classes(logits.shape[1])
        if target is None:
            t = logits.detach().argmax(dim=1)
        elif resolved:
            t = target  # type: ignore[assignment]
        else:
            t = resolve_target(target, inp.shape[0], logits.shape[1], inp.device)
        score = target_scores(logits, t, output)
        g = _grad(score, inp, create_graph)
    return g, t


def make_baseline(baseline: float | Tensor | None, x: Tensor, name: str = "baseline") -> Tensor:
    """A baseline of ``x``'s shape/dtype/device: ``None`` = zeros, a number, or a tensor broadcastable
    to ``x`` (treated as a constant: it is detached)."""
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, bool):
        raise TypeError(f"`{name}` must be None, a number or a tensor broadcastable to `x`, got bool")
    if isinstance(baseline, (int, float)):
        if not torch.isfinite(torch.tensor(float(baseline))):
            raise ValueError(f"`{name}` must be finite, got {baseline!r}")
        return torch.full_like(x, float(baseline))
    if not isinstance(baseline, Tensor):
        raise TypeError(
            f"`{name}` must be None, a number or a tensor broadcastable to `x`, got {type(baseline).__name__}"
        )
    try:
        b = torch.broadcast_to(baseline.detach().to(device=x.device, dtype=x.dtype), x.shape)
    except RuntimeError:
        raise ValueError(
            f"`{name}` of shape {tuple(baseline.shape)} is not broadcastable to `x` of shape {tuple(x.shape)}"
        ) from None
    if not torch.isfinite(b).all():
        raise ValueError(f"`{name}` contains NaN or Inf values")
    return b


def chunk_rows(total: int, chunk: int | None, device: torch.device) -> Iterator[Tensor]:
    """Consecutive index ranges ``[s, s + chunk)`` covering ``range(total)`` as ``LongTensor``."""
    step = total if chunk is None else chunk
    for s in range(0, total, step):
        yield torch.arange(s, min(s + step, total), device=device)
