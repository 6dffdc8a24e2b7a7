"""Influence functions for any chosen subset of a network's parameters (Koh & Liang; ``docs/background.md`` §4).

:class:`ParameterInfluence` computes per-sample training gradients with ``torch.func`` (``vmap(grad(.))``,
chunked, no Python loop over samples), caches them (``(N, P)``) for reuse across test points, and solves
``H^-1 g_test`` with one of the solvers of :mod:`fragdefense.influence.solvers`; Hessian-vector products of
the mean training loss are forward-over-reverse (``jvp(grad(.))``), vmapped over a batch of vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from fragdefense.influence import solvers as S
from fragdefense.utils.checks import check_batch, check_choice, check_labels
from fragdefense.utils.conventions import eval_mode as _eval_mode  # the package's one eval-mode context

__all__ = ["ParameterInfluence", "select_parameters"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def select_parameters(model: nn.Module, params: str | Sequence[str] | None = None) -> list[str]:
    """Names of the parameters ``params`` selects: exact names or module prefixes (``"backbone.head"`` selects
    ``backbone.head.weight`` and ``.bias``); ``None``: every parameter with ``requires_grad``.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> select_parameters(net, "2"), select_parameters(net, ["0.bias"])
    (['2.weight', '2.bias'], ['0.bias'])
    """
    names = [n for n, p in model.named_parameters()]
    if params is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(params, str):
        params = [params]
    out: list[str] = []
    for sel in params:
        hit = [n for n in names if n == sel or n.startswith(sel + ".")]
        if not hit:
            raise ValueError(f"`params` entry {sel!r} matches no parameter; parameters: {names}")
        out.extend(h for h in hit if h not in out)
    return out


class ParameterInfluence:
    """Influence of training points on test points through the parameters ``params`` of ``model``.

    ``I(z_j, z) = -grad L(z)^T (H + (l2 + damping) I)^-1 grad L(z_j)`` with ``H`` the Hessian of the mean
    training loss w.r.t. the selected parameters (the others, and BatchNorm statistics, frozen; the model is
    evaluated in eval mode).

    Args:
        model: the network (``model(x)`` -> outputs).
        params: parameter names / module prefixes (see :func:`select_parameters`); ``None``: all trainable.
        loss_fn: per-sample loss ``loss_fn(outputs (B, ...), targets (B, ...)) -> (B,)``; default cross-entropy.
        damping: added to ``H``'s diagonal.
        l2: L2 coefficient of the training objective (``l2 / 2 ||theta||^2``), added to ``H``.
        solver: ``"exact"`` (explicit Hessian, Cholesky), ``"cg"``, ``"lissa"`` or ``"arnoldi"``.
        solver_opts: options of the solver: ``cg``: ``tol``, ``max_iter``; ``lissa``: ``depth``, ``repeats``,
            ``scale`` (default ``1.1 x`` the top eigenvalue by power iteration), ``batch_size`` (mini-batch
            Hessian-vector products, drawn with ``seed``; default the full training set), ``tol``;
            ``arnoldi``: ``n_iter``, ``rank``, ``seed``.
        chunk_size: samples per vmapped chunk (per-sample gradients, Hessian-vector products).
        dtype: computation dtype (a float64 copy of the selected parameters and the data when ``float64``).
        progress: show tqdm bars for the gradient pass.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
        >>> inf = ParameterInfluence(net, params="2", damping=0.01, solver="cg").fit(x, y)
        >>> inf.num_params, inf.influence(x[:3], y[:3]).shape, inf.self_influence().shape
        (10, torch.Size([3, 32]), torch.Size([32]))
    """

    def __init__(
        self,
        model: nn.Module,
        params: str | Sequence[str] | None = None,
        loss_fn: LossFn | None = None,
        *,
        damping: float = 0.0,
        l2: float = 0.0,
        solver: str = "cg",
        solver_opts: Mapping[str, Any] | None = None,
        chunk_size: int = 256,
        dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        check_choice(solver, "solver", S.SOLVERS)
        for v, name in ((damping, "damping"), (l2, "l2")):
            if not (float(v) >= 0.0):
                raise ValueError(f"`{name}` must be a number >= 0, got {v!r}")
        if int(chunk_size) < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}")
        self.model = model
        self.names = select_parameters(model, params)
        if not self.names:
            raise ValueError("`params` selects no parameter")
        self.loss_fn = loss_fn or _cross_entropy
        self.damping, self.l2 = float(damping), float(l2)
        self.solver = solver
        self.solver_opts = dict(solver_opts or {})
        self.chunk_size = int(chunk_size)
        all_params = dict(model.named_parameters())
        ref = all_params[self.names[0]]
        self.dtype = dtype or ref.dtype
        self.device = ref.device
        self._shapes = [all_params[n].shape for n in self.names]
        self._sizes = [math.prod(s) for s in self._shapes]
        self.theta = torch.cat([all_params[n].detach().reshape(-1) for n in self.names]).to(self.dtype)
        cast = lambda t: t.detach().to(self.dtype) if t.is_floating_point() else t.detach()  # noqa: E731
        self._frozen = {n: cast(p) for n, p in all_params.items() if n not in self.names}
        self._frozen.update({n: cast(b) for n, b in model.named_buffers()})
        self.progress = bool(progress)
        self._fitted = False
        self._inv: tuple[Tensor, Tensor] | Tensor | None = None

    @property
    def num_params(self) -> int:
        return int(self.theta.numel())

    # --- functional loss ------------------------------------------------------------------------------------
    def _unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, theta.split(self._sizes), self._shapes)}

    def _cast_x(self, x: Tensor) -> Tensor:
        return x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)

    def _loss_one(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(self.model, {**self._frozen, **self._unflatten(theta)}, (x[None],))
        return self.loss_fn(out, y[None]).sum()

    def _loss_sum(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(self.model, {**self._frozen, **self._unflatten(theta)}, (x,))
        return self.loss_fn(out, y).sum()

    def per_sample_gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """``(n, P)`` gradients of the per-sample loss w.r.t. the selected parameters (vmapped, chunked)."""
        self._check_xy(x, y)
        g = vmap(grad(self._loss_one), in_dims=(None, 0, 0))
        out = []
        chunks = range(0, len(x), self.chunk_size)
        if self.progress and len(chunks) > 1:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="per-sample gradients", unit="chunk", leave=False)
        with _eval_mode(self.model):
            for s in chunks:
                xb, yb = self._cast_x(x[s : s + self.chunk_size]), y[s : s + self.chunk_size].to(self.device)
                out.append(g(self.theta, xb, yb).detach())
        return torch.cat(out) if out else torch.empty(0, self.num_params, dtype=self.dtype, device=self.device)

    def _check_xy(self, x: Tensor, y: Tensor, names: tuple[str, str] = ("x", "y")) -> None:
        """Inputs and targets, before any work: a non-empty finite floating batch (images: any range, the loss need
        not be on [0, 1] images), one target per input; with the default cross-entropy, integer labels in
        ``[0, K - 1]`` (``K`` from one forward pass of a single input)."""
        nx, ny = names
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(
                f"`{nx}` and `{ny}` must be torch.Tensors (inputs with a leading sample dimension, targets)"
            )
        if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"`{nx}` and `{ny}` must have the same number of samples, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if x.is_floating_point():
            check_batch(x if x.ndim > 1 else x[:, None], nx, unit_range=False)
        if self.loss_fn is _cross_entropy:
            with torch.no_grad(), _eval_mode(self.model):
                k = int(
                    functional_call(
                        self.model, {**self._frozen, **self._unflatten(self.theta)}, (self._cast_x(x[:1]),)
                    ).shape[-1]
                )
            check_labels(y, x.shape[0], k, ny)

    # --- Hessian ------------------------------------------------------------------------------------------
    def fit(self, x_train: Tensor, y_train: Tensor) -> ParameterInfluence:
        """Cache the training set's per-sample gradients and prepare the solver. Returns ``self``."""
        if isinstance(x_train, Tensor) and x_train.ndim >= 1 and len(x_train) == 0:
            raise ValueError("`x_train` is empty; give at least one training point")
        self._check_xy(x_train, y_train, ("x_train", "y_train"))
        self.x_train, self.y_train = self._cast_x(x_train), y_train.to(self.device)
        self.train_gradients = self.per_sample_gradients(self.x_train, self.y_train)
        self._fitted = True
        self._inv = None
        if self.solver == "exact":
            self._inv = torch.linalg.cholesky_ex(self.hessian())
            if int(self._inv[1]) != 0:
                raise ValueError("the Hessian is not positive definite; set `damping` > 0 (e.g. 1e-3)")
        elif self.solver == "arnoldi":
            o = self.solver_opts
            gen = torch.Generator(device=self.device).manual_seed(int(o.get("seed", 0)))
            vals, vecs = S.arnoldi(
                self.hvp,
                self.num_params,
                n_iter=int(o.get("n_iter", 100)),
                rank=int(o.get("rank", 50)),
                dtype=self.dtype,
                device=self.device,
                generator=gen,
            )
            self._inv = (vals, vecs)
        return self

    def _require_fit(self) -> None:
        if not self._fitted:
            raise RuntimeError("call .fit(x_train, y_train) before computing influences")

    def hvp(self, v: Tensor, index: Tensor | None = None) -> Tensor:
        """``V (H + (l2 + damping) I)`` for ``V`` ``(T, P)``; ``H`` of the mean loss over the training set (or
        over the training points ``index``, for stochastic estimates)."""
        self._require_fit()
        x, y = (self.x_train, self.y_train) if index is None else (self.x_train[index], self.y_train[index])

        def hvp_chunk(xb: Tensor, yb: Tensor) -> Tensor:
            def one(u: Tensor) -> Tensor:
                return jvp(lambda th: grad(self._loss_sum)(th, xb, yb), (self.theta,), (u,))[1]

            return vmap(one)(v)

        out = torch.zeros_like(v)
        with _eval_mode(self.model):
            for s in range(0, len(x), self.chunk_size):
                out = out + hvp_chunk(x[s : s + self.chunk_size], y[s : s + self.chunk_size]).detach()
        return out / len(x) + (self.l2 + self.damping) * v

    def hessian(self) -> Tensor:
        """The explicit ``(P, P)`` Hessian (``hvp`` of identity blocks; for small ``P``)."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        h = torch.cat([self.hvp(eye[i : i + 256]) for i in range(0, self.num_params, 256)])
        return 0.5 * (h + h.T)

    def inverse_hvp(self, b: Tensor) -> Tensor:
        """``B H^-1`` for ``B`` ``(T, P)`` with the configured solver."""
        self._require_fit()
        b = b.to(self.device, self.dtype)
        o = self.solver_opts
        if self.solver == "exact":
            return torch.cholesky_solve(b.T, self._inv[0]).T
        if self.solver == "arnoldi":
            vals, vecs = self._inv
            return S.low_rank_inverse(vals, vecs, b)
        if self.solver == "cg":
            return S.conjugate_gradient(self.hvp, b, tol=float(o.get("tol", 1e-10)), max_iter=o.get("max_iter"))
        # lissa
        gen = torch.Generator(device="cpu").manual_seed(int(o.get("seed", 0)))
        scale = o.get("scale")
        if scale is None:
            scale = 1.1 * S.top_eigenvalue(
                self.hvp, self.num_params, dtype=self.dtype, device=self.device, generator=gen
            )
        bs = o.get("batch_size")
        n = len(self.x_train)
        if bs is None or int(bs) >= n:
            matvec = self.hvp
        else:

            def matvec(v: Tensor) -> Tensor:
                return self.hvp(v, torch.randperm(n, generator=gen)[: int(bs)].to(self.device))

        return S.lissa(
            matvec,
            b,
            scale=float(scale),
            depth=int(o.get("depth", 1000)),
            repeats=int(o.get("repeats", 1)),
            tol=o.get("tol"),
        )

    # --- influence ----------------------------------------------------------------------------------------
    def influence(self, x_test: Tensor, y_test: Tensor) -> Tensor:
        """``(T, N)``: ``I(z_j, z_t) = -grad L(z_t)^T H^-1 grad L(z_j)`` (cached training gradients)."""
        self._require_fit()
        self._check_xy(x_test, y_test, ("x_test", "y_test"))
        v = self.inverse_hvp(self.per_sample_gradients(x_test, y_test))
        return -(v @ self.train_gradients.T)

    def self_influence(self) -> Tensor:
        """``(N,)``: ``-grad L(z_j)^T H^-1 grad L(z_j)`` for every training point."""
        self._require_fit()
        g = self.train_gradients
        return torch.cat([-(gc * self.inverse_hvp(gc)).sum(1) for gc in g.split(1024)])
