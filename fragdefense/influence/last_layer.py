"""Exact influence functions for a linear last layer on frozen features (Koh & Liang; ``docs/background.md`` §4).

The model is ``logits = W phi + b`` on features ``phi`` (``(N, D)``) of a frozen network, trained on the mean
cross-entropy (softmax, ``C >= 2`` outputs) or logistic loss (one output, labels in ``{0, 1}``) plus
``l2 / 2 * ||theta||^2``. The influence of training point ``z_j`` on test point ``z`` is

    I(z_j, z) = -grad L(z)^T H^-1 grad L(z_j),   H = mean training Hessian + (l2 + damping) I

(``I_up,loss``: the first-order change of the test loss when ``z_j`` is up-weighted; *negative* values are
*helpful* training points, whose removal would raise the test loss. captum's scores are ``-I`` and, since its
Hessian is of the summed loss, its ``hessian_reg`` equals ``N * damping``.)

Efficiency: the per-sample gradient of a linear layer is the outer product ``r_j (x) phi~_j`` of the residual
``r_j = softmax - onehot`` (``(C,)``) and the features with a 1 appended (``phi~_j``, ``(D+1,)``). The training
set is cached in this factored form (``(N, C)`` residuals + ``(N, D+1)`` features) and the ``(N, C (D+1))``
gradient matrix is never materialised: ``I(z_j, z) = -sum_c r_jc (V_c . phi~_j)`` with ``V = H^-1 grad L(z)``
reshaped ``(C, D+1)`` — ``C`` matrix products of ``(T, D+1) x (D+1, N)``. The Hessian
``(1/N) sum_j A_j (x) phi~_j phi~_j^T`` (``A_j = diag p_j - p_j p_j^T``) is assembled with ``C`` matrix products
and factored once (Cholesky).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.utils.checks import check_labels

__all__ = ["LastLayerInfluence", "fit_linear_head", "find_head", "feature_extractor", "features_and_logits"]


def _check_features(phi: Tensor, name: str, dim: int | None = None) -> Tensor:
    if not isinstance(phi, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, D), got {type(phi).__name__}")
    if phi.ndim != 2:
        raise ValueError(f"`{name}` must have shape (N, D) (one feature vector per row), got {tuple(phi.shape)}")
    if not phi.is_floating_point():
        raise TypeError(f"`{name}` must have a floating dtype, got {phi.dtype}")
    if dim is not None and phi.shape[1] != dim:
        raise ValueError(f"`{name}` must have {dim} features per row (the head's in_features), got {phi.shape[1]}")
    if not bool(torch.isfinite(phi).all()):
        raise ValueError(f"`{name}` contains NaN or Inf")
    return phi


def _augment(phi: Tensor, bias: bool) -> Tensor:
    return torch.cat([phi, torch.ones_like(phi[:, :1])], 1) if bias else phi


class LastLayerInfluence:
    """Exact influence of training points through a linear last layer (see the module docstring).

    Args:
        weight: ``(C, D)`` head weight (``C = 1``: logistic regression with labels ``{0, 1}``; ``C >= 2``:
            softmax cross-entropy).
        bias: ``(C,)`` or ``None`` (no bias parameter).
        damping: added to the Hessian's diagonal (``>= 0``). A softmax head has a flat direction (shifting
            every class's weights equally), so without ``l2`` it needs ``damping > 0``.
        l2: the training objective's L2 coefficient (``l2 / 2 * ||theta||^2`` on weight and bias), part of ``H``.
        dtype: computation dtype (float64 by default: the Hessian of a well-fitted model is ill-conditioned).
        chunk_size: training points per block when assembling the Hessian and the self-influence.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> phi, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
        >>> w, b = fit_linear_head(phi, y, num_classes=2, binary=True, l2=0.1)
        >>> inf = LastLayerInfluence(w, b, l2=0.1).fit(phi, y)
        >>> inf.influence(phi[:2], y[:2]).shape, inf.self_influence().shape, inf.num_params
        (torch.Size([2, 50]), torch.Size([50]), 4)
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        damping: float = 0.0,
        l2: float = 0.0,
        dtype: torch.dtype = torch.float64,
        chunk_size: int = 1024,
    ) -> None:
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise ValueError(f"`weight` must be a (C, D) tensor, got {getattr(weight, 'shape', type(weight))}")
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)):
            raise ValueError(
                f"`bias` must be None or a ({weight.shape[0]},) tensor, got {getattr(bias, 'shape', bias)}"
            )
        for v, name in ((damping, "damping"), (l2, "l2")):
            if not (float(v) >= 0.0):
                raise ValueError(f"`{name}` must be a number >= 0, got {v!r}")
        if int(chunk_size) < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}")
        self.dtype = dtype
        self.weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.damping, self.l2 = float(damping), float(l2)
        self.chunk_size = int(chunk_size)
        self.out_dim, self.in_dim = weight.shape
        self.binary = self.out_dim == 1
        self.n_classes = 2 if self.binary else self.out_dim
        self._fitted = False

    # --- model ------------------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Parameters of the head, ``C (D + 1)`` (``C D`` without bias)."""
        return self.out_dim * (self.in_dim + (self.bias is not None))

    @property
    def theta(self) -> Tensor:
        """The head's parameters as one ``(C, D+1)`` matrix (``(C, D)`` without bias)."""
        return self.weight if self.bias is None else torch.cat([self.weight, self.bias[:, None]], 1)

    def logits(self, features: Tensor) -> Tensor:
        """``W phi + b`` in the computation dtype (differentiable in ``features``)."""
        return _augment(features.to(self.dtype), self.bias is not None) @ self.theta.T

    def predict(self, features: Tensor) -> Tensor:
        """Predicted labels ``(N,)``."""
        z = self.logits(features)
        return (z[:, 0] > 0).long() if self.binary else z.argmax(1)

    def loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """Per-sample loss ``(N,)`` (no regulariser)."""
        z = self.logits(features)
        if self.binary:
            return F.binary_cross_entropy_with_logits(z[:, 0], labels.to(z.dtype), reduction="none")
        return F.cross_entropy(z, labels, reduction="none")

    def residuals(self, features: Tensor, labels: Tensor) -> Tensor:
        """``dL/dlogits`` per sample, ``(N, C)``: ``softmax - onehot`` (``sigmoid - y`` for one output).
        Differentiable in ``features``."""
        z = self.logits(features)
        if self.binary:
            return torch.sigmoid(z) - labels.to(z.dtype)[:, None]
        return torch.softmax(z, 1) - F.one_hot(labels, self.out_dim).to(z.dtype)

    def gradients(self, features: Tensor, labels: Tensor) -> Tensor:
        """Per-sample gradients w.r.t. ``theta``, flattened ``(N, num_params)`` (outer products; materialised —
        use for few points)."""
        phi = _augment(features.to(self.dtype), self.bias is not None)
        r = self.residuals(features, labels)
        return (r[:, :, None] * phi[:, None, :]).reshape(len(phi), -1)

    # --- fitting ----------------------------------------------------------------------------------------
    def _curvature(self, z: Tensor) -> Tensor:
        if self.binary:
            s = torch.sigmoid(z)
            return (s * (1 - s))[:, :, None]  # (n, 1, 1)
        p = torch.softmax(z, 1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]

    def hessian_of(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """``(1/N) sum_j A_j (x) phi~_j phi~_j^T + (l2 + damping) I``, ``(P, P)`` with ``P = num_params``
        (parameter order: row-major ``theta``). Labels are not needed (the curvature depends on the logits)."""
        _check_features(features, "features", self.in_dim)
        c, dt = self.out_dim, self.in_dim + (self.bias is not None)
        h = torch.zeros(c, dt, c, dt, dtype=self.dtype, device=self.weight.device)
        n = len(features)
        for s in range(0, n, self.chunk_size):
            phi = _augment(features[s : s + self.chunk_size].to(self.dtype), self.bias is not None)
            a = self._curvature(phi @ self.theta.T)  # (n, C, C)
            for i in range(c):  # block row i: sum_j A_j[i, :] (x) phi phi^T
                wphi = (a[:, i, :, None] * phi[:, None, :]).reshape(len(phi), c * dt)  # (n, C*D~)
                h[i] += (phi.T @ wphi).reshape(dt, c, dt)
        h = h.reshape(c * dt, c * dt) / max(n, 1)
        h = 0.5 * (h + h.T)
        h.diagonal().add_(self.l2 + self.damping)
        return h

    def fit(self, train_features: Tensor, train_labels: Tensor) -> LastLayerInfluence:
        """Cache the training set (features + residuals) and factor the Hessian. Returns ``self``."""
        _check_features(train_features, "train_features", self.in_dim)
        check_labels(train_labels, len(train_features), self.n_classes, "train_labels")
        if len(train_features) == 0:
            raise ValueError("`train_features` is empty; give at least one training point")
        dev = self.weight.device
        with torch.no_grad():
            feats = train_features.detach().to(device=dev, dtype=self.dtype)
            labels = train_labels.to(dev)
            self.train_labels = labels
            self.train_phi = _augment(feats, self.bias is not None)  # (N, D~)
            self.train_residuals = self.residuals(feats, labels)  # (N, C)
            self.hessian = self.hessian_of(feats)
            chol, info = torch.linalg.cholesky_ex(self.hessian)
        if int(info) != 0:
            raise ValueError(
                "the last-layer Hessian is not positive definite (a softmax head is flat along the shared shift "
                "of all classes' weights, and unregularised separable data has a vanishing Hessian): set `damping` "
                "> 0 (e.g. 1e-3) or train the head with `l2` > 0"
            )
        self._chol = chol
        self._fitted = True
        return self

    def _require_fit(self) -> None:
        if not self._fitted:
            raise RuntimeError("call .fit(train_features, train_labels) before computing influences")

    @property
    def n_train(self) -> int:
        self._require_fit()
        return len(self.train_phi)

    # --- influence --------------------------------------------------------------------------------------
    def inverse_hvp(self, g: Tensor) -> Tensor:
        """``g H^-1`` for gradients ``g`` ``(T, P)`` (differentiable in ``g``)."""
        self._require_fit()
        return torch.cholesky_solve(g.to(self.dtype).T, self._chol).T

    def influence(self, test_features: Tensor, test_labels: Tensor, train_index: Tensor | None = None) -> Tensor:
        """``I(z_j, z_t) = -grad L(z_t)^T H^-1 grad L(z_j)``: ``(T, N)``, or ``(T, k)`` for ``train_index``
        ``(T, k)`` (the listed training points only). Differentiable in ``test_features`` (the attack)."""
        self._require_fit()
        _check_features(test_features, "test_features", self.in_dim)
        check_labels(test_labels, len(test_features), self.n_classes, "test_labels")
        dev = self.weight.device
        test_features, test_labels = test_features.to(dev), test_labels.to(dev)
        t = len(test_features)
        v = self.inverse_hvp(self.gradients(test_features, test_labels)).reshape(t, self.out_dim, -1)  # (T, C, D~)
        if train_index is not None:
            if train_index.ndim != 2 or train_index.shape[0] != t:
                raise ValueError(f"`train_index` must have shape ({t}, k), got {tuple(train_index.shape)}")
            phi = self.train_phi[train_index]  # (T, k, D~)
            res = self.train_residuals[train_index]  # (T, k, C)
            return -torch.einsum("tcd,tkd,tkc->tk", v, phi, res)
        if torch.is_grad_enabled() and v.requires_grad:
            out = torch.zeros(t, self.n_train, dtype=self.dtype, device=dev)
            for c in range(self.out_dim):
                out = out - (v[:, c] @ self.train_phi.T) * self.train_residuals[:, c]
            return out
        # C products (T, D~) x (D~, n) per block of training points, accumulated in place into the output:
        # no (T, N, C) or (N, P) intermediate, and only a (T, chunk) temporary
        out = torch.zeros(t, self.n_train, dtype=self.dtype, device=dev)
        tmp = torch.empty(t, min(self.chunk_size, self.n_train), dtype=self.dtype, device=dev)
        for s in range(0, self.n_train, self.chunk_size):
            e = min(s + self.chunk_size, self.n_train)
            phi_t, block, buf = self.train_phi[s:e].T, out[:, s:e], tmp[:, : e - s]
            for c in range(self.out_dim):
                torch.mm(v[:, c], phi_t, out=buf)
                block.addcmul_(buf, self.train_residuals[s:e, c], value=-1.0)
        return out

    def self_influence(self) -> Tensor:
        """``I(z_j, z_j) = -grad L(z_j)^T H^-1 grad L(z_j)`` for every training point, ``(N,)`` (chunked)."""
        self._require_fit()
        out = []
        for s in range(0, self.n_train, self.chunk_size):
            phi, r = self.train_phi[s : s + self.chunk_size], self.train_residuals[s : s + self.chunk_size]
            g = (r[:, :, None] * phi[:, None, :]).reshape(len(phi), -1)
            out.append(-(g * self.inverse_hvp(g)).sum(1))
        return torch.cat(out)


def fit_linear_head(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    binary: bool = False,
    l2: float = 1e-3,
    bias: bool = True,
    max_iter: int = 100,
    tol: float = 1e-12,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor | None]:
    """Train a linear head to its exact optimum by Newton's method with backtracking (convex problem).

    Minimises ``mean_j L(z_j) + l2 / 2 ||theta||^2`` (softmax cross-entropy, or logistic loss on one output
    when ``binary`` and ``num_classes == 2``) — the setting in which influence functions are exact to first order.
    Stops when every gradient entry is ``<= tol`` (or after ``max_iter`` Newton steps).

    Returns:
        ``(weight (C, D), bias (C,) or None)`` in ``dtype``; ``C = 1`` when ``binary``.

    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(40, 2); y = (x[:, 0] > 0).long()
    >>> w, b = fit_linear_head(x, y, num_classes=2, binary=True, l2=0.01)
    >>> w.shape, bool(w[0, 0] > 0)
    (torch.Size([1, 2]), True)
    """
    _check_features(features, "features")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}")
    if binary and num_classes != 2:
        raise ValueError(f"`binary=True` needs num_classes == 2, got {num_classes}")
    check_labels(labels, len(features), num_classes, "labels")
    if not float(l2) >= 0:
        raise ValueError(f"`l2` must be >= 0, got {l2!r}")
    c = 1 if binary else num_classes
    d = features.shape[1]
    feats = features.detach().to(dtype)
    w = torch.zeros(c, d, dtype=dtype, device=features.device)
    b = torch.zeros(c, dtype=dtype, device=features.device) if bias else None

    def objective(w_: Tensor, b_: Tensor | None) -> tuple[float, LastLayerInfluence]:
        m = LastLayerInfluence(w_, b_, l2=l2, dtype=dtype)
        theta = m.theta
        return float(m.loss(feats, labels).mean() + 0.5 * l2 * (theta * theta).sum()), m

    f, model = objective(w, b)
    for _ in range(int(max_iter)):
        phi = _augment(feats, bias)
        grad = (model.residuals(feats, labels).T @ phi) / len(feats) + l2 * model.theta  # (C, D~)
        h = model.hessian_of(feats)
        h.diagonal().add_(1e-12)
        try:
            step = torch.linalg.solve(h, grad.reshape(-1)).reshape(grad.shape)
        except RuntimeError:  # singular (l2 = 0, flat softmax direction): least squares
            step = torch.linalg.lstsq(h, grad.reshape(-1)[:, None]).solution.reshape(grad.shape)
        if float(grad.abs().max()) <= tol:
            break
        decrement = float((grad * step).sum())
        t = 1.0
        theta = model.theta
        while True:
            new = theta - t * step
            w_new, b_new = (new[:, :d], new[:, d]) if bias else (new, None)
            f_new, m_new = objective(w_new, b_new)
            # near the optimum the decrease is below rounding: take the full (quadratically convergent) step
            if f_new <= f - 0.25 * t * decrement or decrement < 1e-14 or t < 1e-10:
                break
            t *= 0.5
        w, b, f, model = w_new, b_new, f_new, m_new
    return w, b


# --- splitting a network into features and head ------------------------------------------------------------
def find_head(model: nn.Module, head: str | nn.Module | None = None) -> nn.Linear:
    """The network's last layer: ``head`` (a submodule name such as ``"backbone.head"``, or the module itself),
    or by default the last ``nn.Linear`` in ``model.modules()`` order.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> find_head(net) is net[2], find_head(net, "0") is net[0]
    (True, True)
    """
    if isinstance(head, nn.Module):
        mod = head
    elif isinstance(head, str):
        try:
            mod = model.get_submodule(head)
        except AttributeError:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"`head`={head!r} is not a submodule of the model; linear layers: {names}") from None
    elif head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the model has no nn.Linear layer; pass `head=` (a linear last layer's name)")
        mod = linears[-1]
    else:
        raise TypeError(f"`head` must be None, a submodule name or an nn.Linear, got {type(head).__name__}")
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"`head` must be an nn.Linear (the influence is exact for a linear last layer), got {mod}")
    return mod


def features_and_logits(model: nn.Module, x: Tensor, head: str | nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """Run ``model(x)`` and return ``(input of the head (B, D), logits)``; differentiable when grad is enabled.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> phi, z = features_and_logits(net, torch.rand(5, 4))
    >>> phi.shape, torch.allclose(net[2](phi), z)
    (torch.Size([5, 3]), True)
    """
    mod = find_head(model, head)
    box: dict[str, Tensor] = {}

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        box["phi"] = args[0]

    handle = mod.register_forward_pre_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if "phi" not in box:
        raise RuntimeError("the head was not called in the model's forward; pass the right `head=`")
    phi = box["phi"]
    return phi.flatten(1), logits


def feature_extractor(model: nn.Module, head: str | nn.Module | None = None) -> Callable[[Tensor], Tensor]:
    """``x -> features`` (the head's input) of ``model`` (see :func:`features_and_logits`).

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> feature_extractor(net)(torch.rand(2, 4)).shape
    torch.Size([2, 3])
    """
    mod = find_head(model, head)

    def fn(x: Tensor) -> Tensor:
        return features_and_logits(model, x, mod)[0]

    fn.parameters = model.parameters  # type: ignore[attr-defined]  # the dtype rule (checks.as_model_dtype)
    return fn
