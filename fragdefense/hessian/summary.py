"""Curvature and fragility summaries of a model on a batch of images (plain torch): what the Hessian monitor logs
every few epochs and what ``fragdefense-hessian`` reports per checkpoint, in one home."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fragdefense.hessian.eigen import lanczos
from fragdefense.hessian.hvp import check_model_inputs, param_hessian
from fragdefense.hessian.probes import fragility_vs_curvature, input_top_eigen, spearman_1d, surrogate
from fragdefense.hessian.trace import hutchpp
from fragdefense.utils.checks import check_images, check_int_in_range

__all__ = ["hessian_snapshot", "fragility_summary"]


def hessian_snapshot(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_param_samples: int = 64,
    top_k: int = 1,
    lanczos_iters: int = 30,
    trace_matvecs: int = 30,
    n_input: int = 32,
    input_iters: int = 30,
    beta: float = 10.0,
    tol: float = 1e-3,
    seed: int = 0,
    batch_size: int | None = None,
    input_tol: float | None = None,
) -> dict[str, float]:
    """Curvature summary of ``model`` on ``(x, y)`` (keys without the ``hessian/`` prefix): the top eigenvalue(s)
    and the trace of the parameter Hessian of the loss on the first ``n_param_samples`` images, and the top
    input-Hessian eigenvalue of the predicted logit of the softplus(``beta``) surrogate on the first ``n_input``
    images (in chunks of ``batch_size``; ``input_tol`` its Lanczos tolerance, default ``tol``).
    ``n_param_samples=0`` or ``n_input=0`` skips that part. The
    :class:`~fragdefense.callbacks.HessianMonitor` and ``fragdefense-hessian``'s checkpoint comparison both
    call it.

    Example:
        >>> from fragdefense.models import create_model
        >>> _ = torch.manual_seed(0)
        >>> net = create_model("small_cnn", num_classes=10, width=4).eval()
        >>> out = hessian_snapshot(net, torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,)), trace_matvecs=6)
        >>> sorted(out)
        ['input_lambda_max_mean', 'input_lambda_max_median', 'param_top_eig', 'param_trace', 'param_trace_stderr']
    """
    # every argument checked before any work: images in [0, 1] (float64 run in the model's dtype), labels in range
    x, _, y = check_model_inputs(model, check_images(x, "x"), None, y)
    for v, name, lo in (
        (n_param_samples, "n_param_samples", 0),
        (top_k, "top_k", 1),
        (lanczos_iters, "lanczos_iters", 1),
        (trace_matvecs, "trace_matvecs", 0),
        (n_input, "n_input", 0),
        (input_iters, "input_iters", 1),
    ):
        check_int_in_range(v, name, lo)
    if batch_size is not None:
        check_int_in_range(batch_size, "batch_size", 1)
    out: dict[str, float] = {}
    if n_param_samples:
        xs, ys = x[:n_param_samples], y[:n_param_samples]
        op = param_hessian(model, F.cross_entropy, (xs, ys))
        r = lanczos(op, top_k, max_iter=lanczos_iters, tol=tol, generator=seed, return_vectors=False)
        out["param_top_eig"] = float(r.eigenvalues[0, 0])
        for i in range(1, r.eigenvalues.shape[1]):
            out[f"param_eig_{i + 1}"] = float(r.eigenvalues[0, i])
        if trace_matvecs:
            t = hutchpp(op, max(3, trace_matvecs), generator=seed)
            out["param_trace"] = float(t.estimate[0])
            out["param_trace_stderr"] = float(t.std_error[0])
    if n_input:
        xi = x[:n_input]
        soft = surrogate(model, beta)
        lams = []
        for xb in xi.split(batch_size or xi.shape[0]):
            with torch.no_grad():
                pred = model(xb).argmax(1)
            r = input_top_eigen(
                soft, xb, pred, max_iter=input_iters, tol=tol if input_tol is None else input_tol, generator=seed
            )
            lams.append(r.eigenvalues[:, 0].abs().double())
        lam = torch.cat(lams)
        out["input_lambda_max_mean"] = float(lam.mean())
        out["input_lambda_max_median"] = float(lam.median())
    return out


def fragility_summary(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    beta: float,
    objective: str,
    attack: dict[str, Any],
    max_iter: int,
    tol: float,
    batch_size: int,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`~fragdefense.hessian.probes.fragility_vs_curvature` over ``(x, y)`` in chunks of ``batch_size``,
    joined: per-image ``lambda_max``, ``grad_norm``, ``topk_intersection``, ``map_spearman`` (attacked images),
    counts, means and the Spearman correlations of curvature with fragility."""
    x, _, y = check_model_inputs(model, check_images(x, "x"), None, y)
    check_int_in_range(batch_size, "batch_size", 1)
    parts = [
        fragility_vs_curvature(
            model, xb, yb, beta=beta, objective=objective, attack=attack, max_iter=max_iter, tol=tol, generator=seed
        )
        for xb, yb in zip(x.split(batch_size), y.split(batch_size))
    ]
    out: dict[str, Any] = {"beta": float(beta), "objective": str(objective), "protocol": parts[0]["protocol"]}
    offs = 0
    idx: list[int] = []
    for p, xb in zip(parts, x.split(batch_size)):
        idx += [offs + i for i in p["image_index"]]
        offs += xb.shape[0]
    out["image_position"] = idx
    for key in ("lambda_max", "grad_norm", "topk_intersection", "map_spearman"):
        out[key] = [v for p in parts for v in p[key]]
    lam = torch.tensor(out["lambda_max"], dtype=torch.float64).abs()
    inter = torch.tensor(out["topk_intersection"], dtype=torch.float64)
    gn = torch.tensor(out["grad_norm"], dtype=torch.float64)
    sp = torch.tensor(out["map_spearman"], dtype=torch.float64)
    out["n_attacked"] = sum(p["n_attacked"] for p in parts)
    out["n_skipped"] = sum(p["n_skipped"] for p in parts)
    out["label_kept_rate"] = float(
        sum(p["label_kept_rate"] * p["n_attacked"] for p in parts if p["n_attacked"]) / max(1, out["n_attacked"])
    )
    out["mean_abs_lambda_max"] = float(lam.mean()) if lam.numel() else math.nan
    out["mean_topk_intersection"] = float(inter.mean()) if inter.numel() else math.nan
    out["spearman_abs_lambda_vs_topk"] = spearman_1d(lam, inter)
    out["spearman_rel_lambda_vs_topk"] = spearman_1d(lam / gn.clamp_min(1e-30), inter)
    out["spearman_abs_lambda_vs_map_spearman"] = spearman_1d(lam, sp)
    return out
