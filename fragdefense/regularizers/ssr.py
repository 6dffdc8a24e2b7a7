"""Smoothed-geometry regularization (SSR, Wang et al.) and the exact input-Hessian eigenvalue it needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragdefense.regularizers.base import Regularizer, RegularizerOutput, check_max_samples

__all__ = ["input_jacobian", "ce_input_hessian_lambda_max", "SSR"]


def input_jacobian(model: nn.Module, x: Tensor, *, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Logits ``(B, K)`` and their input Jacobian ``(B, K, C, H, W)``, batched over classes with
    ``is_grads_batched`` (one vmapped backward; a loop over classes if the model does not support vmap).

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    >>> logits, jac = input_jacobian(net, torch.rand(2, 3, 2, 2))
    >>> torch.allclose(jac[1].flatten(1), net[1].weight)
    True
    """
    xg = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        b, k = logits.shape
        eye = torch.eye(k, device=x.device, dtype=logits.dtype).unsqueeze(1).expand(k, b, k)
        try:
            (jac,) = torch.autograd.grad(logits, xg, grad_outputs=eye, is_grads_batched=True, create_graph=create_graph)
        except RuntimeError:
            rows = [
                torch.autograd.grad(logits, xg, eye[i], retain_graph=True, create_graph=create_graph)[0]
                for i in range(k)
            ]
            jac = torch.stack(rows)
    return logits, jac.transpose(0, 1)


def ce_input_hessian_lambda_max(
    model: nn.Module, x: Tensor, *, channel_average: bool = False, create_graph: bool = False
) -> Tensor:
    r"""Top eigenvalue, per sample, of :math:`W^\top (\mathrm{diag}\,p - pp^\top) W` - the input Hessian of the
    cross-entropy of a piecewise-linear network (exact almost everywhere, any label), ``W`` the input
    Jacobian of the logits and ``p`` the softmax. Computed exactly from the ``K x K`` matrix
    :math:`L^\top W W^\top L` with :math:`L = (I - p\mathbf 1^\top)\,\mathrm{diag}(\sqrt p)`
    (:math:`LL^\top = \mathrm{diag}\,p - pp^\top`), which has the same non-zero eigenvalues; differentiable
    (``create_graph=True``) when the top eigenvalue is simple.

    Args:
        channel_average: average ``W`` over colour channels first (SSR's cheaper ``(K, H*W)`` form).

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4), nn.ReLU(), nn.Linear(4, 3))
    >>> ce_input_hessian_lambda_max(net, torch.rand(5, 3, 2, 2)).shape
    torch.Size([5])
    """
    logits, jac = input_jacobian(model, x, create_graph=create_graph)
    w = jac.mean(2) if channel_average else jac  # (B, K, ...)
    w = w.flatten(2)
    p = F.softmax(logits, dim=1)
    k = p.shape[1]
    eye = torch.eye(k, device=p.device, dtype=p.dtype)
    lmat = (eye.unsqueeze(0) - p.unsqueeze(2)) * p.clamp_min(0).sqrt().unsqueeze(1)  # (I - p 1^T) diag(sqrt p)
    g = w @ w.transpose(1, 2)  # (B, K, K)
    m = lmat.transpose(1, 2) @ g @ lmat
    m = 0.5 * (m + m.transpose(1, 2))
    return torch.linalg.eigvalsh(m)[:, -1]


class SSR(Regularizer):
    r"""Smoothed-geometry regularization (Wang, Wang, Ramkumar, Fredrikson, Mardziel & Datta, NeurIPS 2020,
    "Smoothed geometry for robust attribution").

    Objective: :math:`(1 - \alpha)\,\mathrm{CE}(x) + \alpha\, s \cdot \frac1B \sum_b
    \lambda_{\max}\big(W_b^\top(\mathrm{diag}\,p_b - p_b p_b^\top) W_b\big)`, ``W`` the (channel-averaged)
    input Jacobian of the logits - the top eigenvalue of the cross-entropy's input Hessian of a ReLU
    network (:func:`ce_input_hessian_lambda_max`). Here the loss is ``CE + weight * lambda_max``, i.e.
    ``weight = alpha * s / (1 - alpha)`` up to the overall factor ``1 - alpha``. Cost: the Jacobian (``K``
    backward passes, vmapped) plus its double backward, ~``K``-fold a plain step (K = classes).

    Args:
        weight: ``alpha * s / (1 - alpha)``.
        channel_average: SSR's channel-averaged ``W`` (default) or the full Jacobian.
        max_samples: compute the penalty on the first ``max_samples`` images of the batch only (batches are
            shuffled, so this is an unbiased estimate of the batch mean at a fraction of the cost); ``None``: all.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x = torch.rand(2, 3, 4, 4); y = torch.tensor([0, 1])
    >>> bool(SSR().penalty(net, x, x, y, net(x)).penalty >= 0)
    True
    """

    name = "ssr"
    second_order = True

    def __init__(
        self,
        weight: float = 1.0,
        warmup_epochs: float = 0.0,
        channel_average: bool = True,
        max_samples: int | None = None,
    ) -> None:
        super().__init__(weight, warmup_epochs)
        self.channel_average = bool(channel_average)
        self.max_samples = check_max_samples(max_samples)

    def penalty(self, model: nn.Module, x: Tensor, x_train: Tensor, y: Tensor, logits: Tensor) -> RegularizerOutput:
        xs = x.detach()[: self.max_samples]
        lam = ce_input_hessian_lambda_max(model, xs, channel_average=self.channel_average, create_graph=True)
        return RegularizerOutput(lam.mean())
