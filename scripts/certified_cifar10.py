"""Certified attributions of CIFAR-10 classifiers (Anani, Lorenz, Fritz & Schiele, "Pixel-level Certified Explanations
via Randomized Smoothing") with :func:`fragdefense.evaluation.certified.run_certify`.

For every checkpoint and every noise level ``sigma``: the first ``--n-images`` test images (in a seeded order, or
file order with ``--order file``) that *every* given checkpoint classifies correctly are certified for each method;
results are resumable (one :class:`~fragdefense.evaluation.store.CellStore` per checkpoint and sigma under
``--out``). Writes ``results.json`` (settings, per-model, per-sigma, per-method aggregates and per-image rows),
``rate_vs_radius.png`` (certified-pixel rate vs L2 radius, one curve per method and checkpoint, one panel per sigma)
and ``certified_maps_<model>_sigma<s>.png`` (image | map | certified map at two radii).

    python scripts/certified_cifar10.py --checkpoint natural=/work/runs/cifar10_small_cnn_e8/checkpoints/last.ckpt \\
        --n-images 16 --sigma 0.12,0.25 --n0 10 --n 100 --out /tmp/certified_cifar10

``--checkpoint name=random`` certifies a randomly initialised ``small_cnn`` (for trying the script out only).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from fragdefense.evaluation.certified import check_certify_settings, rate_key, run_certify
from fragdefense.evaluation.figures import plot_certified_maps
from fragdefense.evaluation.store import CellStore
from fragdefense.utils.io import atomic_savefig, atomic_write_json

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
TABLE_RADII = (0.0, 0.05, 0.1, 0.2)


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="name=path of a fragdefense-train .ckpt")
    p.add_argument("--data-root", default="/tmp/fragdefense-ci-data/cifar10-jpeg", help="CIFAR-10 ImageFolder tree")
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--order", choices=("seeded", "file"), default="seeded", help="test-image scan order")
    p.add_argument("--methods", default="saliency,smoothgrad,integrated_gradients")
    p.add_argument("--sigma", default="0.12,0.25", help="comma-separated noise levels")
    p.add_argument("--n0", type=int, default=10)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--tau", type=float, default=0.75)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--top-percent", type=float, default=20.0)
    p.add_argument("--correction", default="bonferroni")
    p.add_argument("--radii", default=",".join(f"{0.01 * i:g}" for i in range(31)), help="radii of the curves")
    p.add_argument("--ig-steps", type=int, default=8, help="integrated_gradients steps")
    p.add_argument("--sg-samples", type=int, default=8, help="smoothgrad n_samples (its own noise sigma: --sg-sigma)")
    p.add_argument("--sg-sigma", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-examples", type=int, default=3, help="example images per method in the maps figure")
    p.add_argument("--map-radii", default="0,0.1", help="radii of the certified maps in the figure")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.n_images < 1:
        p.error("--n-images must be >= 1")
    return a


def load_models(specs: list[str]) -> dict[str, tuple[str, torch.nn.Module]]:
    from fragdefense.models import create_model, load_checkpoint_model

    out: dict[str, tuple[str, torch.nn.Module]] = {}
    for spec in specs:
        if "=" not in spec:
            raise SystemExit(f"--checkpoint must be name=path, got {spec!r}")
        name, path = spec.split("=", 1)
        if path == "random":
            torch.manual_seed(0)
            out[name] = (path, create_model("small_cnn", num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD).eval())
        else:
            out[name] = (str(Path(path).resolve()), load_checkpoint_model(path).eval())
    return out


def select_images(
    models: dict[str, tuple[str, torch.nn.Module]], root: str, n: int, order: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, Any]]:
    """The first ``n`` test images (scan order: seeded permutation or file order) that every model classifies
    correctly; also the clean accuracy of each model on the scanned images."""
    from fragdefense.data.datamodules import ImageFolderDataModule

    dm = ImageFolderDataModule(
        root=root, in_memory=False, num_classes=10, image_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, val_fraction=0.0
    )
    dm.setup("test")
    ds = dm.test_set
    size = len(ds)
    scan = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist() if order == "seeded" else []
    scan = scan or list(range(size))
    xs, ys, ids = [], [], []
    scanned = 0
    correct = dict.fromkeys(models, 0)
    block = 64
    for start in range(0, size, block):
        idx = scan[start : start + block]
        items = [ds[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
        ok = torch.ones(len(idx), dtype=torch.bool)
        with torch.no_grad():
            for name, (_, m) in models.items():
                hit = m(x).argmax(1) == y
                correct[name] += int(hit.sum())
                ok &= hit
        scanned += len(idx)
        for j in ok.nonzero().flatten().tolist():
            if len(ids) < n:
                xs.append(x[j])
                ys.append(int(y[j]))
                ids.append(idx[j])
        if len(ids) >= n:
            break
    info = {
        "n_scanned": scanned,
        "scan_order": order,
        "clean_accuracy_on_scanned": {k: v / scanned for k, v in correct.items()},
        "class_names": dm.class_names,
    }
    return torch.stack(xs), torch.tensor(ys), ids, info


def plot_rate_vs_radius(results: dict[str, Any], radii: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = sorted({s for m in results.values() for s in m})
    fig, axes = plt.subplots(1, len(sigmas), figsize=(5.0 * len(sigmas), 3.9), squeeze=False)
    styles = ["-", "--", ":", "-."]
    colours = {}
    for ax, sig in zip(axes[0], sigmas):
        for mi, (model, per_sigma) in enumerate(results.items()):
            for method, cell in per_sigma.get(sig, {}).items():
                agg = cell["aggregate"]
                ys = [agg.get(rate_key(r)) for r in radii]
                if any(v is None for v in ys):
                    continue
                c = colours.setdefault(method, plt.cm.tab10(len(colours) % 10))
                ax.plot(radii, ys, styles[mi % 4], color=c, label=f"{method} / {model} (n={agg['n_images']})")
        ax.set_xlabel("L2 radius (pixel units of [0, 1] images)")
        ax.set_ylabel("certified pixel rate")
        ax.set_title(f"sigma = {sig}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sigmas = _floats(a.sigma)
    radii = sorted(set(_floats(a.radii)) | set(TABLE_RADII))
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    opts = {
        "integrated_gradients": {"steps": a.ig_steps},
        "smoothgrad": {"n_samples": a.sg_samples, "sigma": a.sg_sigma},
    }
    explainers = {m: opts.get(m, {}) for m in methods}
    base = dict(n0=a.n0, n=a.n, tau=a.tau, alpha=a.alpha, top_percent=a.top_percent, correction=a.correction)
    for s in sigmas:  # every setting checked before any work
        check_certify_settings({**base, "sigma": s, "radii": radii})
    if a.threads:
        torch.set_num_threads(a.threads)
    models = load_models(a.checkpoint)
    x, y, ids, info = select_images(models, a.data_root, a.n_images, a.order, a.seed)
    print(f"{len(ids)} images correctly classified by every model (scanned {info['n_scanned']})", flush=True)
    data = [
        (x[i : i + a.batch_size], y[i : i + a.batch_size], ids[i : i + a.batch_size])
        for i in range(0, len(ids), a.batch_size)
    ]
    results: dict[str, dict[float, dict[str, Any]]] = {}
    figures = []
    for name, (ckpt, model) in models.items():
        results[name] = {}
        for sig in sigmas:
            settings = {**base, "sigma": sig, "radii": radii}
            cfg = {"checkpoint": ckpt, "image_ids": ids, "explainers": explainers, "settings": settings, "seed": a.seed}
            store = CellStore(out / "cells" / f"{name}_sigma{sig:g}", cfg)
            examples = {}
            results[name][sig] = {}
            for res in run_certify(
                model, data, explainers=explainers, settings=settings, seed=a.seed, store=store,
                n_examples=a.n_examples,
            ):  # fmt: skip
                agg = res.aggregate
                results[name][sig][res.cell.explainer] = {"aggregate": agg, "rows": res.rows, "seconds": res.seconds}
                table = ", ".join(f"r={r:g}: {agg[rate_key(r)]:.3f}" for r in TABLE_RADII)
                print(f"{name} sigma={sig:g} {res.cell.explainer}: n={agg['n_images']} {table} "
                      f"({res.seconds:.0f} s{', resumed' if res.resumed else ''})", flush=True)  # fmt: skip
                if res.examples is not None:
                    examples[res.cell.explainer] = res.examples
            if examples:
                ex = {k: torch.cat([e[k] for e in examples.values()]) for k in next(iter(examples.values()))}
                labels = [m for m, e in examples.items() for _ in range(e["x"].shape[0])]
                two = _floats(a.map_radii)
                title = f"{name}, sigma={sig:g}, n0={a.n0}, n={a.n}, tau={a.tau:g}, alpha={a.alpha:g} ({a.correction})"
                path = out / f"certified_maps_{name}_sigma{sig:g}.png"
                p = plot_certified_maps(ex, two, path, title=title, row_labels=labels)
                figures.append(p.name)
    fig = plot_rate_vs_radius(results, radii, out / "rate_vs_radius.png")
    figures.append(fig.name)
    table = [
        {
            "model": name,
            "sigma": sig,
            "method": meth,
            "n_images": c["aggregate"]["n_images"],
            **{rate_key(r): c["aggregate"][rate_key(r)] for r in TABLE_RADII},
            "certified_important_rate": c["aggregate"]["certified_important_rate"],
            "deletion_drop_certified": c["aggregate"]["deletion_drop_certified"],
            "deletion_drop_random": c["aggregate"]["deletion_drop_random"],
            "seconds": c["seconds"],
        }
        for name, per in results.items()
        for sig, cells in per.items()
        for meth, c in cells.items()
    ]
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoints": {k: v[0] for k, v in models.items()},
        "image_ids": ids,
        "labels": y.tolist(),
        **info,
        "explainers": explainers,
        "settings": {**base, "sigmas": sigmas, "radii": radii, "seed": a.seed},
        "table": table,
        "results": {n: {f"{s:g}": c for s, c in per.items()} for n, per in results.items()},
        "figures": figures,
    }
    atomic_write_json(out / "results.json", payload)
    for row in table:
        cols = " | ".join(f"{row[rate_key(r)]:.3f}" for r in TABLE_RADII)
        print(f"| {row['model']} | {row['sigma']:g} | {row['method']} | {row['n_images']} | {cols} |")
    assert all(math.isfinite(r["rate_at_0"]) for r in table)
    return payload


if __name__ == "__main__":
    main()
