"""``fragdefense-influence``: influence functions of a trained model's last layer and the attack on them
(Ghorbani et al.; `docs/background.md` §4). Writes ``results.json`` and a figure of the most influential training
images of a few test images before and after the attack, and logs them to one W&B run in ``<out_dir>/wandb``
(``wandb.mode``: auto | online | offline | disabled).

Setting (the paper's two-flower task by default when ``classes`` lists two classes): the network's frozen
features, a linear head on them (``head_mode=retrain``: fitted to its exact optimum on ``n_train`` training
images — a logistic regression for two classes — with L2 ``l2``; ``head_mode=model``: the network's own last
layer restricted to the rows of ``classes``), the exact Hessian of that layer, and the signed-gradient attack
against the top-``n_attacked`` influential training points at ``eps``, compared with random sign noise.

``influence(cfg)`` is a plain function; ``main`` is the Hydra shell.
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

from fragdefense.cli._common import common_spec, import_plugins, require_model_source
from fragdefense.cli._common import load_model as _load_model
from fragdefense.cli._common import resolve_device as _device
from fragdefense.cli._config import config_dir
from fragdefense.cli._wandb import log_artifact_file, log_figure, log_markdown_table, log_scalars, wandb_run
from fragdefense.influence import (
    INFLUENCE_ATTACKS,
    LastLayerInfluence,
    attack_influence,
    feature_extractor,
    find_head,
    fit_linear_head,
)
from fragdefense.influence.attack import RANK_BY
from fragdefense.utils.checks import (
    check_bool,
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
from fragdefense.utils.io import atomic_write_json, atomic_write_text

__all__ = ["influence", "main", "dataset_labels", "check_config", "config_spec"]

log = logging.getLogger("fragdefense.influence")
HEAD_MODES = ("retrain", "model")


def _classes(v: Any, name: str) -> list[Any]:
    if isinstance(v, (str, int)) or not hasattr(v, "__iter__") or hasattr(v, "keys"):
        raise TypeError(f"`{name}` must be null or a list of >= 2 class names or ids such as [cat, dog], got {v!r}")
    v = list(v)
    if len(v) < 2 or len({str(c) for c in v}) != len(v):
        raise ValueError(f"`{name}` must list >= 2 distinct classes (names or ids), got {v}")
    return v


def _head(v: Any, name: str) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError(f"`{name}` must be null or the name of the linear last layer such as 'backbone.fc', got {v!r}")
    return v


def _test_label(v: Any, name: str) -> str:
    if v is True or v == "true" or v == "True":
        return "true"
    if v == "pred":
        return "pred"
    raise ValueError(f"`{name}` must be true (the true labels) or pred (the head's predictions), got {v!r}")


def config_spec() -> dict[str, Any]:
    """The check of every key of ``influence.yaml`` by key (for :func:`~fragdefense.utils.checks.validate_config`)."""
    nonneg = lambda v, n: check_finite_float(v, n, 0.0)  # noqa: E731
    spec = {
        **common_spec(),
        "head": optional(_head),
        "classes": optional(_classes),
        "n_train": lambda v, n: check_int_in_range(v, n, 2),
        "n_test": check_positive_int,
        "head_mode": lambda v, n: check_choice(v, n, HEAD_MODES),
        "l2": nonneg,
        "damping": nonneg,
        "test_label": _test_label,
        "batch_size": check_positive_int,
        "attacks": lambda v, n: check_names(v, n, INFLUENCE_ATTACKS),
        "attack.eps": lambda v, n: parse_budget(v, n),
        "attack.step_size": optional(lambda v, n: parse_budget(v, n)),
        "attack.n_attacked": check_positive_int,
        "attack.k": check_positive_int,
        "attack.steps": check_positive_int,
        "attack.rank_by": lambda v, n: check_choice(v, n, RANK_BY),
        "figures": check_bool,
        "n_figure_images": lambda v, n: check_int_in_range(v, n, 0),
    }
    return spec


def check_config(cfg: Any) -> dict[str, Any]:
    """Every key of ``influence.yaml`` checked before the model and the data are loaded (types, ranges, choices,
    paths; :func:`config_spec`), each error naming its key (``n_train``, ``attack.eps``, ``attacks``, ...).
    Returns the parsed values by key.

    >>> from fragdefense.cli._config import compose_config
    >>> check_config(compose_config("influence", ["model_name=small_cnn"]))["attack.eps"] == 8 / 255
    True
    """
    out = validate_config(cfg, config_spec())
    for key in ("attack.n_attacked", "attack.k"):
        if key in out and "n_train" in out and out[key] > out["n_train"]:
            raise ValueError(f"`{key}` must be <= `n_train` ({out['n_train']}), got {out[key]}")
    require_model_source(cfg)
    return out


def dataset_labels(ds: Any) -> torch.Tensor:
    """All labels of a dataset without decoding its images when possible (``TensorImageDataset``, ``Subset``
    of one, torchvision ``ImageFolder``); otherwise by iterating."""
    from torch.utils.data import Subset

    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    if hasattr(ds, "labels") and isinstance(ds.labels, torch.Tensor):
        return ds.labels.long()
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets, dtype=torch.long)
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def _class_ids(classes: Any, names: list[str], num_classes: int) -> list[int] | None:
    if classes is None:
        return None
    ids = []
    for c in classes:
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if c not in names:
                raise ValueError(f"`classes` entry {c!r} is not a class name; classes: {names}")
            ids.append(names.index(c))
        else:
            ids.append(int(c))
    if len(ids) < 2 or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= num_classes:
        raise ValueError(f"`classes` must list >= 2 distinct classes in [0, {num_classes - 1}] (or names), got {ids}")
    return ids


def _subset(ds: Any, labels: torch.Tensor, ids: list[int] | None, n: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """``n`` positions of ``ds`` drawn with ``seed`` among the labels ``ids`` (sorted), and their local labels."""
    pos = torch.arange(len(labels))
    if ids is not None:
        pos = pos[torch.isin(labels, torch.tensor(ids))]
    g = torch.Generator().manual_seed(seed)
    pos = pos[torch.randperm(len(pos), generator=g)[: min(n, len(pos))]].sort().values
    y = labels[pos]
    if ids is not None:
        remap = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
        remap[torch.tensor(ids)] = torch.arange(len(ids))
        y = remap[y]
    return pos.tolist(), y


def _images(ds: Any, pos: list[int]) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in pos]) if pos else torch.empty(0)


def _features(fn: Any, x: torch.Tensor, device: torch.device, bs: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(xb.to(device)).double() for xb in x.split(bs)])


def influence(cfg: DictConfig) -> dict[str, Any]:
    """Run the influence experiment described by ``cfg`` (see ``fragdefense/configs/influence.yaml``); returns the
    ``results.json`` payload.

    With a ``wandb`` node (mode not ``disabled``) one W&B run (job type ``influence``, config = the resolved
    ``cfg``) in ``<out_dir>/wandb`` gets, in one step, the numeric entries of ``results.json`` (``n_test``,
    ``test_accuracy``, ``attacks/<attack>/spearman``, ...), one ``wandb.Table`` per attack of its per-image records
    (``attacks/<attack>/images``), the figure (``figures/top_influential``), then ``results.json`` and
    ``results.md`` as the artifact ``influence-results``; the run is finished also on error (exit code 1).
    """
    import_plugins(cfg)
    t0 = time.perf_counter()
    check_config(cfg)  # every argument, before the model and the data are loaded
    try:
        out_dir = Path(cfg.out_dir)
    except Exception:  # noqa: BLE001 - ${hydra:...} outside @hydra.main
        out_dir = Path("runs/influence") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    head_mode = str(cfg.head_mode)
    eps = parse_eps(cfg.attack.eps)
    # one W&B run per command, on the global-zero process only (the command is single-process today)
    options = OmegaConf.to_container(cfg.wandb, resolve=True) if cfg.get("wandb") is not None and _rank_zero() else None
    run_cfg = OmegaConf.to_container(OmegaConf.merge(cfg, {"out_dir": str(out_dir)}), resolve=True)
    with wandb_run(out_dir, "influence", run_cfg, options) as run:
        payload, figures = _influence(cfg, out_dir, t0, head_mode, eps)
        _log_wandb(run, payload, figures, out_dir)
    return payload


def _rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _log_wandb(run: Any, payload: dict[str, Any], figures: list[Path], out_dir: Path) -> None:
    """The command's numbers, per-image tables and figure as one W&B step, then ``results.json`` as an artifact."""
    if run is None:
        return
    log_scalars(run, payload, commit=False)
    for name, r in payload["attacks"].items():
        log_markdown_table(run, f"attacks/{name}/images", r["images"], commit=False)
    for f in figures:
        log_figure(run, f"figures/{f.stem}", f, commit=False)
    run.log({})  # close the step
    log_artifact_file(run, "influence-results", "results", out_dir / "results.json", out_dir / "results.md")


def _influence(
    cfg: DictConfig, out_dir: Path, t0: float, head_mode: str, eps: float
) -> tuple[dict[str, Any], list[Path]]:
    seed = int(cfg.seed)
    torch.manual_seed(seed)
    device = _device(str(cfg.device))

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    names = list(getattr(datamodule, "class_names", []) or [str(i) for i in range(datamodule.num_classes)])
    ids = _class_ids(
        OmegaConf.to_container(cfg.classes) if cfg.get("classes") is not None else None, names, datamodule.num_classes
    )
    n_cls = len(ids) if ids is not None else datamodule.num_classes
    cls_names = [names[i] for i in ids] if ids is not None else names

    train_ds = (
        datamodule._eval_view(datamodule.train_set.dataset)
        if hasattr(datamodule.train_set, "dataset")
        else (datamodule.train_set)
    )
    if hasattr(datamodule.train_set, "indices"):
        from torch.utils.data import Subset

        train_ds = Subset(train_ds, datamodule.train_set.indices)
    tr_pos, y_train = _subset(train_ds, dataset_labels(train_ds), ids, int(cfg.n_train), seed)
    te_pos, y_test = _subset(datamodule.test_set, dataset_labels(datamodule.test_set), ids, int(cfg.n_test), seed + 1)
    if len(tr_pos) < 2 or not te_pos:
        raise ValueError(f"too few images of classes {cls_names}: {len(tr_pos)} training, {len(te_pos)} test")
    x_train, x_test = _images(train_ds, tr_pos), _images(datamodule.test_set, te_pos)
    # indices into the full training folder / tensor (the train split is a subset of it)
    split_idx = getattr(datamodule.train_set, "indices", None)
    tr_ids = [int(split_idx[p]) for p in tr_pos] if split_idx is not None else list(tr_pos)

    model = _load_model(cfg, datamodule).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = find_head(model, cfg.get("head"))
    feats = feature_extractor(model, head)
    bs = int(cfg.batch_size)
    phi_train = _features(feats, x_train, device, bs)
    l2, damping = float(cfg.l2), float(cfg.damping)
    if head_mode == "retrain":
        w, b = fit_linear_head(phi_train, y_train.to(device), num_classes=n_cls, binary=n_cls == 2, l2=l2)
    else:
        rows = torch.tensor(ids if ids is not None else list(range(n_cls)), device=device)
        w = head.weight.detach()[rows].double()
        b = head.bias.detach()[rows].double() if head.bias is not None else None
    inf = LastLayerInfluence(w, b, l2=l2, damping=damping).fit(phi_train, y_train.to(device))
    train_acc = float(inf.predict(phi_train).cpu().eq(y_train).double().mean())
    phi_test = _features(feats, x_test, device, bs)
    pred_test = inf.predict(phi_test).cpu()
    test_acc = float(pred_test.eq(y_test).double().mean())
    test_label = pred_test if str(cfg.test_label) == "pred" else y_test

    a = cfg.attack
    common = {
        "eps": eps,
        "n_attacked": int(a.n_attacked),
        "k": int(a.k),
        "steps": int(a.steps),
        "rank_by": str(a.rank_by),
        "batch_size": bs,
    }
    results: dict[str, Any] = {}
    res_by_attack = {}
    from tqdm.auto import tqdm

    gen = torch.Generator(device=device).manual_seed(seed)
    for attack in tqdm(list(cfg.attacks), desc="fragdefense-influence", unit="attack", dynamic_ncols=True):
        t_a = time.perf_counter()
        res = attack_influence(
            feats, inf, x_test.to(device), test_label.to(device), attack=str(attack), generator=gen, **common
        )
        res_by_attack[str(attack)] = res
        sp = res.spearman.double().cpu()
        results[str(attack)] = {
            **res.summary(),
            "spearman_std": float(sp.std()) if len(sp) > 1 else 0.0,
            "spearman_median": float(sp.median()),
            "topk_kept_hist": torch.bincount(res.topk_kept.cpu(), minlength=int(a.k) + 1).tolist(),
            "protocol": res.protocol,
            "seconds": time.perf_counter() - t_a,
            "images": [
                {
                    **r,
                    "test_index": te_pos[r.pop("index")],
                    "topk_clean": [tr_ids[t] for t in r["topk_clean"]],
                    "topk_adv": [tr_ids[t] for t in r["topk_adv"]],
                }
                for r in res.records()
            ],
        }

    payload = {
        "checkpoint": str(cfg.checkpoint) if cfg.get("checkpoint") else None,
        "model_name": getattr(model, "name", None),
        "weights_path": str(cfg.weights_path) if cfg.get("weights_path") else None,
        "data": getattr(datamodule, "name", type(datamodule).__name__),
        "classes": cls_names,
        "head_mode": head_mode,
        "binary_logistic": inf.binary,
        "n_head_params": inf.num_params,
        "feature_dim": inf.in_dim,
        "l2": l2,
        "damping": damping,
        "n_train": len(tr_pos),
        "n_test": len(te_pos),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "test_label": str(cfg.test_label),
        "train_indices": tr_ids,
        "test_indices": te_pos,
        "eps": eps,
        "eps_255": eps * 255,
        "attacks": results,
        "device": str(device),
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_json(out_dir / "results.json", payload)
    atomic_write_text(out_dir / "results.md", results_table(payload))
    figures: list[Path] = []
    if cfg.get("figures", True) and "gradient" in res_by_attack:
        from fragdefense.influence.viz import plot_top_influential

        res = res_by_attack["gradient"]
        n_fig = min(int(cfg.n_figure_images), len(te_pos))
        g = res_by_attack.get("random_sign")
        rows = [f"test #{te_pos[i]}\n({cls_names[int(y_test[i])]})" for i in range(n_fig)]
        adv_rows = [
            f"Spearman {float(res.spearman[i]):.2f}\ntop-{int(a.k)} kept {int(res.topk_kept[i])}"
            + (f"\n(noise: {float(g.spearman[i]):.2f}, {int(g.topk_kept[i])})" if g is not None else "")
            for i in range(n_fig)
        ]
        s = results["gradient"]
        plot_top_influential(
            x_test[:n_fig],
            res.x_adv[:n_fig].cpu(),
            x_train,
            res.topk_clean[:n_fig].cpu(),
            res.topk_adv[:n_fig].cpu(),
            out_dir / "top_influential.png",
            title=(
                f"most {a.rank_by} training images before / after the influence attack (eps {eps * 255:.3g}/255)\n"
                f"mean over {len(te_pos)} test images: Spearman {s['spearman']:.2f}, top-{int(a.k)} kept "
                f"{s['topk_kept']:.2f}; green: still in the top-{int(a.k)}"
            ),
            row_labels=rows,
            adv_labels=adv_rows,
            class_names=cls_names,
            train_labels=y_train,
            train_ids=tr_ids,
        )
        figures.append(out_dir / "top_influential.png")
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(results_table(payload)))
    Console().print(f"results: {out_dir / 'results.json'}")
    return payload, figures


def results_table(payload: dict[str, Any]) -> str:
    """Markdown table of the attacks' mean metrics."""
    k = payload["config"]["attack"]["k"]
    lines = [
        f"| attack | eps (/255) | Spearman (mean ± std) | top-{k} kept (of {k}) | label kept | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in payload["attacks"].items():
        lines.append(
            f"| {name} | {payload['eps_255']:.3g} | {r['spearman']:.3f} ± {r['spearman_std']:.3f} | "
            f"{r['topk_kept']:.2f} | {r['label_kept_rate']:.2f} | {payload['n_test']} |"
        )
    lines.append("")
    lines.append(
        f"Head: {payload['head_mode']} ({payload['n_head_params']} parameters, l2 {payload['l2']:g}, damping "
        f"{payload['damping']:g}) on {payload['n_train']} training images of {payload['classes']}; train accuracy "
        f"{100 * payload['train_accuracy']:.1f}%, test accuracy {100 * payload['test_accuracy']:.1f}%."
    )
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="influence")
def _hydra_main(cfg: DictConfig) -> None:
    influence(cfg)


def main() -> None:
    """Console script ``fragdefense-influence``."""
    _hydra_main()


if __name__ == "__main__":
    main()
