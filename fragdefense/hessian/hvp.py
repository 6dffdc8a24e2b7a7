"""Hessian-vector products as batches of symmetric linear operators.

Every routine of :mod:`fragdefense.hessian` (Lanczos, power iteration, Hutchinson / Hutch++, SLQ) works on a
:class:`HessianOperator`: ``B`` independent symmetric ``n x n`` operators applied to a batch of vectors
``(B, n) -> (B, n)``. Parameter Hessians have ``B = 1``; input Hessians have one operator per image, all applied
in one batched pass (for a model in eval mode the Hessian of ``sum_i f_i(x_i)`` w.r.t. the batch is
block-diagonal, with block ``i`` the Hessian of sample ``i``).

* :func:`param_hessian` — Hessian of the mean loss w.r.t. the parameters, over one batch (the gradient graph is
  built once and reused by every product, as PyHessian) or over a dataloader (one pass per product).
* :func:`input_hessian` — per-sample Hessian w.r.t. the input image of a logit (the predicted class or a given
  target) or of the cross-entropy loss; backends ``"autograd"`` (reverse-over-reverse on a cached gradient
  graph: one backward per product) and ``"func"`` (``torch.func.jvp`` of ``torch.func.grad``,
  forward-over-reverse).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.utils.checks import as_model_dtype, check_batch, check_choice, check_labels

# the package's one eval-mode context (restores every submodule's own flag); importable from here as before
from fragdefense.utils.conventions import eval_mode

__all__ = [
    "HessianOperator",
    "param_hessian",
    "input_hessian",
    "check_model_inputs",
    "OBJECTIVES",
    "flatten",
    "unflatten",
]

Objective = Literal["logit", "loss"]
OBJECTIVES: tuple[str, ...] = ("logit", "loss")


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector.

    >>> flatten([torch.ones(2, 2), torch.zeros(3)]).shape
    torch.Size([7])
    """
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like`` (inverse of :func:`flatten`).

    >>> [t.shape for t in unflatten(torch.arange(7.0), [torch.ones(2, 2), torch.zeros(3)])]
    [torch.Size([2, 2]), torch.Size([3])]
    """
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].view_as(t))
        i += t.numel()
    if i != v.numel():
        raise ValueError(f"vector of length {v.numel()} does not match the {i} entries of the tensors")
    return out


class HessianOperator:
    """``B`` symmetric ``n x n`` operators, applied to a batch of vectors ``v (B, n) -> (B, n)``.

    Args:
        matvec: the product, ``(B, n) -> (B, n)``.
        batch: ``B``; dim: ``n``; dtype / device: of the vectors the product takes.
        name: a label for messages.

    ``n_matvecs`` counts the batched products applied so far.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> op = HessianOperator.from_matrix(A)
        >>> op(torch.tensor([[1.0, 0.0]]))
        tensor([[2., 1.]])
        >>> torch.equal(op.dense()[0], A), op.n_matvecs
        (True, 3)
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        batch: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        name: str = "hessian",
        restrict: Callable[[Tensor], HessianOperator] | None = None,
    ) -> None:
        if batch < 1 or dim < 1:
            raise ValueError(f"`batch` and `dim` must be >= 1, got batch={batch}, dim={dim}")
        self._matvec = matvec
        self.batch, self.dim = int(batch), int(dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.name = name
        self.n_matvecs = 0
        self._restrict = restrict

    @property
    def can_restrict(self) -> bool:
        """Whether :meth:`restrict` is available (independent operators, e.g. per-image input Hessians)."""
        return self._restrict is not None

    def restrict(self, mask: Tensor) -> HessianOperator:
        """The operators of the rows where ``mask (B,)`` is true, as a new (smaller) batch."""
        if self._restrict is None:
            raise NotImplementedError(f"{self!r} cannot be restricted to a subset of its batch")
        if mask.shape != (self.batch,) or mask.dtype != torch.bool:
            raise ValueError(
                f"`mask` must be a bool tensor of shape ({self.batch},), got {mask.dtype} {tuple(mask.shape)}"
            )
        return self._restrict(mask)

    @classmethod
    def from_matrix(cls, a: Tensor) -> HessianOperator:
        """Operator of explicit symmetric matrices ``(n, n)`` or ``(B, n, n)`` (tests, small exact cases)."""
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[1] != a.shape[2]:
            raise ValueError(f"`a` must have shape (n, n) or (B, n, n), got {tuple(a.shape)}")
        return cls(
            lambda v: torch.einsum("bij,bj->bi", a, v),
            a.shape[0],
            a.shape[1],
            a.dtype,
            a.device,
            "matrix",
            restrict=lambda mask: cls.from_matrix(a[mask]),
        )

    def __call__(self, v: Tensor) -> Tensor:
        if v.shape != (self.batch, self.dim):
            raise ValueError(f"`v` must have shape ({self.batch}, {self.dim}), got {tuple(v.shape)}")
        self.n_matvecs += 1
        return self._matvec(v.to(self.dtype))

    def dense(self) -> Tensor:
        """The explicit matrices ``(B, n, n)`` (``n`` products: small cases only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        cols = [self(eye[j].expand(self.batch, -1).contiguous()) for j in range(self.dim)]
        return torch.stack(cols, dim=2)

    def __repr__(self) -> str:
        return f"HessianOperator({self.name}, batch={self.batch}, dim={self.dim}, dtype={self.dtype})"


def _num_classes(model: nn.Module, x: Tensor) -> int:
    """``model.num_classes`` when the model declares it, else the width of the logits of one input (no grad)."""
    k = getattr(model, "num_classes", None)
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    with eval_mode(model), torch.no_grad():
        return int(model(x[:1]).shape[-1])


def check_model_inputs(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    y: Tensor | None = None,
    *,
    unit_range: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The checks of every input-Hessian entry point, before any work: ``x`` a non-empty finite batch (images
    ``(B, C, H, W)`` in ``[0, 1]`` unless ``unit_range=False``) cast to the model's dtype
    (:func:`~fragdefense.utils.checks.as_model_dtype`: float64 images on a float32 model run in float32);
    ``target`` ``None``, an int or ``(B,)`` integer class ids and ``y`` ``None`` or ``(B,)`` labels, both in
    ``[0, K - 1]`` (``K`` = ``model.num_classes``, else the logits' width of one image). Returns
    ``(x, target, y)`` with an int target expanded to ``(B,)``.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    >>> x, t, _ = check_model_inputs(net, torch.rand(2, 3, 2, 2, dtype=torch.float64), 1)
    >>> x.dtype, t.tolist()
    (torch.float32, [1, 1])
    >>> check_model_inputs(net, torch.rand(2, 3, 2, 2), 3)
    Traceback (most recent call last):
    ...
    ValueError: `target` must hold class labels in [0, 2], got min 3, max 3
    """
    x = as_model_dtype(check_batch(x, "x", unit_range=unit_range), model)
    b = x.shape[0]
    if isinstance(target, bool) or (target is not None and not isinstance(target, (int, Tensor))):
        raise TypeError(f"`target` must be None, an int or a LongTensor of shape ({b},), got {target!r}")
    if isinstance(target, int):
        target = torch.full((b,), target, dtype=torch.long, device=x.device)
    if target is not None or y is not None:
        k = _num_classes(model, x)
        if target is not None:
            check_labels(target, b, k, "target")
        if y is not None:
            check_labels(y, b, k, "y")
    return x, target, y


def _params(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    ps = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not ps:
        raise ValueError("`params` is empty: the model has no parameter with requires_grad=True")
    return ps


def param_hessian(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    data: tuple[Tensor, Tensor] | None = None,
    dataloader: Iterable[tuple[Tensor, Tensor]] | None = None,
    *,
    params: Iterable[Tensor] | None = None,
    eval: bool = True,
) -> HessianOperator:
    """Hessian of the mean loss w.r.t. the parameters, as a :class:`HessianOperator` with ``B = 1``.

    Args:
        model: the network; ``eval=True`` (default, as PyHessian) evaluates it in eval mode (BatchNorm running
            statistics; every submodule's flag is restored afterwards).
        loss_fn: ``loss_fn(logits, y)`` returning the *mean* loss of a batch (default cross-entropy).
        data: one batch ``(x, y)``: the gradient graph is built once and every product is one backward pass.
        dataloader: ... or batches ``(x, y)``: each product runs every batch (Hessian of the mean loss over
            all samples, batches weighted by their size).
        params: the parameters (default: every parameter with ``requires_grad``); vectors follow their order.
            No ``.grad`` is touched (``torch.autograd.grad`` only).

    Example:
        >>> net = nn.Linear(3, 1, bias=False)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> op = param_hessian(net, F.mse_loss, (x, y))
        >>> torch.allclose(op.dense()[0], 2 * x.T @ x / 8, atol=1e-5)
        True
    """
    if (data is None) == (dataloader is None):
        raise ValueError("give exactly one of `data=(x, y)` (one batch) or `dataloader=` (batches of (x, y))")
    ps = _params(model, params)
    n = sum(p.numel() for p in ps)
    dtype, device = ps[0].dtype, ps[0].device
    ctx = eval_mode(model) if eval else contextlib.nullcontext()
    if data is not None:
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise ValueError(f"`data` must be one batch (x, y), got {type(data).__name__}")
        x, y = data
        # inputs of any range (the loss need not be on [0, 1] images), non-empty and finite, in the model's dtype
        x = as_model_dtype(check_batch(x, "x", unit_range=False), model)
        if loss_fn is F.cross_entropy:
            check_labels(y, x.shape[0], _num_classes(model, x), "y")
        with ctx, torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(model(x), y), ps, create_graph=True)

        def mv(v: Tensor) -> Tensor:
            hv = torch.autograd.grad(grads, ps, grad_outputs=unflatten(v[0], ps), retain_graph=True)
            return flatten(hv)[None]

        return HessianOperator(mv, 1, n, dtype, device, "param_hessian(batch)")

    def mv_loader(v: Tensor) -> Tensor:
        vs = unflatten(v[0], ps)
        acc = torch.zeros(n, dtype=dtype, device=device)
        count = 0
        for xb, yb in dataloader:  # type: ignore[union-attr]
            xb, yb = xb.to(device), yb.to(device)
            with eval_mode(model) if eval else contextlib.nullcontext(), torch.enable_grad():
                g = torch.autograd.grad(loss_fn(model(xb), yb), ps, create_graph=True)
                hv = torch.autograd.grad(g, ps, grad_outputs=vs)
            acc += flatten(hv) * xb.shape[0]
            count += xb.shape[0]
        if count == 0:
            raise ValueError("`dataloader` yielded no batch")
        return (acc / count)[None]

    return HessianOperator(mv_loader, 1, n, dtype, device, "param_hessian(dataloader)")


def _objective(model: nn.Module, objective: str, target: Tensor | None, y: Tensor | None) -> Callable[[Tensor], Tensor]:
    """``x -> sum_i f_i(x_i)`` (each term depends on its own sample only in eval mode)."""
    if objective == "logit":

        def f(x: Tensor) -> Tensor:
            logits = model(x)
            c = logits.detach().argmax(1) if target is None else target
            return logits.gather(1, c[:, None]).sum()

        return f
    if objective == "loss":
        if y is None:
            raise ValueError("objective 'loss' needs the labels `y` (B,)")
        return lambda x: F.cross_entropy(model(x), y, reduction="sum")
    raise ValueError(f"unknown `objective`={objective!r}; expected one of {OBJECTIVES}")


def input_hessian(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    *,
    objective: Objective = "logit",
    y: Tensor | None = None,
    backend: Literal["autograd", "func"] = "autograd",
) -> HessianOperator:
    """Per-sample Hessians w.r.t. the input, ``H_i = d^2 f_i / dx_i^2``, one operator per image (batched).

    Args:
        model: images ``(B, C, H, W)`` -> logits; evaluated in eval mode (then samples do not interact; the
            flags are restored). A ReLU network has a zero input Hessian almost everywhere: use its softplus
            surrogate (:func:`fragdefense.models.to_softplus`).
        x: images ``(B, C, H, W)``; vectors are ``(B, C*H*W)``.
        target: class of the logit (``objective="logit"``): ``None`` = the predicted class, an ``int`` or ``(B,)``.
        objective: ``"logit"`` (the saliency map is the gradient of this logit) or ``"loss"`` (cross-entropy
            with labels ``y``).
        backend: ``"autograd"``: the input gradient's graph is built once and every product is one backward
            pass; ``"func"``: ``torch.func.jvp(torch.func.grad(f))`` (forward-over-reverse, recomputed per product).

    Checked before any work (:func:`check_model_inputs`): a non-empty batch of images in ``[0, 1]`` (float64
    images run in the model's dtype), ``target`` / ``y`` class ids of the model's classes, ``objective``,
    ``backend``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Softplus(), nn.Linear(6, 3))
        >>> x = torch.rand(2, 3, 2, 2)
        >>> op = input_hessian(net, x, target=0)
        >>> op.batch, op.dim, op(torch.randn(2, 12)).shape
        (2, 12, torch.Size([2, 12]))
    """
    check_choice(objective, "objective", OBJECTIVES)
    check_choice(backend, "backend", ("autograd", "func"))
    if objective == "loss" and y is None:
        raise ValueError("objective 'loss' needs the labels `y` (B,)")
    x, target, y = check_model_inputs(model, x, target, y)
    b = x.shape[0]
    x0 = x.detach()
    shape = x0.shape
    if target is None and objective == "logit":
        with eval_mode(model), torch.no_grad():
            target = model(x0).argmax(1)
    f = _objective(model, objective, target, y)
    n = x0[0].numel()
    if backend == "autograd":
        with eval_mode(model), torch.enable_grad():
            xg = x0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f(xg), xg, create_graph=True)

        def mv(v: Tensor) -> Tensor:
            (hv,) = torch.autograd.grad(g, xg, grad_outputs=v.view(shape), retain_graph=True)
            return hv.reshape(b, n)

    elif backend == "func":
        from torch.func import grad, jvp

        def mv(v: Tensor) -> Tensor:
            with eval_mode(model):
                _, hv = jvp(grad(f), (x0,), (v.view(shape),))
            return hv.reshape(b, n)

    else:
        raise ValueError(f"unknown `backend`={backend!r}; expected 'autograd' or 'func'")

    def restrict(mask: Tensor) -> HessianOperator:
        sub = mask.to(x0.device)
        return input_hessian(
            model,
            x0[sub],
            None if target is None else target[sub],
            objective=objective,
            y=None if y is None else y[sub],
            backend=backend,
        )

    return HessianOperator(mv, b, n, x0.dtype, x0.device, f"input_hessian({objective})", restrict=restrict)
