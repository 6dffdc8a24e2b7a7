"""Robustness scores of an explanation function under random input perturbations (plain torch, batched).

* :func:`max_sensitivity`, :func:`avg_sensitivity`: Yeh et al., "On the (In)fidelity and Sensitivity of
  Explanations" (2019): the largest / mean change of the map ``||a(x') - a(x)||`` over noisy copies ``x'`` of
  ``x``, divided by ``||a(x)||`` by default (``relative=True``, as Quantus does).
* :func:`local_lipschitz_estimate`: Alvarez-Melis & Jaakkola, "On the Robustness of Interpretability Methods"
  (2018): ``max ||a(x') - a(x)|| / ||x' - x||``.
* :func:`relative_input_stability`, :func:`relative_output_stability`, :func:`relative_representation_stability`:
  Agarwal et al., "Rethinking Stability for Attribution-based Explanations" (2022): the relative change of the
  map divided by the relative change of the input, the change of the logits, or the relative change of an
  internal representation.

Every score is lower-is-better, one value per image ``(B,)``. Norms are Frobenius norms of the whole
difference (map ``(H, W)``, image ``(C, H, W)``). ``explain(x, y) -> (B, H, W)`` is a callable with the model
bound (:func:`make_explain` builds one from a registered attribution method); ``maps`` are the clean maps
(computed when ``None``).

**Sampling.** ``n_samples`` perturbed copies of each image are drawn uniformly in the ``radius``-ball around ``x``
(``norm="linf"``: i.i.d. uniform noise in ``[-radius, radius]``; ``norm="l2"``: uniform in the L2 ball) and
clamped to ``[0, 1]`` (``clamp=True``, the default: the model only sees valid images; Quantus does not clamp,
pass ``clamp=False`` to sample as it does). Randomness follows the seeding convention (``generator``: ``None``,
an int, a ``torch.Generator``, or a list of per-image seeds / generators, which makes every image's score
independent of the batch it is in). ``perturbations`` (``(n_samples, B, C, H, W)``) gives the perturbed images
instead (used as given), e.g. to score several methods on identical samples.

**Batching.** The ``B * n_samples`` perturbed images are explained in chunks of ``chunk_size`` (default:
:func:`~fragdefense.utils.conventions.default_chunk`, about 170 CIFAR-size images), so ``explain`` is called
``ceil(B * n_samples / chunk_size)`` times (plus once for the clean maps when ``maps`` is ``None``). The scores that
need the model's output (the relative output / representation stabilities, and every score with
``keep_prediction=True``) read it from the explanation's own forward pass when ``explain`` is a :func:`make_explain`
saliency or input x gradient of the same model (its one forward pass is the plain model at the explained images; the
input is checked), and otherwise add one no-grad forward pass per chunk and one on the clean images.
:func:`robustness_scores` computes several scores from one set of samples and one pass.

**Differences from Quantus 0.6** (every other detail matches it; ``tests/test_metrics_robustness.py`` compares
the scores on identical samples):

* ``keep_prediction=True`` (the default of the relative stabilities, as in Agarwal et al.) takes the max over the
  samples whose predicted class equals the clean one and returns NaN only when no sample is left; Quantus'
  ``return_nan_when_prediction_changes=True`` returns NaN as soon as one sample changes the prediction (its
  ``np.max`` / ``np.mean`` propagate the NaN of that sample).
* The relative stabilities' denominators are ``max(||.||, eps_min)`` as in the paper and in Quantus' own docs;
  Quantus' code adds ``eps_min`` only when the norm is exactly 0 (the two differ only for norms in
  ``(0, eps_min)``).
* ``relative=True`` sensitivity of an all-zero clean map: ``0 / 0 = 0`` (an unchanged map); Quantus gives NaN.
* The default neighbourhoods: Quantus draws the sensitivities' noise uniformly in ``[-0.2, 0.2]`` (our
  default), the local Lipschitz estimate's from ``N(0, 0.1^2)`` and the relative stabilities' uniformly in
  ``[0.02, 0.2]`` (always positive: its ``upper_bound=0.2`` with the default ``lower_bound=0.02``); we sample
  every score in the same ball around ``x``.

Example:
    >>> import torch
    >>> from fragdefense.models import create_model
    >>> net = create_model("small_cnn", num_classes=3, width=4).eval()
    >>> x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    >>> explain = make_explain(net, "saliency")
    >>> s = robustness_scores(net, x, y, explain, ["max_sensitivity", "relative_input_stability"], n_samples=4,
    ...                       generator=0)
    >>> s["max_sensitivity"].shape, bool((s["max_sensitivity"] >= 0).all())
    (torch.Size([2]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fragdefense.utils.checks import as_model_dtype, check_images, check_int_in_range
from fragdefense.utils.conventions import default_chunk, eval_mode, make_generator, parse_budget, rand, randn

__all__ = [
    "make_explain",
    "sample_perturbations",
    "robustness_scores",
    "max_sensitivity",
    "avg_sensitivity",
    "local_lipschitz_estimate",
    "relative_input_stability",
    "relative_output_stability",
    "relative_representation_stability",
    "ROBUSTNESS_SCORES",
]

Explain = Callable[[Tensor, Tensor], Tensor]

#: the scores computed by :func:`robustness_scores`
ROBUSTNESS_SCORES = (
    "max_sensitivity",
    "avg_sensitivity",
    "local_lipschitz_estimate",
    "relative_input_stability",
    "relative_output_stability",
    "relative_representation_stability",
)
_STABILITIES = ROBUSTNESS_SCORES[3:]
_NORMS = ("linf", "l2")
#: registered methods whose only forward pass is the plain model at the explained images
_FORWARD_AT_INPUT = ("saliency", "input_x_gradient")
#: added to the input distance of the local Lipschitz estimate (Quantus' ``lipschitz_constant``)
LIPSCHITZ_EPS = 1e-10


def make_explain(
    model: nn.Module, method: Any = "saliency", *, reduce: str = "abs_sum", normalize: bool = False, **method_opts: Any
) -> Explain:
    """``explain(x, y) -> (B, H, W)``: the attribution ``method`` of ``model`` (a registered name, a callable or a
    captum object; :func:`fragdefense.attributions.registry.resolve_attribution`) reduced to a map by
    :func:`fragdefense.attributions.to_map` (channels absolute-summed by default, **not** normalised unless
    ``normalize=True``). ``method_opts`` go to the method.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    >>> explain = make_explain(net, "saliency")
    >>> explain(torch.rand(2, 3, 4, 4), torch.tensor([0, 1])).shape
    torch.Size([2, 4, 4])
    """
    from fragdefense.attributions.maps import REDUCTIONS, to_map
    from fragdefense.attributions.registry import resolve_attribution

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    spec = resolve_attribution(method, "method")
    if reduce not in REDUCTIONS:
        raise ValueError(f"`reduce` must be one of {REDUCTIONS}, got {reduce!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"`normalize` must be True or False, got {normalize!r}")

    def explain(x: Tensor, y: Tensor) -> Tensor:
        return to_map(spec(model, x, y, **method_opts), reduce=reduce, normalize=normalize).detach()

    explain.__name__ = f"explain_{spec.name}"
    explain.model = model  # type: ignore[attr-defined]
    # one plain forward pass of `model` at the explained images (the scores may read the logits from it)
    explain.forward_at_input = method in _FORWARD_AT_INPUT and not method_opts  # type: ignore[attr-defined]
    return explain


# ----------------------------------------------------------------------------------------------- validation


def _check_radius(radius: Any) -> float:
    r = parse_budget(radius, "radius")
    if not r > 0:
        raise ValueError(f"`radius` must be a finite number > 0 (pixel units of [0, 1] images), got {radius!r}")
    return r


def _check_norm(norm: Any) -> str:
    if norm not in _NORMS:
        raise ValueError(f"`norm` must be one of {_NORMS}, got {norm!r}")
    return norm


def _check_bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"`{name}` must be True or False, got {v!r}")
    return v


def _check_eps_min(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"`eps_min` must be a finite number > 0, got {v!r}") from None
    if isinstance(v, bool) or not (math.isfinite(f) and f > 0):
        raise ValueError(f"`eps_min` must be a finite number > 0, got {v!r}")
    return f


def _num_classes(model: nn.Module, x: Tensor) -> int:
    k = getattr(model, "num_classes", None)
    if isinstance(k, int) and not isinstance(k, bool) and k > 0:
        return k
    with torch.no_grad(), eval_mode(model):  # one image: the number of classes of a model that does not say it
        return int(model(x[:1]).shape[-1])


def _check_labels(y: Any, b: int, num_classes: int | None) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"`y` must be a torch.Tensor of integer labels (B,), got {type(y).__name__}")
    if y.ndim != 1 or y.shape[0] != b:
        raise ValueError(f"`y` must have shape (B,) = ({b},) to match `x`, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"`y` must hold integer class labels, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        upper = f" and < {num_classes} (the model's classes)" if num_classes is not None else ""
        raise ValueError(f"`y` must hold labels >= 0{upper}, got min={lo}, max={hi}")
    return y.long()


def _check_maps(maps: Any, x: Tensor) -> Tensor:
    want = (x.shape[0], x.shape[2], x.shape[3])
    if not isinstance(maps, Tensor):
        raise TypeError(f"`maps` must be None or a torch.Tensor of shape (B, H, W) = {want}, got {type(maps).__name__}")
    if tuple(maps.shape) != want:
        raise ValueError(f"`maps` must have shape (B, H, W) = {want}, got {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise TypeError(f"`maps` must have a floating dtype, got {maps.dtype}")
    if not torch.isfinite(maps).all():
        raise ValueError("`maps` contains NaN or Inf values")
    return maps


def _check_perturbations(p: Any, x: Tensor, n_samples: int | None) -> Tensor:
    if not isinstance(p, Tensor):
        raise TypeError(
            f"`perturbations` must be None or a torch.Tensor (n_samples, B, C, H, W), got {type(p).__name__}"
        )
    if p.ndim != 5 or tuple(p.shape[1:]) != tuple(x.shape) or p.shape[0] == 0:
        raise ValueError(
            f"`perturbations` must have shape (n_samples, B, C, H, W) with (B, C, H, W) = {tuple(x.shape)} and "
            f"n_samples >= 1, got {tuple(p.shape)}"
        )
    if n_samples is not None and n_samples != p.shape[0]:
        raise ValueError(f"`n_samples`={n_samples} disagrees with `perturbations`, which holds {p.shape[0]} samples")
    if not p.is_floating_point():
        raise TypeError(f"`perturbations` must have a floating dtype, got {p.dtype}")
    if not torch.isfinite(p).all():
        raise ValueError("`perturbations` contains NaN or Inf values")
    return p


def _resolve_layer(model: nn.Module, layer: Any) -> tuple[nn.Module, bool]:
    """(module, read its input?) for the relative representation stability."""
    if layer is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                "`layer`=None reads the input of the model's last nn.Linear, but the model has none; pass `layer` "
                "(a submodule or its dotted name, e.g. 'backbone.features.16')"
            )
        return linears[-1], True
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer), False
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"`layer`={layer!r} is not a submodule of the model; submodules: {shown}") from None
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError("`layer` must be a submodule of `model` (or its dotted name)")
        return layer, False
    raise TypeError(f"`layer` must be None, a submodule of the model or its dotted name, got {type(layer).__name__}")


# ----------------------------------------------------------------------------------------------- sampling


def sample_perturbations(
    x: Tensor,
    n_samples: int = 10,
    *,
    radius: Any = 0.2,
    norm: str = "linf",
    clamp: bool = True,
    generator: Any = None,
) -> Tensor:
    """``n_samples`` random copies of every image in the ``radius``-ball around it, ``(n_samples, B, C, H, W)``.

    ``norm="linf"``: i.i.d. uniform noise in ``[-radius, radius]``; ``norm="l2"``: uniform in the L2 ball (a
    Gaussian direction scaled by ``radius * U ** (1 / D)``). ``clamp=True`` clamps the perturbed images to
    ``[0, 1]``. ``generator``: the seeding convention; a list of per-image seeds / generators draws each image's
    samples from its own generator (independent of the batch composition).

    >>> import torch
    >>> x = torch.rand(2, 3, 4, 4)
    >>> p = sample_perturbations(x, 5, radius=0.1, generator=0)
    >>> p.shape, bool(((p - x).abs() <= 0.1 + 1e-6).all()), bool(((p >= 0) & (p <= 1)).all())
    (torch.Size([5, 2, 3, 4, 4]), True, True)
    """
    check_images(x, "x")
    check_int_in_range(n_samples, "n_samples", 1)
    r = _check_radius(radius)
    _check_norm(norm)
    _check_bool(clamp, "clamp")
    return _sample(x, n_samples, r, norm, clamp, make_generator(generator, x.device)).transpose(0, 1)


def _sample(x: Tensor, n: int, radius: float, norm: str, clamp: bool, gen: Any) -> Tensor:
    """(B, n, C, H, W) perturbed images (image-major: image i draws its n samples from its own generator)."""
    b, d = x.shape[0], x[0].numel()
    if norm == "linf":
        noise = (rand((b, n, *x.shape[1:]), gen, x.device, x.dtype) * 2 - 1) * radius
    else:
        direction = randn((b, n, d), gen, x.device, x.dtype)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        scale = radius * rand((b, n), gen, x.device, x.dtype) ** (1.0 / d)
        noise = (direction * scale[..., None]).view(b, n, *x.shape[1:])
    xp = x[:, None] + noise
    return xp.clamp(0.0, 1.0) if clamp else xp


# ----------------------------------------------------------------------------------------------- scores


def _masked_max(v: Tensor, keep: Tensor | None) -> Tensor:
    if keep is None:
        return v.amax(1)
    out = torch.where(keep, v, torch.full_like(v, -math.inf)).amax(1)
    return torch.where(keep.any(1), out, torch.full_like(out, math.nan))


def _masked_mean(v: Tensor, keep: Tensor | None) -> Tensor:
    if keep is None:
        return v.mean(1)
    k = keep.sum(1)
    s = torch.where(keep, v, torch.zeros_like(v)).sum(1)
    return torch.where(k > 0, s / k.clamp_min(1), torch.full_like(s, math.nan))


def _relative(a: Tensor, ap: Tensor, eps_min: float) -> Tensor:
    """``||(a - a') / (a + eps_min [a == 0])||`` over the last dim; ``a`` (B, 1, D), ``ap`` (B, n, D)."""
    den = a + (a == 0).to(a.dtype) * eps_min
    return ((a - ap) / den).norm(dim=-1)


def robustness_scores(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explain: Explain | str,
    names: Sequence[str] = ROBUSTNESS_SCORES,
    *,
    radius: Any = 0.2,
    n_samples: int | None = None,
    norm: str = "linf",
    clamp: bool = True,
    generator: Any = None,
    chunk_size: int | None = None,
    maps: Tensor | None = None,
    perturbations: Tensor | None = None,
    keep_prediction: bool | None = None,
    relative: bool = True,
    eps_min: float = 1e-6,
    layer: Any = None,
) -> dict[str, Tensor]:
    """Several robustness scores (``names`` from :data:`ROBUSTNESS_SCORES`) from **one** set of perturbed samples
    and one pass over them: ``{name: (B,)}``. The arguments are those of the single scores (see the module
    docstring and :func:`max_sensitivity`); ``keep_prediction=None`` uses each score's default (``False`` for
    the sensitivities and the local Lipschitz estimate, ``True`` for the relative stabilities).

    >>> import torch
    >>> from fragdefense.models import create_model
    >>> net = create_model("small_cnn", num_classes=3, width=4).eval()
    >>> s = robustness_scores(net, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), "saliency", n_samples=2)
    >>> sorted(s) == sorted(ROBUSTNESS_SCORES)
    True
    """
    # ---- validation, before any work
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x, "x")
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise TypeError(f"`names` must be a non-empty list of scores from {ROBUSTNESS_SCORES}, got {names!r}")
    bad = [n for n in names if n not in ROBUSTNESS_SCORES]
    if bad:
        raise ValueError(f"`names` holds unknown scores {bad}; known: {ROBUSTNESS_SCORES}")
    r = _check_radius(radius)
    if n_samples is not None:
        check_int_in_range(n_samples, "n_samples", 1)
    _check_norm(norm)
    _check_bool(clamp, "clamp")
    gen = make_generator(generator, x.device)
    if isinstance(gen, list) and len(gen) != x.shape[0]:
        raise ValueError(f"`generator` holds {len(gen)} per-image generators for a batch of {x.shape[0]} images")
    if chunk_size is not None:
        check_int_in_range(chunk_size, "chunk_size", 1)
    if maps is not None:
        _check_maps(maps, x)
    if perturbations is not None:
        _check_perturbations(perturbations, x, n_samples)
    if keep_prediction is not None:
        _check_bool(keep_prediction, "keep_prediction")
    _check_bool(relative, "relative")
    eps_min = _check_eps_min(eps_min)
    hook_module, read_input = (
        _resolve_layer(model, layer) if "relative_representation_stability" in names else (None, False)
    )
    if isinstance(explain, str):
        explain = make_explain(model, explain)
    elif not callable(explain):
        raise TypeError(f"`explain` must be a callable explain(x, y) -> (B, H, W) or a method name, got {explain!r}")
    y = _check_labels(y, x.shape[0], _num_classes(model, x))

    keep_of = {n: (n in _STABILITIES) if keep_prediction is None else keep_prediction for n in names}
    need_logits = "relative_output_stability" in names or any(keep_of.values())
    need_rep = "relative_representation_stability" in names
    need_forward = need_logits or need_rep

    # ---- work
    x = as_model_dtype(x, model)
    b, hw = x.shape[0], x.shape[2] * x.shape[3]
    if perturbations is not None:
        xp = perturbations.to(x.dtype).transpose(0, 1)  # (B, n, C, H, W)
    else:
        xp = _sample(x, 10 if n_samples is None else n_samples, r, norm, clamp, gen)
    n = xp.shape[1]
    xflat = xp.reshape(b * n, *x.shape[1:])
    yflat = y.repeat_interleave(n)
    total = b * n
    step = default_chunk(x) if chunk_size is None else chunk_size

    # The logits / representation of an image batch come from our own no-grad forward pass, or - when `explain`
    # is a make_explain saliency / input x gradient of this very model, whose one forward pass is the plain model
    # at the explained images - from that pass (its input is checked to equal the batch), saving a forward.
    reuse = need_forward and getattr(explain, "forward_at_input", False) and getattr(explain, "model", None) is model
    state: dict[str, Any] = {"on": False, "target": None, "rep": None, "hit": None}

    def grab(_m: nn.Module, inp: Any, out: Any = None) -> None:
        if not state["on"]:
            return
        t = inp[0] if read_input else out
        if isinstance(t, (tuple, list)):
            t = t[0]
        if not isinstance(t, Tensor):
            raise TypeError(f"`layer` must produce a tensor, got {type(t).__name__}")
        state["rep"] = t.detach().reshape(t.shape[0], -1)

    def start(_m: nn.Module, inp: Any) -> None:
        state["rep"] = None

    def finish(m: nn.Module, inp: Any, out: Any) -> None:
        tgt = state["target"]
        if state["hit"] is not None or tgt is None or m is not model or not isinstance(out, Tensor):
            return
        t = inp[0] if inp else None
        if isinstance(t, Tensor) and t.shape == tgt.shape and torch.equal(t.detach(), tgt):
            state["hit"] = (out.detach(), state["rep"])

    def run(inp: Tensor, lab: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(maps, logits, representation) of a batch."""
        state.update(on=reuse, target=inp if reuse else None, hit=None)
        try:
            m = _explain_checked(explain, inp, lab)
        finally:
            state.update(on=False, target=None)
        if not need_forward:
            return m, None, None
        if state["hit"] is not None:
            return m, *state["hit"]
        state["on"] = True
        try:
            with torch.no_grad():
                logits = model(inp)
        finally:
            state["on"] = False
        return m, logits, state["rep"]

    handles = []
    try:
        if need_rep:
            assert hook_module is not None
            handles.append(
                hook_module.register_forward_pre_hook(grab) if read_input else hook_module.register_forward_hook(grab)
            )
        if reuse:
            handles += [model.register_forward_pre_hook(start), model.register_forward_hook(finish)]
        with eval_mode(model):
            logits0 = rep0 = None
            if maps is None:
                maps, logits0, rep0 = run(x, y)
            elif need_forward:  # clean maps given: a forward pass is enough
                state["on"] = True
                try:
                    with torch.no_grad():
                        logits0 = model(x)
                finally:
                    state["on"] = False
                rep0 = state["rep"]
            out_maps, out_logits, out_reps = [], [], []
            for s in range(0, total, step):
                m, lg, rp = run(xflat[s : s + step], yflat[s : s + step])
                out_maps.append(m)
                out_logits.append(lg)
                out_reps.append(rp)
    finally:
        for h in handles:
            h.remove()

    a = maps.to(x.dtype).reshape(b, 1, hw)
    ap = torch.cat(out_maps).to(x.dtype).reshape(b, n, hw)
    changed = None
    if need_forward:
        assert logits0 is not None
        lp = torch.cat(out_logits).reshape(b, n, -1)
        changed = lp.argmax(-1) != logits0.argmax(-1)[:, None]

    res: dict[str, Tensor] = {}
    dist = None
    if {"max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate"} & set(names):
        dist = (ap - a).norm(dim=-1)  # (B, n)
    sens = None
    if {"max_sensitivity", "avg_sensitivity"} & set(names):
        assert dist is not None
        if relative:
            an = a.norm(dim=-1)  # (B, 1)
            sens = torch.where(dist == 0, torch.zeros_like(dist), dist / an)
        else:
            sens = dist
    num = None
    if set(_STABILITIES) & set(names):
        num = _relative(a, ap, eps_min)  # (B, n)

    def keep(name: str) -> Tensor | None:
        return ~changed if keep_of[name] and changed is not None else None

    x1 = x.reshape(b, 1, -1)
    for name in names:
        if name == "max_sensitivity":
            res[name] = _masked_max(sens, keep(name))  # type: ignore[arg-type]
        elif name == "avg_sensitivity":
            res[name] = _masked_mean(sens, keep(name))  # type: ignore[arg-type]
        elif name == "local_lipschitz_estimate":
            dx = (xp.reshape(b, n, -1) - x1).norm(dim=-1)
            res[name] = _masked_max(dist / (dx + LIPSCHITZ_EPS), keep(name))  # type: ignore[operator]
        elif name == "relative_input_stability":
            den = _relative(x1, xp.reshape(b, n, -1), eps_min).clamp_min(eps_min)
            res[name] = _masked_max(num / den, keep(name))  # type: ignore[operator]
        elif name == "relative_output_stability":
            den = (lp - logits0[:, None]).norm(dim=-1).clamp_min(eps_min)  # type: ignore[index]
            res[name] = _masked_max(num / den, keep(name))  # type: ignore[operator]
        else:
            assert rep0 is not None
            rp = torch.cat(out_reps).to(x.dtype).reshape(b, n, -1)  # type: ignore[arg-type]
            den = _relative(rep0.to(x.dtype)[:, None], rp, eps_min).clamp_min(eps_min)
            res[name] = _masked_max(num / den, keep(name))  # type: ignore[operator]
    return res


def _explain_checked(explain: Explain, x: Tensor, y: Tensor) -> Tensor:
    m = explain(x, y)
    want = (x.shape[0], x.shape[2], x.shape[3])
    if not isinstance(m, Tensor) or tuple(m.shape) != want:
        got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"`explain` must return maps (B, H, W) = {want} for images {tuple(x.shape)}, got {got}")
    return m.detach()


_COMMON_DOC = """
    Args:
        model: images in ``[0, 1]`` -> logits; run in eval mode (every submodule's flag restored afterwards).
        x: images ``(B, C, H, W)`` in ``[0, 1]`` (float64 images run in the model's dtype).
        y: ``(B,)`` integer labels, the explained classes.
        explain: ``explain(x, y) -> (B, H, W)`` (e.g. :func:`make_explain`) or a registered method name.
        radius: the neighbourhood's radius in pixel units (a number or ``"8/255"``), finite and ``> 0``.
        n_samples: perturbed copies per image (default 10; the number of ``perturbations`` when given).
        norm: ``"linf"`` (uniform noise in ``[-radius, radius]``) or ``"l2"`` (uniform in the L2 ball).
        clamp: clamp the perturbed images to ``[0, 1]`` (Quantus does not clamp: ``clamp=False``; the
            registered attribution methods reject images outside ``[0, 1]``).
        generator: ``None``, an int seed, a ``torch.Generator`` or a list of per-image seeds / generators.
        chunk_size: perturbed images per ``explain`` call (default: a memory budget,
            :func:`~fragdefense.utils.conventions.default_chunk`).
        maps: the clean maps ``explain(x, y)`` ``(B, H, W)`` (computed when ``None``).
        perturbations: ``(n_samples, B, C, H, W)`` perturbed images to use instead of sampling.
"""


def max_sensitivity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explain: Explain | str,
    *,
    radius: Any = 0.2,
    n_samples: int | None = None,
    norm: str = "linf",
    clamp: bool = True,
    generator: Any = None,
    chunk_size: int | None = None,
    maps: Tensor | None = None,
    perturbations: Tensor | None = None,
    relative: bool = True,
    keep_prediction: bool = False,
) -> Tensor:
    """Max-sensitivity (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations"), per image:
    ``max_i ||a(x'_i) - a(x)||_F / ||a(x)||_F`` over ``n_samples`` perturbed copies ``x'_i`` (``relative=False``:
    the paper's ``max_i ||a(x'_i) - a(x)||_F``). Lower is more robust. Equals Quantus' ``MaxSensitivity``
    (``normalise=False, abs=False``) on the same samples; an all-zero clean map gives 0 when the perturbed maps
    are zero too (Quantus: NaN) and ``inf`` otherwise. ``keep_prediction=True`` takes the max over the samples
    that keep the predicted class (NaN when none does).
    {common}
    >>> import torch
    >>> from fragdefense.models import create_model
    >>> net = create_model("small_cnn", num_classes=3, width=4).eval()
    >>> max_sensitivity(net, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), "saliency", n_samples=3).shape
    torch.Size([2])
    """
    return robustness_scores(
        model, x, y, explain, ["max_sensitivity"], radius=radius, n_samples=n_samples, norm=norm, clamp=clamp,
        generator=generator, chunk_size=chunk_size, maps=maps, perturbations=perturbations, relative=relative,
        keep_prediction=keep_prediction,
    )["max_sensitivity"]  # fmt: skip


def avg_sensitivity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explain: Explain | str,
    *,
    radius: Any = 0.2,
    n_samples: int | None = None,
    norm: str = "linf",
    clamp: bool = True,
    generator: Any = None,
    chunk_size: int | None = None,
    maps: Tensor | None = None,
    perturbations: Tensor | None = None,
    relative: bool = True,
    keep_prediction: bool = False,
) -> Tensor:
    """Avg-sensitivity (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations"), per image: the mean of
    ``||a(x'_i) - a(x)||_F / ||a(x)||_F`` over the perturbed copies (see :func:`max_sensitivity`). Equals Quantus'
    ``AvgSensitivity`` (``normalise=False, abs=False``) on the same samples.
    {common}
    >>> import torch
    >>> from fragdefense.models import create_model
    >>> net = create_model("small_cnn", num_classes=3, width=4).eval()
    >>> avg_sensitivity(net, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), "saliency", n_samples=3).shape
    torch.Size([2])
    """
    return robustness_scores(
        model, x, y, explain, ["avg_sensitivity"], radius=radius, n_samples=n_samples, norm=norm, clamp=clamp,
        generator=generator, chunk_size=chunk_size, maps=maps, perturbations=perturbations, relative=relative,
        keep_prediction=keep_prediction,
    )["avg_sensitivity"]  # fmt: skip


def local_lipschitz_estimate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explain: Explain | str,
    *,
    radius: Any = 0.2,
    n_samples: int | None = None,
    norm: str = "linf",
    clamp: bool = True,
    generator: Any = None,
    chunk_size: int | None = None,
    maps: Tensor | None = None,
    perturbations: Tensor | None = None,
    keep_prediction: bool = False,
) -> Tensor:
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola, "On the Robustness of Interpretability Methods"), per
    image: ``max_i ||a(x'_i) - a(x)||_2 / (||x'_i - x||_2 + 1e-10)`` over the perturbed copies (a Monte Carlo
    lower bound of the local Lipschitz constant of the explanation). Equals Quantus' ``LocalLipschitzEstimate``
    (``normalise=False, abs=False``) on the same samples (Quantus draws them from ``N(0, 0.1^2)`` by default).
    {common}
    >>> import torch
    >>> from fragdefense.models import create_model
    >>> net = create_model("small_cnn", num_classes=3, width=4).eval()
    >>> local_lipschitz_estimate(net, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), "saliency", n_samples=3).shape
    torch.Size([2])
    """
    return robustness_scores(
        model, x, y, explain, ["local_lipschitz_estimate"], radius=radius, n_samples=n_samples, norm=norm,
        clamp=clamp, generator=generator, chunk_size=chunk_size, maps=maps, perturbations=perturbations,
        keep_prediction=keep_prediction,
    )["local_lipschitz_estimate"]  # fmt: skip


_STABILITY_DOC = """
        eps_min: the floor of the denominators and the value added to zero entries of the divisors
            (``1e-6``, as in Quantus).
        keep_prediction: the max over the samples whose predicted class equals the clean one (Agarwal et al.;
            NaN when no sample keeps it); ``False``: over every sample.
"""


def relative_input_stability(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explain: Explain | str,
    *,
    radius: Any = 0.2,
    n_samples: int | None = None,
    norm: str = "linf",
    clamp: bool = True,
    generator: Any = None,
    chunk_size: int | None = None,
    maps: Tensor | None = None,
    perturbations: Tensor | None = None,
    eps_min: float = 1e-6,
    keep_prediction: bool = True,
) -> Tensor:
    """Relative input stability (Agarwal et al., "Rethinking Stability for Attribution-based Explanations"), per
    image: ``max_i ||(a - a'_i) / a||_F / max(||(x - x'_i) / x||_F, eps_min)`` with element-wise divisions whose
    zero divisors are replaced by ``eps_min``. Equals Quantus' ``RelativeInputStability`` (``normalise=False,
    abs=False, return_nan_when_prediction_changes=False``) on the same samples when ``keep_prediction=False``;
    with ``keep_prediction=True`` Quantus returns NaN as soon as one sample changes the prediction, we take the
    max over the others (the paper's definition). A constant explanation gives 0.
    {common}{stability}
    >>> import torch
    >>> from fragdefense.models import create_model
    >>> net = create_model("small_cnn", num_classes=3, width=4).eval()
    >>> relative_input_stability(net, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), "saliency", n_samples=3).shape
    torch.Size([2])
    """
    return robustness_scores(
        model, x, y, explain, ["relative_input_stability"], radius=radius, n_samples=n_samples, norm=norm,
        clamp=clamp, generator=generator, chunk_size=chunk_size, maps=maps, perturbations=perturbations,
        eps_min=eps_min, keep_prediction=keep_prediction,
    )["relative_input_stability"]  # fmt: skip


def relative_output_stability(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explain: Explain | str,
    *,
    radius: Any = 0.2,
    n_samples: int | None = None,
    norm: str = "linf",
    clamp: bool = True,
    generator: Any = None,
    chunk_size: int | None = None,
    maps: Tensor | None = None,
    perturbations: Tensor | None = None,
    eps_min: float = 1e-6,
    keep_prediction: bool = True,
) -> Tensor:
    """Relative output stability (Agarwal et al., "Rethinking Stability for Attribution-based Explanations"), per
    image: ``max_i ||(a - a'_i) / a||_F / max(||h(x) - h(x'_i)||_2, eps_min)`` with ``h`` the logits. Equals
    Quantus' ``RelativeOutputStability`` (``normalise=False, abs=False, softmax=False,
    return_nan_when_prediction_changes=False``) on the same samples when ``keep_prediction=False`` (see
    :func:`relative_input_stability` for ``keep_prediction=True``).
    {common}{stability}
    >>> import torch
    >>> from fragdefense.models import create_model
    >>> net = create_model("small_cnn", num_classes=3, width=4).eval()
    >>> relative_output_stability(net, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), "saliency", n_samples=3).shape
    torch.Size([2])
    """
    return robustness_scores(
        model, x, y, explain, ["relative_output_stability"], radius=radius, n_samples=n_samples, norm=norm,
        clamp=clamp, generator=generator, chunk_size=chunk_size, maps=maps, perturbations=perturbations,
        eps_min=eps_min, keep_prediction=keep_prediction,
    )["relative_output_stability"]  # fmt: skip


def relative_representation_stability(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explain: Explain | str,
    *,
    layer: nn.Module | str | None = None,
    radius: Any = 0.2,
    n_samples: int | None = None,
    norm: str = "linf",
    clamp: bool = True,
    generator: Any = None,
    chunk_size: int | None = None,
    maps: Tensor | None = None,
    perturbations: Tensor | None = None,
    eps_min: float = 1e-6,
    keep_prediction: bool = True,
) -> Tensor:
    """Relative representation stability (Agarwal et al., "Rethinking Stability for Attribution-based
    Explanations"), per image: ``max_i ||(a - a'_i) / a||_F / max(||(L(x) - L(x'_i)) / L(x)||_2, eps_min)`` with
    ``L`` an internal representation (flattened): the output of ``layer`` (a submodule or its dotted name, read by
    a forward hook), by default the input of the model's last ``nn.Linear`` (the penultimate features). Equals
    Quantus' ``RelativeRepresentationStability`` with ``layer_names=[<that layer>]`` (``normalise=False,
    abs=False, return_nan_when_prediction_changes=False``) on the same samples when ``keep_prediction=False``;
    Quantus' default concatenates every layer's output.
    {common}        layer: the representation's submodule (``None``: the input of the last ``nn.Linear``).{stability}
    >>> import torch
    >>> from fragdefense.models import create_model
    >>> net = create_model("small_cnn", num_classes=3, width=4).eval()
    >>> x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    >>> relative_representation_stability(net, x, y, "saliency", n_samples=3, layer="backbone.features.16").shape
    torch.Size([2])
    """
    return robustness_scores(
        model, x, y, explain, ["relative_representation_stability"], radius=radius, n_samples=n_samples,
        norm=norm, clamp=clamp, generator=generator, chunk_size=chunk_size, maps=maps, perturbations=perturbations,
        eps_min=eps_min, keep_prediction=keep_prediction, layer=layer,
    )["relative_representation_stability"]  # fmt: skip


for _f in (max_sensitivity, avg_sensitivity, local_lipschitz_estimate):
    _f.__doc__ = (_f.__doc__ or "").replace("{common}", _COMMON_DOC)
for _f in (relative_input_stability, relative_output_stability, relative_representation_stability):
    _f.__doc__ = (_f.__doc__ or "").replace("{common}", _COMMON_DOC).replace("{stability}", _STABILITY_DOC)


# ----------------------------------------------------------------------------------------------- registry

_SAMPLING = ("radius", "n_samples", "norm", "clamp", "generator", "chunk_size", "perturbations")
_OPTS = {
    "max_sensitivity": (*_SAMPLING, "relative", "keep_prediction"),
    "avg_sensitivity": (*_SAMPLING, "relative", "keep_prediction"),
    "local_lipschitz_estimate": (*_SAMPLING, "keep_prediction"),
    "relative_input_stability": (*_SAMPLING, "eps_min", "keep_prediction"),
    "relative_output_stability": (*_SAMPLING, "eps_min", "keep_prediction"),
    "relative_representation_stability": (*_SAMPLING, "eps_min", "keep_prediction", "layer"),
}


def _pick(opts: dict[str, Any], keys: Sequence[str], name: str = "score") -> dict[str, Any]:
    """The entries of ``opts`` named in ``keys`` (``None`` values dropped: the function's default); any other key
    is an error naming it (nothing is silently dropped)."""
    bad = sorted(k for k in opts if k not in keys)
    if bad:
        raise ValueError(f"{name}: unknown option(s) {bad}; it takes {list(keys)}")
    return {k: opts[k] for k in keys if opts.get(k) is not None}


def _register() -> None:
    from fragdefense.metrics.registry import METRICS, register_metric

    fns = {
        "max_sensitivity": (max_sensitivity, "max-sensitivity"),
        "avg_sensitivity": (avg_sensitivity, "avg-sensitivity"),
        "local_lipschitz_estimate": (local_lipschitz_estimate, "local Lipschitz estimate"),
        "relative_input_stability": (relative_input_stability, "relative input stability"),
        "relative_output_stability": (relative_output_stability, "relative output stability"),
        "relative_representation_stability": (relative_representation_stability, "relative representation stability"),
    }
    for name, (fn, label) in fns.items():
        if name in METRICS:  # module re-imported (e.g. by importlib.reload)
            continue
        keys = _OPTS[name]
        register_metric(
            name,
            lambda model, x, y, maps, explain, opts, _fn=fn, _keys=keys: _fn(
                model, x, y, explain, maps=maps, **_pick(opts, _keys, _fn.__name__)
            ),
            kind="explanation",
            label=label,
            similarity=False,
            report=False,
        )


_register()
