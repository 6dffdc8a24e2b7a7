"""``fragdefense-eval``: attack a trained model's interpretations over a grid
(attribution methods x attacks x eps) and write ``results.json``, ``results.md`` and PNG figures.

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

from fragdefense.attacks import attack_interpretation
from fragdefense.cli._config import config_dir
from fragdefense.models import create_model, load_checkpoint_model
from fragdefense.utils.checks import parse_eps
from fragdefense.utils.io import atomic_write_json, atomic_write_text

__all__ = ["evaluate", "main", "parse_eps", "METRICS"]

log = logging.getLogger("fragdefense.eval")
METRICS = ("topk_intersection", "spearman", "kendall", "center_shift", "lens_recall")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_model(cfg: DictConfig, datamodule: Any) -> torch.nn.Module:
    if cfg.get("checkpoint"):
        return load_checkpoint_model(cfg.checkpoint)
    if cfg.get("model_name"):
        return create_model(
            cfg.model_name,
            num_classes=datamodule.num_classes,
            mean=datamodule.mean,
            std=datamodule.std,
            weights_path=cfg.get("weights_path"),
            **(cfg.get("model_kwargs") or {}),
        ).eval()
    raise ValueError("give `checkpoint=<path to a fragdefense-train .ckpt>` or `model_name=<name> weights_path=<file>`")


def _select_images(dataset: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    idx = sorted(torch.randperm(len(dataset), generator=g)[: min(n, len(dataset))].tolist())
    items = [dataset[i] for i in idx]
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items]), idx


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the grid described by ``cfg`` (see ``configs/eval.yaml``); returns the ``results.json`` payload."""
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
            sums: dict[str, float] = {}
            n_att = n_skip = n_kept = 0
            rows: list[dict[str, Any]] = []
            for bi, (xb, yb) in enumerate(batches):
                res = attack_interpretation(
                    model,
                    xb.to(device),
                    yb.to(device),
                    attack=attack,
                    method=method,
                    method_opts=methods[method] or {},
                    eps=eps,
                    generator=gen,
                    **proto,
                )
                n_att += res.n_attacked
                n_skip += res.n_skipped
                n_kept += int(res.label_kept.sum())
                for name in res.metrics:
                    sums[name] = sums.get(name, 0.0) + float(res.metrics[name].double().sum())
                offset = bi * int(cfg.batch_size)
                for r in res.records():
                    r["image"] = img_idx[offset + r.pop("index")]
                    rows.append(r)
                if bi == 0 and res.n_attacked:
                    n_fig = min(int(cfg.n_figure_images), res.n_attacked)
                    sel = res.index[:n_fig]
                    examples[(method, attack, eps)] = {
                        "x": xb[sel.cpu()].cpu(),
                        "x_adv": res.x_adv[sel].cpu(),
                        "clean_map": res.clean_map[:n_fig].cpu(),
                        "adv_map": res.adv_map[:n_fig].cpu(),
                    }
                progress.update(1)
            rec: dict[str, Any] = {
                "method": method,
                "method_opts": methods[method] or {},
                "attack": attack,
                "epsilon": eps,
                "epsilon_255": eps * 255,
                "n_images": n_att,
                "n_skipped": n_skip,
                "label_kept_rate": (n_kept / n_att) if n_att else None,
                "protocol": {**proto, "eps": eps},
                "seconds": time.perf_counter() - t_cell,
            }
            rec.update({k: (v / n_att if n_att else None) for k, v in sums.items()})
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
            if e == max(eps_list) and a != "random_sign" or len(attacks) == 1:
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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    """Console script ``fragdefense-eval``."""
    _hydra_main()


if __name__ == "__main__":
    main()
