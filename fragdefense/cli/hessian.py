"""``fragdefense-hessian``: Hessian spectrum of a trained model and probes of the geometric explanation of
fragility (Ghorbani et al.; `docs/background.md` §6); writes ``results.json``, ``results.md`` and PNG figures.

For the main model (``checkpoint=`` or ``model_name=`` + ``weights_path=``):

* parameter Hessian of the mean cross-entropy on ``param.n_samples`` test images: top eigenvalues (Lanczos),
  trace (Hutch++), spectral density (SLQ) -> ``density.png``;
* map change along the top input-Hessian eigenvectors versus random directions of the same L2 norm, for the
  softplus(``beta``) surrogate -> ``map_change.png``;
* top input-Hessian eigenvalue versus softplus beta -> ``eigen_vs_beta.png``;
* per-image ``lambda_max`` versus the top-k intersection left by the top-k attack on the saliency map, and
  their Spearman correlation -> ``lambda_vs_fragility.png``.

Everything is also logged to one W&B run in ``<out_dir>/wandb`` (``wandb.mode``: auto | online | offline |
disabled).

With ``run_dir=`` (a ``fragdefense-train`` run: every ``checkpoints/*.ckpt``) or ``checkpoints=[...]`` (several
models, e.g. epochs or defenses) the curvature summary (and, with ``compare.fragility``, the attack) is run for
each -> ``eigen_over_checkpoints.png`` and the Spearman correlation across models.

``hessian(cfg)`` is a plain function; ``main`` is the Hydra shell.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fragdefense.cli._common import check_beta, common_spec, import_plugins, require_model_source
from fragdefense.cli._common import resolve_device as _device
from fragdefense.cli._common import select_images as _select_images
from fragdefense.cli._config import config_dir
from fragdefense.cli._wandb import log_artifact_file, log_figure, log_markdown_table, log_scalars, wandb_run
from fragdefense.hessian import (
    eigenvalues_vs_beta,
    hutchpp,
    lanczos,
    map_change_along_directions,
    param_hessian,
    slq,
)
from fragdefense.hessian.hvp import OBJECTIVES
from fragdefense.hessian.probes import DirectionProbe, spearman_1d
from fragdefense.hessian.summary import fragility_summary, hessian_snapshot
from fragdefense.models import create_model, load_checkpoint_model
from fragdefense.utils.checks import (
    check_bool,
    check_budget_list,
    check_choice,
    check_finite_float,
    check_int_in_range,
    check_names,
    check_positive_int,
    optional,
    parse_eps,
    validate_config,
)
from fragdefense.utils.conventions import parse_budget
from fragdefense.utils.io import atomic_savefig, atomic_write_json, atomic_write_text

__all__ = ["hessian", "main", "check_config", "config_spec"]

log = logging.getLogger("fragdefense.hessian")


def _positive_float(v: Any, name: str) -> float:
    return check_finite_float(v, name, 0.0, lo_open=True)


def _positive_list(v: Any, name: str) -> list[float]:
    vals = check_budget_list(v, name)
    if min(vals) <= 0:
        raise ValueError(f"`{name}` must be a non-empty list of numbers > 0, got {list(v)}")
    return vals


def _run_dir(v: Any, name: str) -> str:
    if not isinstance(v, str) or not Path(v).is_dir():
        raise FileNotFoundError(f"`{name}` {v!r} is not a directory (a fragdefense-train run with checkpoints/*.ckpt)")
    return v


def config_spec() -> dict[str, Any]:
    """The check of every key of ``hessian.yaml`` by key (for :func:`~fragdefense.utils.checks.validate_config`)."""
    budget = lambda v, n: parse_budget(v, n)  # noqa: E731
    spec = {
        **common_spec(),
        "run_dir": optional(_run_dir),
        "n_images": check_positive_int,
        "batch_size": check_positive_int,
        "beta": _positive_float,
        "figures": check_bool,
        "compare.fragility": check_bool,
    }
    for stage in ("param", "directions", "beta_sweep", "fragility"):
        spec[f"{stage}.enabled"] = check_bool
        spec[f"{stage}.tol"] = _positive_float
    spec.update(
        {
            "param.n_samples": check_positive_int,
            "param.top_k": check_positive_int,
            "param.lanczos_iters": check_positive_int,
            "param.trace_matvecs": lambda v, n: check_int_in_range(v, n, 3),
            "param.density_iters": check_positive_int,
            "param.density_runs": check_positive_int,
            "directions.radii": _positive_list,
            "directions.k_eig": check_positive_int,
            "directions.n_random": check_positive_int,
            "directions.topk": check_positive_int,
            "directions.max_iter": check_positive_int,
            "beta_sweep.betas": _positive_list,
            "beta_sweep.objectives": lambda v, n: check_names(v, n, OBJECTIVES),
            "beta_sweep.n_images": optional(check_positive_int),
            "beta_sweep.max_iter": check_positive_int,
            "fragility.objective": lambda v, n: check_choice(v, n, OBJECTIVES),
            "fragility.eps": budget,
            "fragility.steps": check_positive_int,
            "fragility.step_size": optional(budget),
            "fragility.k": check_positive_int,
            "fragility.check_every": check_positive_int,
            "fragility.attack_beta": optional(check_beta),
            "fragility.max_iter": check_positive_int,
        }
    )
    return spec


def check_config(cfg: Any) -> dict[str, Any]:
    """Every key of ``hessian.yaml`` checked before the model and the data are loaded (types, ranges, choices,
    paths; :func:`config_spec`), each error naming its key (``n_images``, ``param.n_samples``,
    ``directions.radii``, ...). Returns the parsed values by key.

    >>> from fragdefense.cli._config import compose_config
    >>> check_config(compose_config("hessian", ["model_name=small_cnn"]))["fragility.eps"] == 8 / 255
    True
    """
    out = validate_config(cfg, config_spec())
    require_model_source(cfg, "run_dir", "checkpoints")
    return out


def _checkpoint_list(cfg: DictConfig) -> list[dict[str, Any]]:
    """``[{"name", "path", "epoch", "global_step"}]`` from ``run_dir`` and ``checkpoints``, sorted by epoch
    (duplicates of the same weights, e.g. ``last.ckpt`` = ``best-epoch07.ckpt``, are kept once)."""
    paths: list[Path] = []
    if cfg.get("run_dir"):
        d = Path(cfg.run_dir)
        found = sorted((d / "checkpoints").glob("*.ckpt")) if (d / "checkpoints").is_dir() else sorted(d.glob("*.ckpt"))
        if not found:
            raise FileNotFoundError(f"`run_dir` {d} has no checkpoints/*.ckpt")
        paths += found
    paths += [Path(p) for p in (cfg.get("checkpoints") or [])]
    out, seen = [], set()
    for p in paths:
        ck = torch.load(p, map_location="cpu", weights_only=False)
        key = (ck.get("epoch"), ck.get("global_step"))
        if cfg.get("run_dir") and key in seen:
            continue
        seen.add(key)
        out.append({"name": p.stem, "path": str(p), "epoch": ck.get("epoch"), "global_step": ck.get("global_step")})
    if cfg.get("run_dir"):
        out.sort(key=lambda r: (r["epoch"] if r["epoch"] is not None else -1, r["global_step"] or 0))
    stems = [r["name"] for r in out]
    for r in out:  # several runs' ``best-epoch00.ckpt``: name them by their run directory
        if stems.count(r["name"]) > 1:
            p = Path(r["path"])
            run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
            r["name"] = f"{run.name}/{p.stem}"
    return out


def _main_model(cfg: DictConfig, datamodule: Any, ckpts: list[dict[str, Any]]) -> tuple[torch.nn.Module, str]:
    if cfg.get("checkpoint"):
        return load_checkpoint_model(cfg.checkpoint), str(cfg.checkpoint)
    if cfg.get("model_name"):
        model = create_model(
            cfg.model_name,
            num_classes=datamodule.num_classes,
            mean=datamodule.mean,
            std=datamodule.std,
            weights_path=cfg.get("weights_path"),
            **(cfg.get("model_kwargs") or {}),
        )
        return model.eval(), str(cfg.get("weights_path") or cfg.model_name)
    if ckpts:
        return load_checkpoint_model(ckpts[-1]["path"]), ckpts[-1]["path"]
    raise ValueError(
        "give `checkpoint=<.ckpt>`, `model_name=<name> weights_path=<file>`, `run_dir=<train run>` or "
        "`checkpoints=[...]`"
    )


def _param_spectrum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pc: DictConfig, seed: int) -> dict:
    t0 = time.perf_counter()
    op = param_hessian(model, F.cross_entropy, (x, y))
    eig = lanczos(
        op, int(pc.top_k), max_iter=int(pc.lanczos_iters), tol=float(pc.tol), generator=seed, return_vectors=False
    )
    tr = hutchpp(op, int(pc.trace_matvecs), generator=seed)
    sd = slq(op, int(pc.density_iters), int(pc.density_runs), generator=seed + 1)
    return {
        "n_params": op.dim,
        "n_samples": int(x.shape[0]),
        "top_eigenvalues": eig.eigenvalues[0].tolist(),
        "residuals": eig.residuals[0].tolist() if eig.residuals is not None else None,
        "lanczos_iters": eig.n_iter,
        "converged": bool(eig.converged.all()),
        "trace": float(tr.estimate[0]),
        "trace_stderr": float(tr.std_error[0]),
        "trace_matvecs": tr.n_matvecs,
        "slq_trace": float(sd.trace()[0]),
        "density": {"nodes": sd.nodes[0].tolist(), "weights": sd.weights[0].tolist()},
        "seconds": time.perf_counter() - t0,
        "_sd": sd,
    }


def _directions(
    model: torch.nn.Module, x: torch.Tensor, dc: DictConfig, beta: float, bs: int, seed: int
) -> DirectionProbe:
    parts = []
    for i, xb in enumerate(x.split(bs)):
        parts.append(
            map_change_along_directions(
                model,
                xb,
                beta=beta,
                radii=[float(r) for r in dc.radii],
                k_eig=int(dc.k_eig),
                n_random=int(dc.n_random),
                topk=int(dc.topk),
                max_iter=int(dc.max_iter),
                tol=float(dc.tol),
                generator=seed + i,
            )
        )
    p0 = parts[0]
    return DirectionProbe(
        radii=p0.radii,
        kinds=p0.kinds,
        eigenvalues=torch.cat([p.eigenvalues for p in parts]),
        grad_norm=torch.cat([p.grad_norm for p in parts]),
        metrics={k: torch.cat([p.metrics[k] for p in parts]) for k in p0.metrics},
        beta=beta,
        k=p0.k,
        extra={"lanczos_iters": max(p.extra["lanczos_iters"] for p in parts)},
    )


def _beta_sweep(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig, bs: int, seed: int) -> dict:
    n = cfg.beta_sweep.get("n_images")
    if n:
        x, y = x[: int(n)], y[: int(n)]
    out = {}
    for objective in cfg.beta_sweep.objectives:
        parts = [
            eigenvalues_vs_beta(
                model,
                xb,
                [float(b) for b in cfg.beta_sweep.betas],
                objective=objective,
                y=yb,
                max_iter=int(cfg.beta_sweep.max_iter),
                tol=float(cfg.beta_sweep.tol),
                generator=seed,
            )
            for xb, yb in zip(x.split(bs), y.split(bs))
        ]
        v = torch.cat([torch.tensor(p["eigenvalues"], dtype=torch.float64) for p in parts], 1)  # (n_beta, N)
        betas = parts[0]["betas"]
        med = v.abs().median(1).values
        lb, lm = torch.log(torch.tensor(betas, dtype=torch.float64)), torch.log(med.clamp_min(1e-300))
        slope = (
            float(((lb - lb.mean()) * (lm - lm.mean())).sum() / ((lb - lb.mean()) ** 2).sum())
            if len(betas) > 1
            else math.nan
        )
        out[objective] = {
            "betas": betas,
            "which": parts[0]["which"],
            "abs_median": med.tolist(),
            "abs_mean": v.abs().mean(1).tolist(),
            "abs_q25": v.abs().quantile(0.25, dim=1).tolist(),
            "abs_q75": v.abs().quantile(0.75, dim=1).tolist(),
            "loglog_slope": slope,
            "eigenvalues": v.tolist(),
        }
    return out


def _fragility(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig, bs: int, seed: int) -> dict:
    fc = cfg.fragility
    attack = {
        "eps": parse_eps(fc.eps),
        "steps": int(fc.steps),
        "step_size": parse_eps(fc.step_size),
        "k": int(fc.k),
        "check_every": int(fc.check_every),
        "beta": float(fc.attack_beta) if fc.get("attack_beta") else float(cfg.beta),
    }
    return fragility_summary(
        model,
        x,
        y,
        beta=float(cfg.beta),
        objective=str(fc.objective),
        attack=attack,
        max_iter=int(fc.max_iter),
        tol=float(fc.tol),
        batch_size=bs,
        seed=seed,
    )


def _checkpoint_summary(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig, bs: int, seed: int
) -> dict[str, Any]:
    pc = cfg.param
    with torch.no_grad():
        acc = float(torch.cat([model(xb).argmax(1) for xb in x.split(bs)]).eq(y).float().mean())
    out: dict[str, Any] = hessian_snapshot(
        model,
        x,
        y,
        n_param_samples=int(pc.n_samples),
        lanczos_iters=int(pc.lanczos_iters),
        trace_matvecs=int(pc.trace_matvecs),
        n_input=int(x.shape[0]),
        input_iters=int(cfg.directions.max_iter),
        beta=float(cfg.beta),
        tol=float(pc.tol),
        seed=seed,
        batch_size=bs,
        input_tol=float(cfg.directions.tol),
    )
    out["accuracy"] = acc
    if cfg.compare.fragility:
        fr = _fragility(model, x, y, cfg, bs, seed)
        out["mean_topk_intersection"] = fr["mean_topk_intersection"]
        out["spearman_abs_lambda_vs_topk"] = fr["spearman_abs_lambda_vs_topk"]
    return out


def hessian(cfg: DictConfig) -> dict[str, Any]:
    """Run the analysis described by ``cfg`` (see ``fragdefense/configs/hessian.yaml``); returns the
    ``results.json`` payload.

    With a ``wandb`` node (mode not ``disabled``) one W&B run (job type ``hessian``, config = the resolved ``cfg``)
    in ``<out_dir>/wandb`` gets, in one step, the numeric entries of ``results.json`` (``clean_accuracy``,
    ``param/trace``, ``fragility/spearman_abs_lambda_vs_topk``, ``timings/param``, ...; plus
    ``param/top_eigenvalue``), its per-item records as ``wandb.Table``s (see :func:`_tables`), every figure
    (``figures/<png stem>``), then ``results.json`` and ``results.md`` as the artifact ``hessian-results``; the
    run is finished also on error (exit code 1).
    """
    import_plugins(cfg)
    t0 = time.perf_counter()
    check_config(cfg)  # every argument, before the model and the data are loaded
    try:
        out_dir = Path(cfg.out_dir)
    except Exception:  # noqa: BLE001 - ${hydra:...} outside @hydra.main
        out_dir = Path("runs/hessian") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    # one W&B run per command, on the global-zero process only (the command is single-process today)
    options = OmegaConf.to_container(cfg.wandb, resolve=True) if cfg.get("wandb") is not None and _rank_zero() else None
    run_cfg = OmegaConf.to_container(OmegaConf.merge(cfg, {"out_dir": str(out_dir)}), resolve=True)
    with wandb_run(out_dir, "hessian", run_cfg, options) as run:
        payload = _hessian(cfg, out_dir, t0)
        _log_wandb(run, payload, out_dir)
    return payload


def _rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _tables(p: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The per-item records of a ``results.json`` payload, by W&B key: ``param/eigenvalues`` (rank, eigenvalue,
    residual), ``directions/per_radius``, ``directions/per_image`` (image index, lambda_max),
    ``beta_sweep/<objective>/per_beta`` (beta, |lambda| median / mean / quartiles), ``fragility/images`` (image
    index, lambda_max, grad_norm, top-k intersection, map Spearman), ``checkpoints/checkpoints`` and
    ``checkpoints/monitor_history``."""
    idx = p.get("image_indices") or []
    out: dict[str, list[dict[str, Any]]] = {}
    if "param" in p:
        q = p["param"]
        res = q.get("residuals") or [None] * len(q["top_eigenvalues"])
        out["param/eigenvalues"] = [
            {"rank": i + 1, "eigenvalue": v, "residual": r} for i, (v, r) in enumerate(zip(q["top_eigenvalues"], res))
        ]
    if "directions" in p:
        out["directions/per_radius"] = p["directions"]["per_radius"]
        out["directions/per_image"] = [
            {"image_index": i, "lambda_max": v} for i, v in zip(idx, p["directions"]["per_image_lambda"])
        ]
    for obj, s in p.get("beta_sweep", {}).items():
        out[f"beta_sweep/{obj}/per_beta"] = [
            {"beta": b, "abs_median": m, "abs_mean": a, "abs_q25": lo, "abs_q75": hi}
            for b, m, a, lo, hi in zip(s["betas"], s["abs_median"], s["abs_mean"], s["abs_q25"], s["abs_q75"])
        ]
    if "fragility" in p:
        q = p["fragility"]
        cols = ("lambda_max", "grad_norm", "topk_intersection", "map_spearman")
        out["fragility/images"] = [
            {"image_index": idx[pos] if pos < len(idx) else pos, **dict(zip(cols, vals))}
            for pos, *vals in zip(q["image_position"], *(q[c] for c in cols))
        ]
    if "checkpoints" in p:
        out["checkpoints/checkpoints"] = p["checkpoints"]["checkpoints"]
        if p["checkpoints"].get("monitor_history"):
            out["checkpoints/monitor_history"] = p["checkpoints"]["monitor_history"]
    return {k: v for k, v in out.items() if v}


def _log_wandb(run: Any, payload: dict[str, Any], out_dir: Path) -> None:
    """The command's numbers, tables and figures as one W&B step, then ``results.json`` as an artifact."""
    if run is None:
        return
    log_scalars(run, payload, commit=False)
    if payload.get("param", {}).get("top_eigenvalues"):
        run.log({"param/top_eigenvalue": payload["param"]["top_eigenvalues"][0]}, commit=False)
    for key, rows in _tables(payload).items():
        log_markdown_table(run, key, rows, commit=False)
    for f in payload.get("figures") or []:
        log_figure(run, f"figures/{Path(f).stem}", f, commit=False)
    run.log({})  # close the step
    log_artifact_file(run, "hessian-results", "results", out_dir / "results.json", out_dir / "results.md")


def _hessian(cfg: DictConfig, out_dir: Path, t0: float) -> dict[str, Any]:
    seed = int(cfg.seed)
    torch.manual_seed(seed)
    device = _device(str(cfg.device))
    bs = int(cfg.batch_size)

    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    ckpts = _checkpoint_list(cfg)
    model, model_source = _main_model(cfg, datamodule, ckpts)
    model = model.to(device).eval()
    x, y, img_idx = _select_images(datamodule.test_set, int(cfg.n_images), seed)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        pred = torch.cat([model(xb).argmax(1) for xb in x.split(bs)])
    acc = float(pred.eq(y).float().mean())
    beta = float(cfg.beta)
    timings: dict[str, float] = {}
    payload: dict[str, Any] = {
        "model": model_source,
        "model_name": getattr(model, "name", None),
        "data": getattr(datamodule, "name", type(datamodule).__name__),
        "n_images": int(x.shape[0]),
        "image_indices": img_idx,
        "clean_accuracy": acc,
        "beta": beta,
        "device": str(device),
        "seed": seed,
    }
    from tqdm.auto import tqdm

    stages = [s for s in ("param", "directions", "beta_sweep", "fragility") if cfg[s].enabled]
    sd = None
    with tqdm(total=len(stages), desc="fragdefense-hessian", unit="stage", dynamic_ncols=True) as bar:
        if cfg.param.enabled:
            bar.set_description("parameter Hessian")
            t = time.perf_counter()
            n = int(cfg.param.n_samples)
            ps = _param_spectrum(model, x[:n], y[:n], cfg.param, seed)
            sd = ps.pop("_sd")
            payload["param"] = ps
            timings["param"] = time.perf_counter() - t
            bar.update(1)
        if cfg.directions.enabled:
            bar.set_description("map change by direction")
            t = time.perf_counter()
            probe = _directions(model, x, cfg.directions, beta, bs, seed)
            payload["directions"] = probe.summary()
            payload["directions"]["kinds"] = probe.kinds
            payload["directions"]["per_image_lambda"] = probe.eigenvalues[:, 0].tolist()
            timings["directions"] = time.perf_counter() - t
            bar.update(1)
        if cfg.beta_sweep.enabled:
            bar.set_description("eigenvalues vs beta")
            t = time.perf_counter()
            payload["beta_sweep"] = _beta_sweep(model, x, y, cfg, bs, seed)
            timings["beta_sweep"] = time.perf_counter() - t
            bar.update(1)
        if cfg.fragility.enabled:
            bar.set_description("lambda_max vs fragility")
            t = time.perf_counter()
            payload["fragility"] = _fragility(model, x, y, cfg, bs, seed)
            timings["fragility"] = time.perf_counter() - t
            bar.update(1)

    if ckpts:
        t = time.perf_counter()
        rows = []
        hist_path = Path(cfg.run_dir) / "hessian_history.json" if cfg.get("run_dir") else None
        for ck in tqdm(ckpts, desc="checkpoints", dynamic_ncols=True):
            m = load_checkpoint_model(ck["path"]).to(device).eval()
            rows.append({**ck, **_checkpoint_summary(m, x, y, cfg, bs, seed)})
        cmp: dict[str, Any] = {"checkpoints": rows}
        if len(rows) >= 3 and cfg.compare.fragility:
            cmp["spearman_lambda_vs_topk_across_models"] = spearman_1d(
                torch.tensor([r["input_lambda_max_mean"] for r in rows]),
                torch.tensor([r["mean_topk_intersection"] for r in rows]),
            )
        if hist_path is not None and hist_path.is_file():
            import json

            cmp["monitor_history"] = json.loads(hist_path.read_text())["history"]
        payload["checkpoints"] = cmp
        timings["checkpoints"] = time.perf_counter() - t

    payload["timings"] = timings
    payload["seconds"] = time.perf_counter() - t0
    payload["config"] = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_json(out_dir / "results.json", payload)
    atomic_write_text(out_dir / "results.md", results_markdown(payload))
    figures: list[str] = []
    if cfg.get("figures", True):
        figures = _plots(payload, sd, out_dir)
    payload["figures"] = figures
    atomic_write_json(out_dir / "results.json", payload)
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(results_markdown(payload)))
    Console().print(f"results: {out_dir / 'results.json'}")
    return payload


def results_markdown(p: dict[str, Any]) -> str:
    """Markdown summary of a ``results.json`` payload."""

    def f(v: Any, nd: int = 3) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}g}"

    lines = [
        f"Model `{p['model']}`, {p['n_images']} test images (clean accuracy {100 * p['clean_accuracy']:.1f}%), "
        f"softplus beta {p['beta']:g}.",
        "",
    ]
    if "param" in p:
        q = p["param"]
        lines += [
            f"**Parameter Hessian** ({q['n_params']} parameters, {q['n_samples']} images): top eigenvalues "
            + ", ".join(f(v, 5) for v in q["top_eigenvalues"])
            + f"; trace {f(q['trace'], 5)} ± {f(q['trace_stderr'], 2)} (Hutch++, {q['trace_matvecs']} products), "
            f"SLQ trace {f(q['slq_trace'], 5)}.",
            "",
        ]
    if "directions" in p:
        d = p["directions"]
        lines += [
            f"**Map change along the top input-Hessian eigenvector vs random directions** (same L2 norm; "
            f"median |lambda_max| {f(d['abs_lambda_max_median'])}):",
            "",
            "| radius (L2) | grad change eig / random | ratio | map L1 change eig / random | ratio | "
            "top-k ∩ eig / random | logit change eig / random |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in d["per_radius"]:
            lines.append(
                f"| {r['radius']:g} | {f(r['grad_change_eigen'])} / {f(r['grad_change_random'])} | "
                f"{f(r['grad_change_ratio'])} | {f(r['map_change_eigen'])} / {f(r['map_change_random'])} | "
                f"{f(r['map_change_ratio'])} | "
                f"{f(r['topk_intersection_eigen'])} / {f(r['topk_intersection_random'])} | "
                f"{f(r['logit_change_eigen'])} / {f(r['logit_change_random'])} |"
            )
        lines.append("")
    if "beta_sweep" in p:
        lines += ["**Top input-Hessian eigenvalue vs softplus beta** (median |lambda| over images):", ""]
        for obj, s in p["beta_sweep"].items():
            lines.append(
                f"* {obj} ({s['which']}): "
                + ", ".join(f"beta {b:g}: {f(v)}" for b, v in zip(s["betas"], s["abs_median"]))
                + f"; log-log slope {f(s['loglog_slope'])}"
            )
        lines.append("")
    if "fragility" in p:
        q = p["fragility"]
        lines += [
            f"**lambda_max vs fragility** ({q['n_attacked']} attacked images, top-k attack on saliency, eps "
            f"{q['protocol']['eps'] * 255:.3g}/255, k={q['protocol']['k']}): mean top-k intersection "
            f"{f(q['mean_topk_intersection'])}; "
            f"Spearman(|lambda_max|, top-k ∩) = {f(q['spearman_abs_lambda_vs_topk'])}, "
            f"Spearman(|lambda_max|/||g||, top-k ∩) = {f(q['spearman_rel_lambda_vs_topk'])}.",
            "",
        ]
    if "checkpoints" in p:
        lines += [
            "| checkpoint | epoch | acc | param top eig | param trace | input lambda_max (mean) | top-k ∩ |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in p["checkpoints"]["checkpoints"]:
            lines.append(
                f"| {r['name']} | {r['epoch']} | {f(r['accuracy'])} | {f(r['param_top_eig'], 4)} | "
                f"{f(r['param_trace'], 4)} | {f(r['input_lambda_max_mean'], 4)} | "
                f"{f(r.get('mean_topk_intersection'))} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def _plots(p: dict[str, Any], sd: Any, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[str] = []
    if sd is not None:
        grid, dens = sd.grid(2000)
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.semilogy(grid.numpy(), dens[0].clamp_min(1e-12).numpy())
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (SLQ, Gaussian-smoothed)")
        ax.set_title(f"Parameter Hessian spectrum ({p['param']['n_params']} params)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_savefig(fig, out_dir / "density.png", dpi=120)
        plt.close(fig)
        paths.append(str(out_dir / "density.png"))
    if "directions" in p:
        rows = p["directions"]["per_radius"]
        r = [row["radius"] for row in rows]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, name, label in zip(
            axes,
            ("grad_change", "topk_intersection", "logit_change"),
            ("relative gradient change", f"top-{p['directions']['k']} intersection of maps", "|logit change|"),
        ):
            ax.plot(r, [row[f"{name}_eigen"] for row in rows], "o-", label="top Hessian eigenvector")
            ax.plot(r, [row[f"{name}_random"] for row in rows], "s--", label="random direction")
            ax.set_xscale("log")
            ax.set_xlabel("perturbation L2 norm")
            ax.set_title(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Saliency change by direction (softplus beta={p['beta']:g}, {p['n_images']} images)")
        fig.tight_layout()
        atomic_savefig(fig, out_dir / "map_change.png", dpi=120)
        plt.close(fig)
        paths.append(str(out_dir / "map_change.png"))
    if "beta_sweep" in p:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for obj, s in p["beta_sweep"].items():
            ax.plot(s["betas"], s["abs_median"], "o-", label=f"{obj} (slope {s['loglog_slope']:.2f})")
            ax.fill_between(s["betas"], s["abs_q25"], s["abs_q75"], alpha=0.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("softplus beta")
        ax.set_ylabel("|top input-Hessian eigenvalue| (median, IQR)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_savefig(fig, out_dir / "eigen_vs_beta.png", dpi=120)
        plt.close(fig)
        paths.append(str(out_dir / "eigen_vs_beta.png"))
    if "fragility" in p and p["fragility"]["lambda_max"]:
        q = p["fragility"]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.scatter([abs(v) for v in q["lambda_max"]], q["topk_intersection"], s=12, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("|lambda_max| of the input Hessian (softplus surrogate)")
        ax.set_ylabel("top-k intersection after attack")
        ax.set_title(f"Spearman {q['spearman_abs_lambda_vs_topk']:.2f} ({q['n_attacked']} images)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_savefig(fig, out_dir / "lambda_vs_fragility.png", dpi=120)
        plt.close(fig)
        paths.append(str(out_dir / "lambda_vs_fragility.png"))
    if "checkpoints" in p and len(p["checkpoints"]["checkpoints"]) > 1:
        rows = p["checkpoints"]["checkpoints"]
        use_epoch = all(r["epoch"] is not None for r in rows) and len({r["epoch"] for r in rows}) == len(rows)
        xs = [r["epoch"] for r in rows] if use_epoch else list(range(len(rows)))
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, key, label in zip(
            axes,
            ("param_top_eig", "param_trace", "input_lambda_max_mean"),
            ("parameter top eigenvalue", "parameter trace", "input lambda_max (mean)"),
        ):
            ax.plot(xs, [r[key] for r in rows], "o-")
            ax.set_title(label)
            ax.set_xlabel("epoch" if use_epoch else "checkpoint")
            if not use_epoch:
                ax.set_xticks(xs, [r["name"] for r in rows], rotation=30, fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_savefig(fig, out_dir / "eigen_over_checkpoints.png", dpi=120)
        plt.close(fig)
        paths.append(str(out_dir / "eigen_over_checkpoints.png"))
        if all(r.get("mean_topk_intersection") is not None for r in rows):  # compare.fragility
            fig, ax = plt.subplots(figsize=(5.6, 4.2))
            lam = [r["input_lambda_max_mean"] for r in rows]
            tk = [r["mean_topk_intersection"] for r in rows]
            ax.scatter(lam, tk)
            for r, a, b in zip(rows, lam, tk):
                ax.annotate(r["name"].split("/")[0], (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
            rho = p["checkpoints"].get("spearman_lambda_vs_topk_across_models")
            ax.set_xscale("log")
            ax.set_xlabel("mean input-Hessian lambda_max (softplus surrogate)")
            ax.set_ylabel("mean top-k intersection under attack")
            ax.set_title("across models" + (f": Spearman {rho:.2f}" if rho is not None else ""))
            ax.grid(alpha=0.3)
            fig.tight_layout()
            atomic_savefig(fig, out_dir / "lambda_vs_topk_across_models.png", dpi=120)
            plt.close(fig)
            paths.append(str(out_dir / "lambda_vs_topk_across_models.png"))
    hist = p.get("checkpoints", {}).get("monitor_history") or []
    if len(hist) > 1:  # written by HessianMonitor during training (every evaluated epoch)
        keys = [k for k in ("param_top_eig", "param_trace", "input_lambda_max_mean") if k in hist[0]]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.3 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.plot([h["epoch"] for h in hist], [h[key] for h in hist], "o-")
            ax.set_title(f"HessianMonitor: {key}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_savefig(fig, out_dir / "monitor_history.png", dpi=120)
        plt.close(fig)
        paths.append(str(out_dir / "monitor_history.png"))
    return paths


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="hessian")
def _hydra_main(cfg: DictConfig) -> None:
    hessian(cfg)


def main() -> None:
    """Console script ``fragdefense-hessian``."""
    _hydra_main()


if __name__ == "__main__":
    main()
