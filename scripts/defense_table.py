"""Collect the defense runs of ``scripts/defense_table.sh`` into one table (markdown + JSON + PNG).

    python scripts/defense_table.py runs/defense --out docs/defense_table_cifar10.md

For every ``<runs>/<name>/`` with ``metrics.json`` (fragdefense-train) and ``eval_ghorbani/results.json`` /
``eval_ifia/results.json`` (fragdefense-eval), one row per defense x attack protocol x attribution method:
test accuracy, top-k intersection, Kendall, Spearman and LENS recall under the top-k attack at the largest eps,
and the fine-tuning time. Rows are compared with the ``natural`` run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fragdefense.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

METRICS = ("topk_intersection", "kendall", "spearman", "lens_recall")
PROTOCOLS = {"eval_ghorbani": "Ghorbani top-k", "eval_ifia": "IFIA-style top-k"}


def collect(root: Path) -> list[dict]:
    rows = []
    for run in sorted(p for p in root.iterdir() if (p / "metrics.json").is_file()):
        m = json.loads((run / "metrics.json").read_text())
        acc = (m.get("test") or {}).get("test/acc")
        for sub, proto in PROTOCOLS.items():
            f = run / sub / "results.json"
            if not f.is_file():
                continue
            res = json.loads(f.read_text())
            for rec in res["records"]:
                if rec["attack"] != "topk":
                    continue
                row = {
                    "defense": run.name,
                    "test_acc": acc,
                    "train_seconds": m.get("train_seconds"),
                    "protocol": proto,
                    "method": rec["method"],
                    "eps_255": rec["epsilon_255"],
                    "n_images": rec["n_images"],
                    "label_kept_rate": rec.get("label_kept_rate"),
                    **{k: rec.get(k) for k in METRICS},
                }
                rnd = next(
                    (r for r in res["records"] if r["attack"] == "random_sign" and r["method"] == rec["method"]),
                    None,
                )
                row["random_sign_topk"] = rnd["topk_intersection"] if rnd else None
                rows.append(row)
    return rows


def _f(v, fmt="{:.3f}"):
    return "—" if v is None else fmt.format(v)


def to_markdown(rows: list[dict]) -> str:
    nat = {(r["protocol"], r["method"]): r for r in rows if r["defense"] == "natural"}
    head = (
        "| defense | test acc | Δ acc (pts) | protocol | method | top-k ∩ | Δ top-k (pts) | Kendall | Spearman "
        "| LENS recall | random-sign top-k ∩ | n | fine-tune time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        n = nat.get((r["protocol"], r["method"]))
        dacc = None if n is None or r["test_acc"] is None else 100 * (r["test_acc"] - n["test_acc"])
        dtop = None if n is None else 100 * (r["topk_intersection"] - n["topk_intersection"])
        lines.append(
            f"| {r['defense']} | {_f(r['test_acc'], '{:.2%}')} | {_f(dacc, '{:+.1f}')} | {r['protocol']} | "
            f"{r['method']} | {_f(r['topk_intersection'])} | {_f(dtop, '{:+.1f}')} | {_f(r['kendall'])} | "
            f"{_f(r['spearman'])} | {_f(r['lens_recall'])} | {_f(r['random_sign_topk'])} | {r['n_images']} | "
            f"{_f(r['train_seconds'], '{:.0f}')} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    combos = sorted({(r["protocol"], r["method"]) for r in rows})
    names = sorted({r["defense"] for r in rows})
    color = dict(zip(names, plt.cm.tab20.colors * (len(names) // 20 + 1)))  # one colour per defense, all panels
    fig, axes = plt.subplots(1, len(combos), figsize=(4.5 * len(combos), 3.8), squeeze=False)
    for ax, (proto, method) in zip(axes[0], combos):
        sub = [r for r in rows if r["protocol"] == proto and r["method"] == method]
        nat = next((r for r in sub if r["defense"] == "natural"), None)
        if nat is not None:  # the goal: >= +10 points of top-k for <= 5 points of accuracy
            x0, y0 = 100 * nat["test_acc"] - 5, nat["topk_intersection"] + 0.10
            ax.fill_between([x0, 100 * nat["test_acc"] + 2], y0, 1.0, color="tab:green", alpha=0.08, lw=0)
        for r in sub:
            ax.scatter(100 * r["test_acc"], r["topk_intersection"], s=40, color=color[r["defense"]])
            ax.annotate(r["defense"], (100 * r["test_acc"], r["topk_intersection"]), fontsize=8)
        top = max(r["topk_intersection"] for r in sub)
        ax.set_ylim(min(r["topk_intersection"] for r in sub) - 0.03, top + 0.05)
        if nat is not None:
            ax.text(x0, top + 0.045, "goal\nregion", fontsize=7, color="tab:green", va="top")
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel("top-k intersection under attack")
        ax.set_title(f"{proto}, {method}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path, default=Path("defense_table.md"))
    args = ap.parse_args()
    rows = collect(args.runs)
    if not rows:
        raise SystemExit(f"no finished defense runs under {args.runs}")
    md = to_markdown(rows)
    atomic_write_text(args.out, md)
    atomic_write_json(args.out.with_suffix(".json"), rows)
    plot(rows, args.out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
