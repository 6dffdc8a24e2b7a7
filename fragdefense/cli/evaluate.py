"""``fragdefense-eval``: attack a trained model's interpretations over a grid
(attribution methods x attacks x eps) and write ``results.json``, ``results.md`` and PNG figures.

``mode=grid`` (default): the grid of ``methods`` x ``attacks`` x ``eps``. ``mode=compare``
(``--config-name eval_compare``): the explanation methods of ``explainers`` (including the explanation-side
defenses ``beta_smooth``, ``uniform_grad``, ``local_smooth``) under the same attacks and eps, with the
measured cost of one explanation, a robustness-vs-cost plot and the PGD-evidence check of Lim, Lee & Kim's claim
(:func:`compare`).

``evaluate(cfg)`` is a plain function; ``main`` is the Hydra shell.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fragdefense.attacks import attack_interpretation, get_attack
from fragdefense.cli._common import import_plugins
from fragdefense.cli._common import load_model as _load_model
from fragdefense.cli._common import resolve_device as _device
from fragdefense.cli._common import select_images as _select_images
from fragdefense.cli._config import config_dir
from fragdefense.utils.checks import parse_eps
from fragdefense.utils.io import atomic_savefig, atomic_write_json, atomic_write_text

__all__ = ["evaluate", "compare", "main", "parse_eps", "METRICS", "explainer_specs"]

log = logging.getLogger("fragdefense.eval")
METRICS = ("topk_intersection", "spearman", "kendall", "center_shift", "lens_recall")


def _attack_cell(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    img_idx: list[int],
    batch_size: int,
    n_figure_images: int,
    progress: Any,
    **attack_kw: Any,
) -> tuple[dict[str, Any], dict[str, float | None], list[dict[str, Any]], dict[str, torch.Tensor] | None]:
    """One cell of the grid (method x attack x eps): attack every batch with ``attack_kw``; returns the counts
    (``n_images``, ``n_skipped``, ``label_kept_rate``), the metric means over attacked images, the per-image rows
    (with dataset indices) and the first batch's figure examples."""
    sums: dict[str, float] = {}
    n_att = n_skip = n_kept = 0
    rows: list[dict[str, Any]] = []
    example = None
    for bi, (xb, yb) in enumerate(batches):
        res = attack_interpretation(model, xb.to(device), yb.to(device), **attack_kw)
        n_att += res.n_attacked
        n_skip += res.n_skipped
        n_kept += int(res.label_kept.sum())
        for name in res.metrics:
            sums[name] = sums.get(name, 0.0) + float(res.metrics[name].double().sum())
        for r in res.records():
            r["image"] = img_idx[bi * batch_size + r.pop("index")]
            rows.append(r)
        if bi == 0 and res.n_attacked:
            n_fig = min(n_figure_images, res.n_attacked)
            sel = res.index[:n_fig]
            example = {
                "x": xb[sel.cpu()].cpu(),
                "x_adv": res.x_adv[sel].cpu(),
                "clean_map": res.clean_map[:n_fig].cpu(),
                "adv_map": res.adv_map[:n_fig].cpu(),
            }
        progress.update(1)
    counts = {"n_images": n_att, "n_skipped": n_skip, "label_kept_rate": (n_kept / n_att) if n_att else None}
    means = {k: (v / n_att if n_att else None) for k, v in sums.items()}
    return counts, means, rows, example


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the grid described by ``cfg`` (see ``fragdefense/configs/eval.yaml``); returns the ``results.json`` payload.
    ``cfg.mode == "compare"`` runs :func:`compare` instead (``fragdefense/configs/eval_compare.yaml``)."""
    import_plugins(cfg)
    mode = str(cfg.get("mode", "grid"))
    if mode == "compare":
        return compare(cfg)
    if mode != "grid":
        raise ValueError(f"`mode` must be 'grid' or 'compare', got {mode!r}")
    t0 = time.perf_counter()
    try:
        out_dir = Path(cfg.out_dir)
    except Exception:  # noqa: BLE001 - ${hydra:...} outside @hydra.main
        out_dir = Path("runs/eval") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(cfg.seed))
    device = _device(str(cfg.device))

    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    model = _load_model(cfg, datamodule).to(device).eval()
    x_all, y_all, img_idx = _select_images(datamodule.test_set, int(cfg.n_images), int(cfg.seed))
    with torch.no_grad():
        clean_acc = float(
            torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x_all.split(int(cfg.batch_size))])
            .eq(y_all)
            .float()
            .mean()
        )

    proto = OmegaConf.to_container(cfg.protocol, resolve=True)
    proto["step_size"] = parse_eps(proto["step_size"])
    eps_list = [parse_eps(e) for e in cfg.eps]
    methods = OmegaConf.to_container(cfg.methods, resolve=True)
    attacks = list(cfg.attacks)
    grid = [(m, a, e) for m in methods for a in attacks for e in eps_list]
    batches = list(zip(x_all.split(int(cfg.batch_size)), y_all.split(int(cfg.batch_size))))

    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    examples: dict[tuple[str, str, float], dict[str, torch.Tensor]] = {}
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    # tqdm (not rich): its progress also shows when the output is piped to a log file
    with tqdm(total=len(grid) * len(batches), desc="fragdefense-eval", unit="batch", dynamic_ncols=True) as progress:
        for method, attack, eps in grid:
            progress.set_description(f"{method} / {attack} / eps={eps * 255:.3g}/255")
            t_cell = time.perf_counter()
            counts, means, rows, example = _attack_cell(
                model,
                batches,
                device,
                img_idx,
                int(cfg.batch_size),
                int(cfg.n_figure_images),
                progress,
                attack=attack,
                method=method,
                method_opts=methods[method] or {},
                eps=eps,
                generator=gen,
                **proto,
            )
            if example is not None:
                examples[(method, attack, eps)] = example
            rec: dict[str, Any] = {
                "method": method,
                "method_opts": methods[method] or {},
                "attack": attack,
                "epsilon": eps,
                "epsilon_255": eps * 255,
                **counts,
                "protocol": {**proto, "eps": eps},
                "seconds": time.perf_counter() - t_cell,
            }
            rec.update(means)
            records.append(rec)
            per_image.append({"method": method, "attack": attack, "epsilon": eps, "images": rows})

    payload = {
        "checkpoint": str(cfg.checkpoint) if cfg.get("checkpoint") else None,
        "model_name": getattr(model, "name", None),
        "data": getattr(datamodule, "name", type(datamodule).__name__),
        "n_images_requested": int(cfg.n_images),
        "clean_accuracy": clean_acc,
        "image_indices": img_idx,
        "device": str(device),
        "seed": int(cfg.seed),
        "records": records,
        "per_image": per_image,
        "seconds": time.perf_counter() - t0,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_json(out_dir / "results.json", payload)
    atomic_write_text(out_dir / "results.md", results_table(records, clean_acc))
    if cfg.get("figures", True):
        from fragdefense.viz import plot_examples, plot_metrics_vs_eps

        plot_metrics_vs_eps(records, out_dir / "metrics_vs_eps.png")
        for (m, a, e), ex in examples.items():
            if e == max(eps_list) and (get_attack(a).needs_gradient or len(attacks) == 1):
                plot_examples(ex, out_dir / f"examples_{m}_{a}.png", title=f"{m} / {a} / eps={e * 255:.3g}/255")
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(results_table(records, clean_acc)))
    Console().print(f"results: {out_dir / 'results.json'}")
    return payload


def results_table(records: list[dict[str, Any]], clean_acc: float | None = None) -> str:
    """Markdown table of the grid's mean metrics."""
    head = (
        "| method | attack | eps (/255) | top-k ∩ | Spearman | Kendall | center shift (px) | LENS recall "
        "| label kept | n |"
    )
    lines = [head, "|" + "---|" * 10]

    def f(v: Any, nd: int = 3) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    for r in records:
        lines.append(
            f"| {r['method']} | {r['attack']} | {r['epsilon_255']:.3g} | {f(r.get('topk_intersection'))} | "
            f"{f(r.get('spearman'))} | {f(r.get('kendall'))} | {f(r.get('center_shift'), 2)} | "
            f"{f(r.get('lens_recall'))} | {f(r.get('label_kept_rate'), 2)} | {r['n_images']} |"
        )
    if clean_acc is not None:
        lines.append("")
        lines.append(f"Clean accuracy on the selected images: {100 * clean_acc:.1f}%.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ compare mode
_SPEC_KEYS = {"method", "opts", "surrogate", "surrogate_opts"}


def explainer_specs(explainers: Any) -> dict[str, dict[str, Any]]:
    """Validate ``cfg.explainers`` (``label: {method, opts, surrogate, surrogate_opts}``) into plain dicts.

    ``method`` defaults to the label; ``surrogate`` (optional) is the attribution method whose map gives the
    attack's ascent direction instead of ``method``'s own differentiable path.

    >>> explainer_specs({"sal": {"method": "saliency"}, "local_smooth": {"surrogate": "saliency"}})["sal"]["method"]
    'saliency'
    """
    from fragdefense.attributions import get_attribution, supports_create_graph

    if isinstance(explainers, DictConfig):
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


def _attack_path(spec: dict[str, Any], beta: Any) -> str:
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


def _time_explainer(
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


def _pgd_evidence(
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


def _seed_check(
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


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Comparison mode: every explainer of ``cfg.explainers`` under the same attacks and eps on one model.

    Writes ``results.json`` (records with the measured ``seconds_per_image`` of one explanation and the
    attack path used for every explainer; the PGD-evidence check under ``pgd_check``), ``results.md``,
    ``robustness_vs_cost.png`` and example figures. Returns the payload.
    """
    t0 = time.perf_counter()
    try:
        out_dir = Path(cfg.out_dir)
    except Exception:  # noqa: BLE001 - ${hydra:...} outside @hydra.main
        out_dir = Path("runs/eval_compare") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = out_dir.absolute()
    specs = explainer_specs(cfg.get("explainers"))
    proto = OmegaConf.to_container(cfg.protocol, resolve=True)
    proto["step_size"] = parse_eps(proto["step_size"])
    eps_list = [parse_eps(e) for e in cfg.eps]
    attacks = list(cfg.attacks)
    gradient_attacks = [a for a in attacks if get_attack(a).needs_gradient]
    for label, spec in specs.items():
        if gradient_attacks and not spec["differentiable"]:
            raise ValueError(
                f"explainer {label!r}: attacks {gradient_attacks} need a differentiable path, but "
                f"{spec['surrogate'] or spec['method']!r} does not support create_graph; set `surrogate`"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(cfg.seed))
    device = _device(str(cfg.device))
    bs = int(cfg.batch_size)

    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    model = _load_model(cfg, datamodule).to(device).eval()
    x_all, y_all, img_idx = _select_images(datamodule.test_set, int(cfg.n_images), int(cfg.seed))
    with torch.no_grad():
        pred = torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x_all.split(bs)])
    clean_acc = float(pred.eq(y_all).float().mean())
    ok = pred.eq(y_all)
    batches = list(zip(x_all.split(bs), y_all.split(bs)))

    from tqdm.auto import tqdm

    timing: dict[str, float] = {}
    cpu_timing: dict[str, float] = {}
    if bool(cfg.get("timing", True)) and ok.any():
        for label, spec in tqdm(specs.items(), desc="timing explanations", leave=False):
            timing[label], cpu_timing[label] = _time_explainer(
                model, spec, x_all[ok].to(device), y_all[ok].to(device), bs
            )
    records: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    examples: dict[tuple[str, str, float], dict[str, torch.Tensor]] = {}
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    grid = [(lab, a, e) for lab in specs for a in attacks for e in eps_list]
    with tqdm(total=len(grid) * len(batches), desc="fragdefense-eval compare", unit="batch", dynamic_ncols=True) as bar:
        for label, attack, eps in grid:
            spec = specs[label]
            bar.set_description(f"{label} / {attack} / eps={eps * 255:.3g}/255")
            t_cell = time.perf_counter()
            counts, means, rows, example = _attack_cell(
                model,
                batches,
                device,
                img_idx,
                bs,
                int(cfg.n_figure_images),
                bar,
                attack=attack,
                method=spec["method"],
                method_opts=spec["opts"],
                surrogate=spec["surrogate"],
                surrogate_opts=spec["surrogate_opts"],
                eps=eps,
                generator=gen,
                **proto,
            )
            if example is not None:
                examples[(label, attack, eps)] = example
            rec: dict[str, Any] = {
                "method": label,
                "attribution": spec["method"],
                "method_opts": spec["opts"],
                "attack_path": "no gradient (random)"
                if not get_attack(attack).needs_gradient
                else _attack_path(spec, proto.get("beta")),
                "surrogate": spec["surrogate"],
                "surrogate_opts": spec["surrogate_opts"],
                "attack": attack,
                "epsilon": eps,
                "epsilon_255": eps * 255,
                **counts,
                "seconds_per_image": timing.get(label),
                "cpu_seconds_per_image": cpu_timing.get(label),
                "protocol": {
                    **proto,
                    "eps": eps,
                    **(
                        {"surrogate": spec["surrogate"], "surrogate_opts": spec["surrogate_opts"]}
                        if spec["surrogate"] is not None
                        else {}
                    ),
                },
                "seconds": time.perf_counter() - t_cell,
            }
            rec.update(means)
            records.append(rec)
            per_image.append({"method": label, "attack": attack, "epsilon": eps, "images": rows})

    seed_chk = None
    if bool(cfg.get("seed_check", True)) and ok.any():
        seed_chk = _seed_check(model, specs, x_all[ok].to(device), y_all[ok].to(device), proto, bs)
    pcfg = OmegaConf.to_container(cfg.pgd_check, resolve=True) if cfg.get("pgd_check") is not None else {}
    pgd = None
    if pcfg and bool(pcfg.get("enabled", True)):
        t_pgd = time.perf_counter()
        pgd = _pgd_evidence(model, specs, x_all, y_all, pcfg, proto, bs, device, gen)
        pgd["seconds"] = time.perf_counter() - t_pgd

    payload = {
        "mode": "compare",
        "checkpoint": str(cfg.checkpoint) if cfg.get("checkpoint") else None,
        "model_name": getattr(model, "name", None),
        "data": getattr(datamodule, "name", type(datamodule).__name__),
        "n_images_requested": int(cfg.n_images),
        "clean_accuracy": clean_acc,
        "image_indices": img_idx,
        "device": str(device),
        "seed": int(cfg.seed),
        "explainers": {
            lab: {**s, "seconds_per_image": timing.get(lab), "cpu_seconds_per_image": cpu_timing.get(lab)}
            for lab, s in specs.items()
        },
        "records": records,
        "pgd_check": pgd,
        "seed_check": seed_chk,
        "per_image": per_image,
        "seconds": time.perf_counter() - t0,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    md = (
        compare_table(records, clean_acc)
        + "\n"
        + cost_table(payload["explainers"], proto.get("beta"))
        + ("\n" + seed_table(seed_chk) if seed_chk else "")
        + ("\n" + pgd_table(pgd) if pgd else "")
    )
    atomic_write_json(out_dir / "results.json", payload)
    atomic_write_text(out_dir / "results.md", md)
    if cfg.get("figures", True):
        from fragdefense.viz import plot_examples

        plot_robustness_vs_cost(records, out_dir / "robustness_vs_cost.png")
        for (lab, a, e), ex in examples.items():
            if e == max(eps_list) and (get_attack(a).needs_gradient or len(attacks) == 1):
                plot_examples(ex, out_dir / f"examples_{lab}_{a}.png", title=f"{lab} / {a} / eps={e * 255:.3g}/255")
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(md))
    Console().print(f"results: {out_dir / 'results.json'}")
    return payload


def _f(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def compare_table(records: list[dict[str, Any]], clean_acc: float | None = None) -> str:
    """Markdown table of the comparison (one row per explainer x attack x eps), with cost and attack path."""
    head = (
        "| explainer | attack | eps (/255) | top-k ∩ | Spearman | Kendall | center shift (px) | LENS recall "
        "| label kept | n | s / explanation (wall) | CPU s / explanation | attack gradient |"
    )
    lines = [head, "|" + "---|" * 13]

    def g(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}"

    for r in records:
        lines.append(
            f"| {r['method']} | {r['attack']} | {r['epsilon_255']:.3g} | {_f(r.get('topk_intersection'))} | "
            f"{_f(r.get('spearman'))} | {_f(r.get('kendall'))} | {_f(r.get('center_shift'), 2)} | "
            f"{_f(r.get('lens_recall'))} | {_f(r.get('label_kept_rate'), 2)} | {r['n_images']} | "
            f"{g(r.get('seconds_per_image'))} | {g(r.get('cpu_seconds_per_image'))} | {r.get('attack_path', '-')} |"
        )
    if clean_acc is not None:
        lines += ["", f"Clean accuracy on the selected images: {100 * clean_acc:.1f}%."]
    return "\n".join(lines) + "\n"


def cost_table(explainers: dict[str, dict[str, Any]], beta: Any = None) -> str:
    """Markdown table of the explainers: method, options, attack gradient path and measured cost."""

    def g(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}"

    lines = [
        "| explainer | method | options | attack gradient | s / explanation (wall) | CPU s / explanation |",
        "|" + "---|" * 6,
    ]
    for label, e in explainers.items():
        opts = ", ".join(f"{k}={v}" for k, v in e["opts"].items()) or "-"
        lines.append(
            f"| {label} | {e['method']} | {opts} | {_attack_path(e, beta)} | {g(e.get('seconds_per_image'))} | "
            f"{g(e.get('cpu_seconds_per_image'))} |"
        )
    return "\n".join(lines) + "\n"


def seed_table(chk: dict[str, Any]) -> str:
    """Markdown table of the seed-to-seed overlap of the seeded explainers (their noise floor)."""
    if not chk["explainers"]:
        return ""
    lines = [
        f"Seed check: overlap of the clean map with `seed` vs `seed + 1` ({chk['n_images']} images, k={chk['k']}); "
        "attacked maps are compared with the same seed.",
        "",
        "| explainer | top-k ∩ | Spearman | LENS recall |",
        "|---|---|---|---|",
    ]
    for label, r in chk["explainers"].items():
        lines.append(f"| {label} | {_f(r['topk_intersection'])} | {_f(r['spearman'])} | {_f(r['lens_recall'])} |")
    return "\n".join(lines) + "\n"


def pgd_table(pgd: dict[str, Any]) -> str:
    """Markdown table of the PGD-evidence check."""
    p = pgd["protocol"]
    lines = [
        f"PGD evidence check (Lim, Lee & Kim's claim): L-inf PGD eps={p['eps'] * 255:.3g}/255, {p['steps']} steps of "
        f"{p['step_size'] * 255:.3g}/255, random start; {pgd['n_flipped']} of {pgd['n_correct']} correctly "
        f"classified images flipped. Overlap of the clean map M_y(x) with the map of the original class "
        f"M_y(x_adv) and, as a control, of the adversarial class M_y'(x_adv); top-k with k={p['k']}, "
        f"rate = fraction with top-k ∩ >= {p['threshold']}.",
        "",
        "| explainer | orig class: top-k ∩ | Spearman | LENS recall | rate | adv class: top-k ∩ | Spearman "
        "| LENS recall | rate |",
        "|" + "---|" * 9,
    ]
    for label, r in pgd["explainers"].items():
        lines.append(
            f"| {label} | {_f(r['orig_class_topk_intersection'])} | {_f(r['orig_class_spearman'])} | "
            f"{_f(r['orig_class_lens_recall'])} | {_f(r['orig_class_rate_topk_ge_threshold'], 2)} | "
            f"{_f(r['adv_class_topk_intersection'])} | {_f(r['adv_class_spearman'])} | "
            f"{_f(r['adv_class_lens_recall'])} | {_f(r['adv_class_rate_topk_ge_threshold'], 2)} |"
        )
    return "\n".join(lines) + "\n"


_COST_METRICS = (("topk_intersection", "top-k intersection"), ("spearman", "Spearman"), ("lens_recall", "LENS recall"))


def plot_robustness_vs_cost(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Robustness (top-k intersection, Spearman, LENS recall after the attack) against the measured seconds per
    explanation (log x axis; process CPU seconds where recorded, else wall-clock): one colour per explainer,
    one marker per (attack, eps)."""
    use_cpu = all(r.get("cpu_seconds_per_image") is not None for r in records)
    cost_key = "cpu_seconds_per_image" if use_cpu else "seconds_per_image"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    labels = list(dict.fromkeys(r["method"] for r in records))
    cells = list(dict.fromkeys((r["attack"], r["epsilon_255"]) for r in records))
    colours = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    markers = dict(zip(cells, "os^Dv<>phX*"))
    fig, axes = plt.subplots(1, len(_COST_METRICS), figsize=(4.6 * len(_COST_METRICS), 4.0), squeeze=False)
    for ax, (metric, title) in zip(axes[0], _COST_METRICS):
        for r in records:
            if r.get(metric) is None or r.get(cost_key) is None:
                continue
            ax.scatter(
                r[cost_key],
                r[metric],
                color=colours[r["method"]],
                marker=markers.get((r["attack"], r["epsilon_255"]), "o"),
                s=40,
                alpha=0.85,
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"{'CPU' if use_cpu else 'wall-clock'} seconds per explanation (measured)")
        ax.set_title(title + " after attack")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours[lab], marker="o", ls="", label=lab) for lab in labels]
    handles += [
        Line2D([], [], color="grey", marker=markers[c], ls="", label=f"{c[0]} eps={c[1]:.3g}/255") for c in cells
    ]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    """Console script ``fragdefense-eval``."""
    _hydra_main()


if __name__ == "__main__":
    main()
