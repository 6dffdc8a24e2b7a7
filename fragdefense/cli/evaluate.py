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

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fragdefense.attacks import get_attack, list_attacks
from fragdefense.attacks.registry import list_criteria
from fragdefense.attacks.robust_accuracy import list_label_attacks
from fragdefense.attributions import REDUCTIONS, list_attributions
from fragdefense.cli._common import check_beta, common_spec, import_plugins, require_model_source, selected_indices
from fragdefense.cli._common import load_model as _load_model
from fragdefense.cli._common import resolve_device as _device
from fragdefense.cli._common import select_images as _select_images
from fragdefense.cli._config import config_dir
from fragdefense.cli._wandb import log_artifact_file, log_figure, log_markdown_table, start_wandb_run
from fragdefense.evaluation import (
    Cell,
    CellStore,
    ExplainerSpec,
    check_writable,
    clean_accuracy,
    grid_cells,
    run_cell,
    run_grid,
)
from fragdefense.evaluation import explainer_specs as _engine_explainer_specs
from fragdefense.evaluation.certified import CERTIFY_DEFAULTS, check_certify_settings, run_certify
from fragdefense.evaluation.explainers import attack_path as _attack_path
from fragdefense.evaluation.explainers import explainer_specs
from fragdefense.evaluation.explainers import pgd_evidence as _pgd_evidence
from fragdefense.evaluation.explainers import seed_check as _seed_check
from fragdefense.evaluation.explainers import time_explainer as _time_explainer
from fragdefense.evaluation.figures import (
    plot_certified_maps,
    plot_defense_comparison,
    plot_examples,
    plot_metrics_vs_eps,
    plot_robustness_vs_cost,
)
from fragdefense.evaluation.quality import run_quality, run_robust_accuracy
from fragdefense.evaluation.report import (
    certify_table,
    compare_table,
    comparison_table,
    cost_table,
    grid_table,
    pgd_table,
    protocol_block,
    quality_table,
    robust_accuracy_table,
    seed_table,
)
from fragdefense.metrics.registry import list_metrics
from fragdefense.utils.checks import (
    check_bool,
    check_budget_list,
    check_choice,
    check_int_in_range,
    check_names,
    check_positive_int,
    optional,
    parse_eps,
    validate_config,
)
from fragdefense.utils.conventions import Budget, parse_budget
from fragdefense.utils.io import atomic_write_json, atomic_write_text

__all__ = [
    "evaluate",
    "compare",
    "main",
    "parse_eps",
    "METRICS",
    "MODES",
    "explainer_specs",
    "check_config",
    "config_spec",
    "resolve_methods",
]

log = logging.getLogger("fragdefense.eval")
METRICS = ("topk_intersection", "spearman", "kendall", "center_shift", "lens_recall")


def _out_dir(cfg: DictConfig, default: str) -> Path:
    try:
        out_dir = Path(cfg.out_dir)
    except Exception:  # noqa: BLE001 - ${hydra:...} outside @hydra.main
        out_dir = Path(default) / time.strftime("%Y-%m-%d_%H-%M-%S")
    return out_dir.absolute()


MODES = ("grid", "compare")


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def resolve_methods(cfg: Any) -> dict[str, Any]:
    """The explainers of the grid, from the config's ``methods``: a list of names (``methods=[saliency]``) or a
    mapping name -> options / ``{method, opts, surrogate, surrogate_opts}`` (``'methods={saliency:{}}'``). Either
    one given on the command line *replaces* the default set: the shipped defaults live in ``default_methods``
    and ``methods`` only points at them (``methods: ${default_methods}``), so an override of ``methods`` is not
    merged into them. ``methods`` null (or absent): ``default_methods``. Names are checked against the registry.

    >>> resolve_methods({"methods": ["saliency"], "default_methods": {"integrated_gradients": {}}})
    {'saliency': {}}
    >>> resolve_methods({"methods": None, "default_methods": {"integrated_gradients": {"steps": 8}}})
    {'integrated_gradients': {'steps': 8}}
    """
    raw = _plain(cfg.get("methods"))
    if raw is None:
        raw = _plain(cfg.get("default_methods"))
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, (list, tuple)):
        return {m: {} for m in check_names(list(raw), "methods", list_attributions())}
    if not isinstance(raw, dict):
        raise TypeError(
            f"`methods` must be a list of attribution names ([saliency, integrated_gradients]) or a mapping "
            f"name -> options ({{saliency: {{}}, integrated_gradients: {{steps: 32}}}}), got {raw!r}"
        )
    if not raw:
        raise ValueError("`methods` is empty; give at least one attribution method, e.g. methods=[saliency]")
    out: dict[str, Any] = {}
    for label, opts in raw.items():
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise TypeError(f"`methods.{label}` must be a mapping of options (or {{}}), got {opts!r}")
        if "method" not in opts:  # the plain form name -> options: the label is the registered name
            check_names([str(label)], "methods", list_attributions())
        out[str(label)] = opts
    return out


def _protocol_spec(prefix: str = "protocol") -> dict[str, Any]:
    """Checks of the attack protocol's keys (``protocol.steps``, ``protocol.k``, ...)."""
    p = f"{prefix}."
    return {
        p + "steps": check_positive_int,
        p + "step_size": optional(lambda v, n: parse_budget(v, n)),
        p + "k": check_positive_int,
        p + "beta": optional(check_beta),
        p + "restarts": check_positive_int,
        p + "random_start": check_bool,
        p + "criterion": lambda v, n: check_choice(v, n, ("auto", *list_criteria())),
        p + "check_every": check_positive_int,
        p + "lens_window": lambda v, n: check_int_in_range(v, n, 0),
        p + "reduce": lambda v, n: check_choice(v, n, REDUCTIONS),
        p + "threat": lambda v, n: check_choice(v, n, ("linf", "l2")),
    }


def config_spec() -> dict[str, Any]:
    """The check of every key of ``eval.yaml`` / ``eval_compare.yaml`` by key (for
    :func:`~fragdefense.utils.checks.validate_config`); ``methods`` and ``explainers`` are resolved separately."""
    return {
        **common_spec(),
        "mode": lambda v, n: check_choice(v, n, MODES),
        "n_images": check_positive_int,
        "batch_size": check_positive_int,
        "num_workers": lambda v, n: check_int_in_range(v, n, 0),
        "eps": check_budget_list,
        "attacks": lambda v, n: check_names(v, n, list_attacks()),
        "figures": check_bool,
        "n_figure_images": lambda v, n: check_int_in_range(v, n, 0),
        "save_images": check_bool,
        "timing": check_bool,
        "seed_check": check_bool,
        **_protocol_spec(),
        "quality.scores": lambda v, n: check_names(v, n, list_metrics(kind="explanation"), allow_empty=True),
        "quality.opts": _check_score_opts,
        "robust_accuracy.attacks": lambda v, n: check_names(v, n, list_label_attacks(), allow_empty=True),
        "robust_accuracy.eps": check_budget_list,
        "robust_accuracy.norm": lambda v, n: check_choice(v, n, ("linf", "l2")),
        "robust_accuracy.steps": optional(check_positive_int),
        "certify.enabled": check_bool,
        **{f"certify.{k}": _certify_key(k) for k in CERTIFY_DEFAULTS},
    }


def _certify_key(key: str) -> Any:
    """``check(v, name)`` of one certification setting, its error naming ``certify.<key>``."""

    def check(v: Any, name: str) -> Any:
        try:
            return check_certify_settings({key: _plain(v)})[key]
        except (TypeError, ValueError) as e:
            raise type(e)(f"`{name}`: {e}") from None

    return check


def _check_score_opts(v: Any, name: str) -> dict[str, Any]:
    """``quality.opts``: a mapping score name -> mapping of that score's options."""
    v = _plain(v)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(o, dict) for o in v.values()):
        raise TypeError(
            f"`{name}` must map a score name to its options, e.g. {{deletion_auc: {{steps: 32}}}}; got {v!r}"
        )
    known = list_metrics(kind="explanation")
    for k in v:
        if k not in known:
            raise ValueError(f"`{name}` names {k!r}, which is not an explanation score; registered: {', '.join(known)}")
    return v


def check_config(cfg: Any) -> dict[str, Any]:
    """Every key of ``eval.yaml`` / ``eval_compare.yaml`` checked before the model and the data are loaded (types,
    ranges, registry names, files), each error naming its key; returns the parsed ``mode``, ``eps`` (budgets),
    ``attacks``, ``protocol`` and, in grid mode, ``specs`` (the explainers, :func:`resolve_methods`).

    >>> from fragdefense.cli._config import compose_config
    >>> check_config(compose_config("eval", ["model_name=small_cnn", "methods=[saliency]"]))["specs"].keys()
    dict_keys(['saliency'])
    """
    v = validate_config(cfg, config_spec())
    out: dict[str, Any] = {"mode": v.get("mode", "grid"), "attacks": list(v["attacks"])}
    out["eps"] = [Budget(e, "eps") for e in cfg.eps]
    proto = _plain(cfg.get("protocol")) or {}
    if not isinstance(proto, dict):
        raise TypeError(f"`protocol` must be a mapping of attack options, got {proto!r}")
    proto["step_size"] = None if proto.get("step_size") is None else parse_budget(proto["step_size"], "step_size")
    out["protocol"] = proto
    if out["mode"] == "grid":
        out["specs"] = _engine_explainer_specs(resolve_methods(cfg), check_gradient_attacks=out["attacks"])
    else:
        specs = explainer_specs(cfg.get("explainers"))
        gradient_attacks = [a for a in out["attacks"] if get_attack(a).needs_gradient]
        for label, spec in specs.items():
            if gradient_attacks and not spec["differentiable"]:
                raise ValueError(
                    f"explainer {label!r}: attacks {gradient_attacks} need a differentiable path, but "
                    f"{spec['surrogate'] or spec['method']!r} does not support create_graph; set `surrogate`"
                )
        out["explainers"] = specs
    if cfg.get("checkpoints") and cfg.get("checkpoint"):
        raise ValueError("give `checkpoint=` (one model) or `checkpoints=[...]` (a defense comparison), not both")
    require_model_source(cfg, "checkpoints")
    return out


def _fabric(cfg: DictConfig) -> Any:
    """Lightning Fabric for ``trainer=ddp`` / ``ddp_cpu`` (``trainer.devices``, ``trainer.num_nodes``; SLURM is
    detected by Lightning); ``None`` for one process."""
    t = cfg.get("trainer")
    if t is None:
        return None
    devices, nodes = t.get("devices", 1), int(t.get("num_nodes", 1) or 1)
    if devices in (1, "1") and nodes == 1:
        return None
    from lightning.fabric import Fabric

    return Fabric(
        accelerator=str(t.get("accelerator", "auto")),
        devices=devices,
        num_nodes=nodes,
        strategy=str(t.get("strategy", "ddp")),
    )


class _Indexed(torch.utils.data.Dataset):
    """``(x, y, index)`` of the selected dataset items (so every record carries its dataset index)."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        x, y = self.dataset[self.indices[i]][:2]
        return x, int(y), self.indices[i]


def _check_classes(model: torch.nn.Module, datamodule: Any, x: torch.Tensor, device: torch.device) -> int:
    with torch.no_grad():
        k = int(model(x[:1].to(device)).shape[1])
    nd = getattr(datamodule, "num_classes", None)
    if nd is not None and int(nd) != k:
        raise ValueError(
            f"the model has {k} output classes but the data has {nd} (data={type(datamodule).__name__}); "
            "evaluate a checkpoint on data with the same classes"
        )
    return k


def _image_writer(store: CellStore) -> Any:
    """``on_batch`` hook writing each batch's attacked images and maps (uint8 / float16) beside the cell, for the
    W&B table; written before the cell's record, so a resumed cell has them. A cell computed again (its run was
    killed before the record) first drops the chunks the killed run left."""
    import shutil

    import numpy as np

    written: dict[str, int] = {}

    def write(cell: Cell, res: Any, x: torch.Tensor, ids: list[int]) -> None:
        d = store.out_dir / "cells" / cell.key / f"images-{store.rank}-of-{store.world_size}"
        if cell.key not in written:
            shutil.rmtree(d, ignore_errors=True)
            written[cell.key] = 0
        if not res.n_attacked:
            return
        d.mkdir(parents=True, exist_ok=True)
        idx = res.index.cpu()
        arrays = {
            "ids": np.asarray([ids[i] for i in idx.tolist()]),
            "x": (x[idx].cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy(),
            "x_adv": (res.x_adv[res.index].detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy(),
            "clean_map": res.clean_map.detach().cpu().half().numpy(),
            "adv_map": res.adv_map.detach().cpu().half().numpy(),
        }
        n = written[cell.key]
        written[cell.key] = n + 1
        tmp = d / f".batch-{n:05d}.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        tmp.replace(d / f"batch-{n:05d}.npz")

    return write


def _result_config(cfg: DictConfig, checkpoint: Any, specs: dict, proto: dict, eps_list: list) -> dict[str, Any]:
    """What defines the results of a grid (refused on rerun if it changed): not the device, the number of
    processes, figures or W&B options."""
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else None
    return {
        "checkpoint": str(checkpoint) if checkpoint else None,
        "model_name": cfg.get("model_name"),
        "weights_path": cfg.get("weights_path"),
        "model_kwargs": OmegaConf.to_container(cfg.model_kwargs, resolve=True) if cfg.get("model_kwargs") else {},
        "data": data,
        "n_images": int(cfg.n_images),
        "seed": int(cfg.seed),
        "explainers": {k: v.as_dict() for k, v in specs.items()},
        "attacks": list(cfg.attacks),
        "eps": [str(e) for e in eps_list],
        "protocol": proto,
        **_extras_config(cfg),
    }


def _extras_config(cfg: Any) -> dict[str, Any]:
    """The explanation-quality and robust-accuracy settings, when enabled (absent otherwise, so enabling them
    later does not invalidate an out_dir's finished attack cells... but a changed setting does)."""
    out: dict[str, Any] = {}
    q = _plain(cfg.get("quality")) or {}
    if q.get("scores"):
        out["quality"] = {"scores": list(q["scores"]), "opts": q.get("opts") or {}}
    r = _plain(cfg.get("robust_accuracy")) or {}
    if r.get("attacks"):
        out["robust_accuracy"] = {
            "attacks": list(r["attacks"]),
            "eps": [str(e) for e in r.get("eps") or []],
            "norm": r.get("norm", "linf"),
            "steps": r.get("steps"),
        }
    c = _plain(cfg.get("certify")) or {}
    if c.get("enabled"):
        out["certify"] = check_certify_settings({k: v for k, v in c.items() if k != "enabled"})
    return out


def _run_extras(
    cfg: DictConfig, model: Any, loader: Any, specs: dict, store: CellStore, device: Any, rank: int
) -> tuple[list[Any], list[Any], list[Any], dict[str, Any]]:
    """The explanation-quality cells (one per explainer) and robust-accuracy cells (one per label attack and
    eps) of one model, through the same store (resumable) and image shard; their cells on rank 0."""
    extras = _extras_config(cfg)
    quality_cells: list[Any] = []
    robust_cells: list[Any] = []
    if "quality" in extras:
        q = extras["quality"]
        for res in run_quality(
            model,
            loader,
            explainers=specs,
            scores=q["scores"],
            score_opts=q["opts"],
            seed=int(cfg.seed),
            device=device,
            store=store,
        ):
            quality_cells.append(res.cell)
            if rank == 0:
                log.info("explanation quality of %s: %s", res.cell.explainer, "resumed" if res.resumed else "done")
    if "robust_accuracy" in extras:
        r = extras["robust_accuracy"]
        for res in run_robust_accuracy(
            model,
            loader,
            attacks=r["attacks"],
            eps=r["eps"],
            norm=r["norm"],
            steps=r["steps"],
            seed=int(cfg.seed),
            device=device,
            store=store,
        ):
            robust_cells.append(res.cell)
            if rank == 0:
                log.info("robust accuracy %s @ %s: %s", res.cell.attack, res.cell.eps, res.aggregate)
    certify_cells: list[Any] = []
    certify_examples: dict[str, Any] = {}
    if "certify" in extras:
        n_ex = int(cfg.n_figure_images) if cfg.get("figures", True) and rank == 0 else 0
        for res in run_certify(
            model,
            loader,
            explainers=specs,
            settings=extras["certify"],
            seed=int(cfg.seed),
            device=device,
            store=store,
            n_examples=n_ex,
        ):
            certify_cells.append(res.cell)
            if res.examples is not None:
                certify_examples[res.cell.explainer] = res.examples
            if rank == 0:
                log.info("certified %s: %s", res.cell.explainer, "resumed" if res.resumed else "done")
    return quality_cells, robust_cells, certify_cells, certify_examples


def _extras_records(
    store: CellStore, quality_cells: list[Any], robust_cells: list[Any], certify_cells: list[Any] = ()
) -> dict[str, Any]:
    """Merged (all shards) records of the quality and robust-accuracy cells, for results.json."""
    quality = [{"method": c.explainer, **store.merge(c).aggregate} for c in quality_cells]
    robust = []
    for c in robust_cells:
        agg = store.merge(c).aggregate
        robust.append(
            {"attack": c.attack, "eps": str(c.eps), "epsilon": float(c.eps), "epsilon_255": float(c.eps) * 255, **agg}
        )
    out: dict[str, Any] = {}
    if quality_cells:
        out["quality"] = quality
        out["quality_per_image"] = [{"method": c.explainer, "images": store.merge(c).rows} for c in quality_cells]
    if robust_cells:
        out["robust_accuracy"] = robust
    if certify_cells:
        out["certify"] = [{"method": c.explainer, **store.merge(c).aggregate} for c in certify_cells]
        out["certify_per_image"] = [{"method": c.explainer, "images": store.merge(c).rows} for c in certify_cells]
    return out


def _grid_one(
    cfg: DictConfig,
    out_dir: Path,
    checkpoint: Any,
    fabric: Any,
    specs: dict,
    proto: dict,
    eps_list: list,
    wandb_run: Any,
    name: str | None = None,
) -> dict[str, Any] | None:
    """Evaluate one model over the grid into ``out_dir`` (resumable, sharded); the payload on rank 0, else None."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    device = fabric.device if fabric is not None else _device(str(cfg.device))
    bs = int(cfg.batch_size)
    attacks = list(cfg.attacks)
    mcfg = OmegaConf.merge(cfg, {"checkpoint": str(checkpoint) if checkpoint else None})
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    test_set = datamodule.test_set
    model = _load_model(mcfg, datamodule).to(device).eval()
    idx = selected_indices(len(test_set), int(cfg.n_images), int(cfg.seed))
    _check_classes(model, datamodule, test_set[idx[0]][0][None], device)  # before any work
    store = CellStore(out_dir, _result_config(mcfg, checkpoint, specs, proto, eps_list), rank, world)
    shard = idx[rank::world]
    loader = torch.utils.data.DataLoader(
        _Indexed(test_set, shard), batch_size=bs, shuffle=False, num_workers=int(cfg.get("num_workers", 0) or 0)
    )

    clean_path = out_dir / "cells" / "_clean" / f"shard-{rank}-of-{world}.json"
    if clean_path.is_file():
        clean = json.loads(clean_path.read_text())
    else:
        clean = clean_accuracy(model, loader, device)
        atomic_write_json(clean_path, clean)

    cells = grid_cells(specs, attacks, eps_list)
    examples: dict[str, dict[str, torch.Tensor]] = {}
    save_images = wandb_run is not None or world > 1 or bool(cfg.get("save_images", False))
    with tqdm(
        total=len(cells) * len(shard),
        desc=f"fragdefense-eval{' ' + name if name else ''}",
        unit="img",
        dynamic_ncols=True,
        disable=rank != 0,
    ) as bar:
        for res in run_grid(
            model,
            loader,
            explainers=specs,
            attacks=attacks,
            eps=eps_list,
            protocol=proto,
            seed=int(cfg.seed),
            device=device,
            store=store,
            n_examples=int(cfg.n_figure_images),
            progress=lambda c, n: bar.update(n),
            on_batch=_image_writer(store) if save_images else None,
        ):
            c = res.cell
            if res.resumed:
                bar.update(len(shard))
            if rank == 0:
                agg = res.aggregate
                what = "resumed (finished before)" if res.resumed else f"{res.seconds:.1f} s"
                if not agg["n_images"]:
                    msg = f"no image attacked ({agg['n_skipped']} misclassified or skipped): metrics undefined"
                else:
                    rate = agg.get("perturbed_rate")
                    n_pert = round(rate * agg["n_images"]) if rate is not None else 0
                    msg = f"{n_pert} perturbed / {agg['n_images']} attacked"
                    if agg.get("zero_gradient_rate"):
                        msg += f", ZERO ascent gradient on {100 * agg['zero_gradient_rate']:.0f} % (not robustness)"
                bar.write(f"[{c.explainer} / {c.attack} / eps={c.eps}] {msg}; {what}")
            if res.examples is not None:
                examples[c.key] = res.examples
    quality_cells, robust_cells, certify_cells, certify_examples = _run_extras(
        cfg, model, loader, specs, store, device, rank
    )
    if fabric is not None:
        fabric.barrier()
    if rank != 0:
        return None

    parts = [
        json.loads((out_dir / "cells" / "_clean" / f"shard-{r}-of-{world}.json").read_text()) for r in range(world)
    ]
    n_clean, n_correct = sum(p["n"] for p in parts), sum(p["correct"] for p in parts)
    clean_acc = (n_correct / n_clean) if n_clean else None
    records: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    for c in cells:
        res = store.merge(c)
        e = float(c.eps)
        rec = {
            "method": c.explainer,
            "method_opts": specs[c.explainer].opts,
            "attack": c.attack,
            "epsilon": e,
            "epsilon_255": e * 255,
            **res.aggregate,
            "protocol": {**proto, "eps": e},
            "seconds": res.seconds,
        }
        if res.warnings:
            rec["warnings"] = res.warnings
        records.append(rec)
        per_image.append({"method": c.explainer, "attack": c.attack, "epsilon": e, "images": res.rows})
    payload = {
        "checkpoint": str(checkpoint) if checkpoint else None,
        "model_name": getattr(model, "name", None),
        "data": getattr(datamodule, "name", type(datamodule).__name__),
        "n_images_requested": int(cfg.n_images),
        "clean_accuracy": clean_acc,
        "image_indices": idx,
        "device": str(device),
        "world_size": world,
        "seed": int(cfg.seed),
        "protocol": proto,
        "records": records,
        "per_image": per_image,
        **_extras_records(store, quality_cells, robust_cells, certify_cells),
        "seconds": time.perf_counter() - t0,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    md = grid_table(records, clean_acc) + "\n" + protocol_block(proto, {"seed": int(cfg.seed), "n_images": len(idx)})
    if payload.get("quality"):
        md += "\nExplanation quality of the clean maps (mean over the correctly classified images):\n\n"
        md += quality_table(payload["quality"], _extras_config(cfg)["quality"]["scores"])
    if payload.get("robust_accuracy"):
        md += "\nRobust accuracy under label attacks (over all selected images):\n\n"
        md += robust_accuracy_table(payload["robust_accuracy"])
    if payload.get("certify"):
        cs = _extras_config(cfg)["certify"]
        md += (
            f"\nCertified attributions (sigma={cs['sigma']}, n0={cs['n0']}, n={cs['n']}, tau={cs['tau']}, "
            f"alpha={cs['alpha']}, {cs['correction']}, top {cs['top_percent']} %): share of pixels certified with "
            "radius >= r, and the drop of the class probability when the certified-important pixels (or as many "
            "random ones) are deleted:\n\n"
        )
        md += certify_table(payload["certify"], cs["radii"])
    atomic_write_json(out_dir / "results.json", payload)
    atomic_write_text(out_dir / "results.md", md)
    figures: list[Path] = []
    if cfg.get("figures", True):
        figures.append(plot_metrics_vs_eps(records, out_dir / "metrics_vs_eps.png"))
        top = max(eps_list, key=float)
        for c in cells:
            ex = examples.get(c.key)
            if ex is not None and c.eps == top and (get_attack(c.attack).needs_gradient or len(attacks) == 1):
                figures.append(plot_examples(ex, out_dir / f"examples_{c.explainer}_{c.attack}.png", title=f"{c.key}"))
        radii = (_extras_config(cfg).get("certify") or {}).get("radii") or [0.0]
        two = sorted({float(radii[0]), float(radii[-1])})
        for label, ex in certify_examples.items():
            figures.append(
                plot_certified_maps(ex, two, out_dir / f"certified_{label}.png", title=f"certified {label} maps")
            )
    rows_by_cell = {c.key: {row["image"]: row for row in p["images"]} for c, p in zip(cells, per_image)}
    _log_grid_wandb(wandb_run, out_dir, store, cells, records, rows_by_cell, figures, prefix=f"{name}/" if name else "")
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(md))
    Console().print(f"results: {out_dir / 'results.json'}")
    return payload


def _log_grid_wandb(
    run: Any,
    out_dir: Path,
    store: CellStore,
    cells: list[Cell],
    records: list[dict],
    rows_by_cell: dict[str, dict[int, dict]],
    figures: list[Path],
    prefix: str,
) -> None:
    """Per-cell metrics, one ``wandb.Table`` row per attacked image (clean image, clean map, attacked image,
    attacked map as images, plus its metrics), the figures and ``results.json`` as an artifact."""
    if run is None:
        return
    import numpy as np
    import wandb

    for r in records:
        key = f"{prefix}{r['method']}/{r['attack']}/eps={r['epsilon_255']:.3g}"
        run.log({f"{key}/{k}": v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    cols = ["cell", "image", "label", "clean", "clean_map", "attacked", "attacked_map"]
    metric_cols: list[str] = []
    for rows in rows_by_cell.values():
        for row in rows.values():
            metric_cols += [k for k in row if k not in ("image", "label") and k not in metric_cols]
    table = wandb.Table(columns=cols + metric_cols)

    def cmap(m: np.ndarray) -> np.ndarray:
        m = m.astype(np.float32)
        m = m / m.max() if m.max() > 0 else m
        return (np.stack([m, m**2, m**4], -1) * 255).astype(np.uint8)

    for c in cells:
        for r in range(store.world_size):
            d = out_dir / "cells" / c.key / f"images-{r}-of-{store.world_size}"
            for f in sorted(d.glob("batch-*.npz")) if d.is_dir() else []:
                z = np.load(f)
                for j, i in enumerate(z["ids"].tolist()):
                    row = rows_by_cell[c.key].get(i, {})
                    table.add_data(
                        c.key,
                        i,
                        row.get("label"),
                        wandb.Image(z["x"][j].transpose(1, 2, 0)),
                        wandb.Image(cmap(z["clean_map"][j])),
                        wandb.Image(z["x_adv"][j].transpose(1, 2, 0)),
                        wandb.Image(cmap(z["adv_map"][j])),
                        *[row.get(k) for k in metric_cols],
                    )
    run.log({f"{prefix}attacked_images": table})
    for p in figures:
        log_figure(run, f"{prefix}figures/{p.stem}", p)
    log_artifact_file(
        run, f"{(prefix.strip('/') or 'eval').replace('/', '-')}-results", "results", out_dir / "results.json"
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the grid described by ``cfg`` (see ``fragdefense/configs/eval.yaml``); returns the ``results.json`` payload
    (on the global-zero process; ``{}`` on the others). ``cfg.mode == "compare"`` runs :func:`compare` instead
    (``fragdefense/configs/eval_compare.yaml``); ``checkpoints=[a.ckpt, b.ckpt, ...]`` evaluates every checkpoint
    under the same protocol on the same images and writes a defense comparison."""
    import_plugins(cfg)
    # every argument checked before any work (the model and the data are not loaded yet)
    checked = check_config(cfg)
    if checked["mode"] == "compare":
        return compare(cfg)
    out_dir = _out_dir(cfg, "runs/eval")
    check_writable(out_dir)
    eps_list, attacks, specs, proto = checked["eps"], checked["attacks"], checked["specs"], checked["protocol"]
    checkpoints = list(cfg.get("checkpoints") or [])
    torch.manual_seed(int(cfg.seed))

    fabric = _fabric(cfg)
    if fabric is not None:
        fabric.launch()
    rank0 = fabric is None or fabric.global_rank == 0
    run = None
    if rank0 and cfg.get("wandb") is not None:
        run = start_wandb_run(
            out_dir, "eval", OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg.wandb, resolve=True)
        )
    try:
        if not checkpoints:
            return _grid_one(cfg, out_dir, cfg.get("checkpoint"), fabric, specs, proto, eps_list, run) or {}
        names = _defense_names(checkpoints)
        results = {}
        for name, ck in zip(names, checkpoints):
            results[name] = _grid_one(cfg, out_dir / "defenses" / name, ck, fabric, specs, proto, eps_list, run, name)
        if not rank0:
            return {}
        return _write_comparison(out_dir, names, checkpoints, results, attacks, eps_list, proto, run)
    finally:
        if run is not None:
            run.finish()


def _defense_names(checkpoints: list[Any]) -> list[str]:
    """A readable unique name per checkpoint: its run directory's name (``<run>/checkpoints/x.ckpt``), else the
    file stem; duplicates get a counter."""
    out: list[str] = []
    for c in checkpoints:
        p = Path(str(c))
        base = p.parent.parent.name if p.parent.name == "checkpoints" else p.stem
        name, i = base, 1
        while name in out:
            i += 1
            name = f"{base}-{i}"
        out.append(name)
    return out


def _comparison_extras(payload: dict[str, Any], method: Any) -> dict[str, Any]:
    """A defense row's robust accuracies (``attack@eps``) and the explanation scores of its clean maps."""
    out: dict[str, Any] = {}
    if payload.get("robust_accuracy"):
        out["robust_accuracy"] = {
            f"{r['attack']}@{r['eps']}": r.get("robust_accuracy") for r in payload["robust_accuracy"]
        }
    q = next((r for r in payload.get("quality") or [] if r["method"] == method), None)
    if q is not None:
        scores = (payload.get("config") or {}).get("quality", {}).get("scores") or []
        out["quality"] = {s: q.get(s) for s in scores}
    return out


def _write_comparison(
    out_dir: Path,
    names: list[str],
    checkpoints: list[Any],
    results: dict[str, Any],
    attacks: list[str],
    eps_list: list[Budget],
    proto: dict[str, Any],
    run: Any,
) -> dict[str, Any]:
    """The defense comparison: for each checkpoint, its clean accuracy and the mean metrics under the first gradient
    attack (else the first attack) at the largest eps, over the same images and the same protocol."""
    attack = next((a for a in attacks if get_attack(a).needs_gradient), attacks[0])
    top = max(float(e) for e in eps_list)
    rows = []
    for name, ck in zip(names, checkpoints):
        p = results[name]
        sel = [r for r in p["records"] if r["attack"] == attack and abs(r["epsilon"] - top) < 1e-12]
        for r0 in sel:  # one row per explainer
            rows.append(
                {
                    "name": name,
                    "checkpoint": str(ck),
                    "clean_accuracy": p["clean_accuracy"],
                    "method": r0.get("method"),
                    "attack": attack,
                    "epsilon": top,
                    "n_attacked": r0.get("n_images", 0),
                    "robustness": {
                        k: r0.get(k)
                        for k in ("topk_intersection", "spearman", "kendall", "center_shift", "lens_recall")
                    },
                    "label_kept_rate": r0.get("label_kept_rate"),
                    "zero_gradient_rate": r0.get("zero_gradient_rate"),
                    **_comparison_extras(p, r0.get("method")),
                }
            )
    payload = {"mode": "defenses", "attack": attack, "epsilon": top, "protocol": proto, "defenses": rows}
    md = (
        f"Defense comparison: {attack} at eps={top * 255:.3g}/255, one row per defense and explainer; the same images "
        "and protocol for every checkpoint.\n\n" + comparison_table(rows) + "\n" + protocol_block(proto)
    )
    atomic_write_json(out_dir / "comparison.json", payload)
    atomic_write_text(out_dir / "comparison.md", md)
    fig = plot_defense_comparison(rows, out_dir / "comparison.png", attack=attack)
    if run is not None:
        log_markdown_table(
            run,
            "defense_comparison",
            [
                {k: v for k, v in r.items() if k not in ("robustness", "robust_accuracy", "quality")}
                | dict(r["robustness"])
                | {f"robust_acc {k}": v for k, v in (r.get("robust_accuracy") or {}).items()}
                | dict(r.get("quality") or {})
                for r in rows
            ],
        )
        log_figure(run, "figures/defense_comparison", fig)
        log_artifact_file(run, "defense-comparison", "results", out_dir / "comparison.json")
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(md))
    Console().print(f"comparison: {out_dir / 'comparison.json'}")
    return payload


# ------------------------------------------------------------------------------------------ compare mode
def compare(cfg: DictConfig) -> dict[str, Any]:
    """Comparison mode: every explainer of ``cfg.explainers`` under the same attacks and eps on one model.

    Writes ``results.json`` (records with the measured ``seconds_per_image`` of one explanation and the
    attack path used for every explainer; the PGD-evidence check under ``pgd_check``), ``results.md``,
    ``robustness_vs_cost.png`` and example figures. Returns the payload.
    """
    t0 = time.perf_counter()
    specs = check_config(cfg)["explainers"]  # every argument, before the model and the data are loaded
    try:
        out_dir = Path(cfg.out_dir)
    except Exception:  # noqa: BLE001 - ${hydra:...} outside @hydra.main
        out_dir = Path("runs/eval_compare") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = out_dir.absolute()
    proto = OmegaConf.to_container(cfg.protocol, resolve=True)
    proto["step_size"] = parse_eps(proto["step_size"])
    eps_list = [parse_eps(e) for e in cfg.eps]
    attacks = list(cfg.attacks)
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
    id_batches = [img_idx[i : i + bs] for i in range(0, len(img_idx), bs)]

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
            res = run_cell(
                model,
                [(xb, yb, ib) for (xb, yb), ib in zip(batches, id_batches)],
                Cell(label, attack, Budget(eps)),
                ExplainerSpec(label, spec["method"], spec["opts"], spec["surrogate"], spec["surrogate_opts"] or {}),
                protocol=proto,
                seed=int(cfg.seed),
                device=device,
                n_examples=int(cfg.n_figure_images),
                progress=lambda n: bar.update(1),
            )
            rows, means = res.rows, dict(res.aggregate)
            counts = {k: means.pop(k) for k in ("n_images", "n_skipped", "label_kept_rate")}
            if res.examples is not None:
                examples[(label, attack, eps)] = res.examples
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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    """Console script ``fragdefense-eval``."""
    _hydra_main()


if __name__ == "__main__":
    main()
