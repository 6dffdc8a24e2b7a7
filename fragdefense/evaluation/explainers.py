"""Explainer-level checks of the comparison mode, as library functions: the cost of one explanation, the noise floor
of seeded explainers, and the PGD-evidence check (does the map of the original class still point at the object on
PGD adversarial examples?). ``fragdefense-eval --config-name eval_compare`` calls them."""

from __future__ import annotations

import time
from typing import Any

import torch

from fragdefense.utils.checks import parse_eps

__all__ = ["explainer_specs", "attack_path", "time_explainer", "pgd_evidence", "seed_check"]

_SPEC_KEYS = {"method", "opts", "surrogate", "surrogate_opts"}


def explainer_specs(explainers: Any) -> dict[str, dict[str, Any]]:
    """Validate ``cfg.explainers`` (``label: {method, opts, surrogate, surrogate_opts}``) into plain dicts.

    ``method`` defaults to the label; ``surrogate`` (optional) is the attribution method whose map gives the
    attack's ascent direction instead of ``method``'s own differentiable path.

    >>> explainer_specs({"sal": {"method": "saliency"}, "local_smooth": {"surrogate": "saliency"}})["sal"]["method"]
    'saliency'
    """
    from fragdefense.attributions import get_attribution, supports_create_graph

    if type(explainers).__name__ == "DictConfig":  # a Hydra config node: to plain containers
        from omegaconf import OmegaConf

        explainers = OmegaConf.to_container(explainers, resolve=True)
    if not isinstance(explainers, dict) or not explainers:
        raise ValueError("`explainers` must be a non-empty mapping label -> {method, opts, surrogate, surrogate_opts}")
    out: dict[str, dict[str, Any]] = {}
    for label, spec in explainers.items():
        spec = dict(spec or {})
        bad = set(spec) - _SPEC_KEYS
        if bad:
            raise ValueError(
                f"explainer {label!r}: unknown key(s) {sorted(bad)}; expected {sorted(_SPEC_KEYS)} "
                "(method options go under `opts`)"
            )
        method = spec.get("method") or str(label)
        get_attribution(method)
        surrogate = spec.get("surrogate")
        if surrogate is not None:
            get_attribution(surrogate)
        grad_method = surrogate or method
        out[str(label)] = {
            "method": method,
            "opts": dict(spec.get("opts") or {}),
            "surrogate": surrogate,
            "surrogate_opts": dict(spec.get("surrogate_opts") or {}) if surrogate else None,
            "differentiable": supports_create_graph(grad_method),
        }
    return out


def attack_path(spec: dict[str, Any], beta: Any) -> str:
    """Human-readable description of how the attack obtains its gradient for this explainer."""
    if spec["surrogate"] is not None:
        opts = spec["surrogate_opts"]
        o = f"({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else ""
        if spec["surrogate"] == spec["method"]:
            return f"own path with surrogate options {spec['surrogate']}{o}, softplus(beta={beta}) copy"
        return f"surrogate gradient: {spec['surrogate']}{o} map of the softplus(beta={beta}) copy"
    if spec["method"] == "beta_smooth":
        return "own path, exact (softplus(beta_explain) copy of the attack's copy)"
    if spec["method"] == "local_smooth":
        return f"own path, unrolled through the mask optimisation, softplus(beta={beta}) copy"
    return f"own path, softplus(beta={beta}) copy"


def time_explainer(
    model: torch.nn.Module, spec: dict[str, Any], x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """Measured (wall-clock, process CPU) seconds per image of one explanation (no graph) of ``x`` for class
    ``y``. The CPU time is the steadier figure on a shared machine (it does not count waiting for a core)."""
    from fragdefense.attributions import attribute

    attribute(spec["method"], model, x[:2], y[:2], **spec["opts"])  # warm-up
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        attribute(spec["method"], model, xb, yb, **spec["opts"])
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    n = max(1, x.shape[0])
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def pgd_evidence(
    model: torch.nn.Module,
    specs: dict[str, dict[str, Any]],
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    pcfg: dict[str, Any],
    proto: dict[str, Any],
    batch_size: int,
    device: torch.device,
    gen: torch.Generator,
) -> dict[str, Any]:
    """Lim, Lee & Kim's claim: on PGD adversarial examples, does the map of the *original* class still point at the
    original evidence? Per explainer: overlap (top-k intersection, Spearman, LENS recall) between the clean
    map ``M_y(x)`` and ``M_y(x_adv)``, and as a control ``M_{y_adv}(x_adv)`` (the adversarial class's map)."""
    from fragdefense.attacks import pgd_attack
    from fragdefense.attributions import attribute, to_map
    from fragdefense.metrics import functional as MF

    eps = parse_eps(pcfg.get("eps", "8/255"))
    step = parse_eps(pcfg.get("step_size", "2/255"))
    steps = int(pcfg.get("steps", 10))
    thr = float(pcfg.get("threshold", 0.5))
    k, win, reduce = int(proto["k"]), int(proto.get("lens_window", 1)), str(proto.get("reduce", "abs_sum"))
    xs_adv, xs, ys, yadv = [], [], [], []
    n_correct = 0
    for xb, yb in zip(x_all.split(batch_size), y_all.split(batch_size)):
        xb, yb = xb.to(device), yb.to(device)
        with torch.no_grad():
            ok = model(xb).argmax(1) == yb
        n_correct += int(ok.sum())
        if not ok.any():
            continue
        xa = pgd_attack(model, xb[ok], yb[ok], eps=eps, step_size=step, steps=steps, generator=gen)
        with torch.no_grad():
            pa = model(xa).argmax(1)
        flip = pa != yb[ok]
        xs.append(xb[ok][flip]), xs_adv.append(xa[flip]), ys.append(yb[ok][flip]), yadv.append(pa[flip])
    ex, ey = x_all.new_zeros(0, *x_all.shape[1:]).to(device), y_all.new_zeros(0).to(device)
    x0, xa, y0, ya = (torch.cat(t) if t else e for t, e in zip((xs, xs_adv, ys, yadv), (ex, ex, ey, ey)))
    out: dict[str, Any] = {
        "protocol": {
            "eps": eps,
            "step_size": step,
            "steps": steps,
            "random_start": True,
            "k": k,
            "lens_window": win,
            "reduce": reduce,
            "threshold": thr,
        },
        "n_correct": n_correct,
        "n_flipped": int(x0.shape[0]),
        "success_rate": (x0.shape[0] / n_correct) if n_correct else None,
        "explainers": {},
    }
    if x0.shape[0] == 0:
        return out
    for label, spec in specs.items():

        def maps(x: torch.Tensor, t: torch.Tensor, spec: dict[str, Any] = spec) -> torch.Tensor:
            parts = [
                to_map(attribute(spec["method"], model, xb, tb, **spec["opts"]), reduce)
                for xb, tb in zip(x.split(batch_size), t.split(batch_size))
            ]
            return torch.cat(parts)

        clean, orig, advc = maps(x0, y0), maps(xa, y0), maps(xa, ya)
        row: dict[str, Any] = {"method": spec["method"]}
        for tag, m in (("orig_class", orig), ("adv_class", advc)):
            topk = MF.topk_intersection(m, clean, k)
            row[f"{tag}_topk_intersection"] = float(topk.double().mean())
            row[f"{tag}_spearman"] = float(MF.spearman(m, clean).double().mean())
            row[f"{tag}_lens_recall"] = float(MF.lens_topk(clean, m, k, win, mode="recall").double().mean())
            row[f"{tag}_rate_topk_ge_threshold"] = float((topk >= thr).double().mean())
        out["explainers"][label] = row
    return out


def seed_check(
    model: torch.nn.Module,
    specs: dict[str, dict[str, Any]],
    x: torch.Tensor,
    y: torch.Tensor,
    proto: dict[str, Any],
    batch_size: int,
) -> dict[str, Any]:
    """Noise floor of the seeded (stochastic) explainers: overlap of the clean map with ``seed`` and with
    ``seed + 1``. The attacks compare maps computed with the *same* seed (common random numbers), so an
    overlap after attack near this floor says little about evidence; one well above it does."""
    from fragdefense.attributions import attribute, to_map
    from fragdefense.metrics import functional as MF

    k, win, reduce = int(proto["k"]), int(proto.get("lens_window", 1)), str(proto.get("reduce", "abs_sum"))
    out: dict[str, Any] = {"n_images": int(x.shape[0]), "k": k, "explainers": {}}
    for label, spec in specs.items():
        key = "generator" if "generator" in spec["opts"] else "seed"  # "seed": the deprecated alias
        seed = spec["opts"].get(key)
        if seed is None:
            continue

        def maps(opts: dict[str, Any], spec: dict[str, Any] = spec) -> torch.Tensor:
            return torch.cat(
                [
                    to_map(attribute(spec["method"], model, xb, yb, **opts), reduce)
                    for xb, yb in zip(x.split(batch_size), y.split(batch_size))
                ]
            )

        a, b = maps(spec["opts"]), maps({**spec["opts"], key: int(seed) + 1})
        out["explainers"][label] = {
            "topk_intersection": float(MF.topk_intersection(a, b, k).double().mean()),
            "spearman": float(MF.spearman(a, b).double().mean()),
            "lens_recall": float(MF.lens_topk(a, b, k, win, mode="recall").double().mean()),
        }
    return out
