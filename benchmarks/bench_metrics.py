"""Benchmark fragdefense.metrics.functional against the per-sample alternatives.

Run: ``python benchmarks/bench_metrics.py`` (add ``--quick`` for a smoke run with fewer repeats).

For every case all methods run on the same tensors, interleaved round-robin (one call of each method per
round) so that load changes on a shared machine hit every method alike; each time is the median over the
rounds (a method slower than ``--slow`` seconds per call gets fewer rounds). Column ``x ours`` is the time
relative to the first row of the case (ours). ``max|d|`` is the largest absolute difference to the scipy
values (the exact reference).

Baselines:
* ``scipy loop``: ``scipy.stats.spearmanr`` / ``kendalltau`` on each flattened map (float64 numpy).
* ``torchmetrics``: ``spearman_corrcoef`` / ``kendall_rank_corrcoef`` on the transposed ``(D, B)`` layout
  (they correlate columns); kendall only on a small case (its pair counting is quadratic).
* ``floor``: one ``torch.sort`` of each input (Spearman with exact ties cannot need less than that) or one
  ``torch.topk`` of each input (top-k intersection). ``floor: our row sort`` is the row sort our rank metrics
  use (``_sort_rows``: numpy's SIMD arg-sort on a thread pool for CPU tensors, ``torch.sort`` elsewhere), so
  ``ours / our sort`` is the cost of everything but the sort.
* ``numpy loop``: per-map ``argpartition`` + ``intersect1d`` for top-k intersection (no library has it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from torchmetrics.functional import kendall_rank_corrcoef, spearman_corrcoef

from fragdefense.metrics.functional import _kth_largest, _sort_rows, kendall_tau, lens_topk, spearman, topk_intersection

THREADS = 2


def _maps(b: int, side: int, seed: int, levels: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, side, side, generator=g)
    return torch.floor(x * levels) if levels else x


def _scipy_loop(fn: Callable, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    fa = a.reshape(a.shape[0], -1).double().numpy()
    fb = b.reshape(b.shape[0], -1).double().numpy()
    return np.array([fn(x, y)[0] for x, y in zip(fa, fb)])


def _numpy_topk_loop(a: torch.Tensor, b: torch.Tensor, k: int) -> np.ndarray:
    fa = a.reshape(a.shape[0], -1).numpy()
    fb = b.reshape(b.shape[0], -1).numpy()
    out = []
    for x, y in zip(fa, fb):
        ia = np.argpartition(-x, k - 1)[:k]
        ib = np.argpartition(-y, k - 1)[:k]
        out.append(len(np.intersect1d(ia, ib)) / k)
    return np.array(out)


def _run_case(
    title: str,
    methods: list[tuple[str, Callable[[], object]]],
    reference: np.ndarray | None,
    rounds: int,
    slow: float,
) -> list[tuple[str, str, float, float, float, int]]:
    """Time ``methods`` round-robin; return rows (case, method, median s, ratio, max|d|, n)."""
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    diffs: dict[str, float] = {}
    for name, fn in methods:  # warm-up + accuracy
        t0 = time.perf_counter()
        out = fn()
        times[name].append(time.perf_counter() - t0)  # first call counts only if the method is slow
        # lens_topk rows time a different metric on the same maps: no reference for them
        if reference is not None and isinstance(out, (torch.Tensor, np.ndarray)) and "lens" not in name:
            diffs[name] = float(np.max(np.abs(np.asarray(torch.as_tensor(out).double()) - reference)))
    slow_names = {name for name, ts in times.items() if ts[0] > slow}
    for name in times:
        if name not in slow_names:
            times[name].clear()
    for r in range(rounds):
        for name, fn in methods:
            if name in slow_names and r >= 1:
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[methods[0][0]])
    rows = []
    for name, _ in methods:
        med = statistics.median(times[name])
        rows.append((title, name, med, med / base, diffs.get(name, float("nan")), len(times[name])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="round-robin rounds per case (median)")
    parser.add_argument("--slow", type=float, default=3.0, help="seconds: slower methods run only twice")
    parser.add_argument("--quick", action="store_true", help="3 rounds, small cases only")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (default 2)")
    parser.add_argument(
        "--only",
        default="spearman,topk,kendall",
        help="comma-separated metric families: spearman, topk, kendall (default) and quality (the explanation "
        "scores and map comparisons against Quantus 0.6; minutes)",
    )
    parser.add_argument("--quality-images", type=int, default=64, help="images of the quality cases (default 64)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    rounds = 3 if args.quick else args.rounds
    only = {f.strip() for f in args.only.split(",")}

    sizes = [(256, 32, 100)] if args.quick else [(256, 32, 100), (32, 224, 1000)]
    rows = []
    for bsz, side, k in sizes:
        for kind, levels in (("random", None), ("ties:8 levels", 8)) if "spearman" in only else ():
            a, b = _maps(bsz, side, 1, levels), _maps(bsz, side, 2, levels)
            b = torch.where(torch.rand(a.shape) < 0.5, a, b)  # partially agreeing maps
            at, bt = a.reshape(bsz, -1).T.contiguous(), b.reshape(bsz, -1).T.contiguous()
            ref = _scipy_loop(scipy.stats.spearmanr, a, b)
            rows += _run_case(
                f"spearman {bsz}x{side}x{side} {kind}",
                [
                    ("fragdefense spearman", lambda a=a, b=b: spearman(a, b)),
                    ("floor: torch.sort a,b", lambda a=a, b=b: (torch.sort(a.flatten(1)), torch.sort(b.flatten(1)))),
                    ("floor: our row sort a,b", lambda a=a, b=b: _sort_rows(torch.cat([a.flatten(1), b.flatten(1)]))),
                    ("scipy.stats.spearmanr loop", lambda a=a, b=b: _scipy_loop(scipy.stats.spearmanr, a, b)),
                    ("torchmetrics spearman_corrcoef", lambda at=at, bt=bt: spearman_corrcoef(at, bt)),
                ],
                ref,
                rounds,
                args.slow,
            )
        if "topk" not in only:
            continue
        a, b = _maps(bsz, side, 3), _maps(bsz, side, 4)
        b = torch.where(torch.rand(a.shape) < 0.5, a, b)
        rows += _run_case(
            f"topk_intersection {bsz}x{side}x{side} k={k}",
            [
                ("fragdefense topk_intersection", lambda a=a, b=b, k=k: topk_intersection(a, b, k)),
                (
                    "floor: torch.topk a,b",
                    lambda a=a, b=b, k=k: (torch.topk(a.flatten(1), k), torch.topk(b.flatten(1), k)),
                ),
                (
                    "floor: our k-th value a,b",
                    lambda a=a, b=b, k=k: (_kth_largest(a.flatten(1), k), _kth_largest(b.flatten(1), k)),
                ),
                ("numpy argpartition loop", lambda a=a, b=b, k=k: _numpy_topk_loop(a, b, k)),
                ("fragdefense lens_topk w=1", lambda a=a, b=b, k=k: lens_topk(a, b, k, 1)),
                ("fragdefense lens_topk w=1 diverse", lambda a=a, b=b, k=k: lens_topk(a, b, k, 1, diverse=True)),
            ],
            _numpy_topk_loop(a, b, k),  # continuous maps: no ties, so argpartition's sets are exact
            rounds,
            args.slow,
        )
    # (maps, side, torchmetrics too, true float64 values): float32-valued maps take kendall's float32-key path,
    # true float64 maps need a third sort (a's dense ranks)
    kendall_cases = [(64, 16, True, False), (256, 32, False, False)]
    kendall_cases += [] if args.quick else [(32, 224, False, False), (32, 224, False, True)]
    kendall_cases = kendall_cases if "kendall" in only else []
    for bsz, side, with_tm, true64 in kendall_cases:
        a, b = _maps(bsz, side, 5), _maps(bsz, side, 6)
        b = torch.where(torch.rand(a.shape) < 0.5, a, b)
        a64, b64 = a.double(), b.double()
        if true64:  # values below float32 resolution
            a64 = a64 + torch.rand(a.shape, dtype=torch.float64) * 1e-9
            b64 = torch.where(b64 == a.double(), a64, b64 + torch.rand(a.shape, dtype=torch.float64) * 1e-9)
            a, b = a64, b64
        methods = [
            ("fragdefense kendall_tau", lambda a=a64, b=b64: kendall_tau(a, b)),
            ("scipy.stats.kendalltau loop", lambda a=a, b=b: _scipy_loop(scipy.stats.kendalltau, a, b)),
        ]
        if with_tm:
            at, bt = a64.reshape(bsz, -1).T.contiguous(), b64.reshape(bsz, -1).T.contiguous()
            methods.append(("torchmetrics kendall_rank_corrcoef", lambda at=at, bt=bt: kendall_rank_corrcoef(at, bt)))
        rows += _run_case(
            f"kendall {bsz}x{side}x{side}" + (" float64" if true64 else ""),
            methods,
            _scipy_loop(scipy.stats.kendalltau, a, b),
            rounds,
            args.slow,
        )

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, median wall time "
        f"over rounds; 1-min load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    if "quality" in only:
        rows += _quality_rows(args.quality_images, rounds, args.slow)
    header = f"{'case':36s} {'method':36s} {'time ms':>10s} {'x ours':>8s} {'max|d|':>9s} {'n':>3s}"
    print(header)
    print("-" * len(header))
    last = None
    for case, name, med, ratio, diff, n in rows:
        if last is not None and case != last:
            print()
        last = case
        d = "" if np.isnan(diff) else f"{diff:.1e}"
        print(f"{case:36s} {name:36s} {med * 1e3:10.2f} {ratio:8.2f} {d:>9s} {n:3d}")

    print("\ngoals (ratio = other method's time / ours):")
    by_case: dict[str, dict[str, float]] = {}
    for case, name, med, _, _, _ in rows:
        by_case.setdefault(case, {})[name] = med
    for case, t in by_case.items():
        ours = next(iter(t.values()))
        if case.startswith("spearman"):
            floor, sp = t["floor: torch.sort a,b"], t["scipy.stats.spearmanr loop"]
            own = t["floor: our row sort a,b"]
            print(
                f"  {case:36s} ours / torch.sort floor = {ours / floor:5.2f}x (goal <= 1.5); "
                f"ours / our sort = {ours / own:5.2f}x; scipy / ours = {sp / ours:5.2f}x"
            )
        elif case.startswith("kendall"):
            sp = t["scipy.stats.kendalltau loop"]
            goal = ">= 2 on 2 threads, >= 1 on one" if "224" in case else ">= 1"
            print(f"  {case:36s} scipy / ours = {sp / ours:5.2f}x (goal {goal})")
        elif case.startswith("topk_intersection"):
            div = t["fragdefense lens_topk w=1 diverse"]
            print(f"  {case:36s} lens_topk diverse / topk_intersection = {div / ours:5.2f}x (goal <= 10)")
        elif case.startswith("quality"):
            q = t["Quantus 0.6"]
            goal = ">= 10 (map comparison)" if "map comparison" in case else ">= 2 (model calls)"
            calls = _QUALITY_CALLS.get(case)
            extra = f"; model forwards ours / Quantus = {calls[0]} / {calls[1]}" if calls else ""
            print(f"  {case:36s} Quantus / ours = {q / ours:6.2f}x (goal {goal}){extra}")
    if "quality" in only:
        out = Path(__file__).resolve().parent / "results" / "bench_quality.json"
        out.parent.mkdir(exist_ok=True)
        payload = {
            case: {
                "ours_s": next(iter(t.values())),
                "quantus_s": t["Quantus 0.6"],
                "speedup": t["Quantus 0.6"] / next(iter(t.values())),
                "forwards": _QUALITY_CALLS.get(case),
            }
            for case, t in by_case.items()
            if case.startswith("quality")
        }
        payload["_meta"] = {
            "threads": args.threads,
            "rounds": rounds,
            "images": args.quality_images,
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
        }
        out.write_text(json.dumps(payload, indent=1))
        print(f"\nquality figures: {out}")


_QUALITY_CALLS: dict[str, tuple[int, int]] = {}


def _quality_rows(n_images: int, rounds: int, slow: float) -> list[tuple[str, str, float, float, float, int]]:
    """The explanation scores (robustness, faithfulness) and two map comparisons against Quantus 0.6, each a case
    ``quality <name>`` with ours first; model forwards of one call counted on both sides."""
    import quantus

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _quality_faithfulness as QF
    import _quality_robustness as QR

    rows = []
    net, rcases = QR._build(n_images, 32, 10)
    for name, ours, theirs, _ in rcases:
        if name.startswith("all six"):
            continue
        case = f"quality {name}"
        _QUALITY_CALLS[case] = (QR.count_forwards(net, ours), QR.count_forwards(net, theirs))
        rows += _run_case(case, [("fragdefense", ours), ("Quantus 0.6", theirs)], None, min(rounds, 3), slow)
    for name, ours, theirs, calls in QF.cases(n_images, 32):
        case = f"quality {name}"
        _QUALITY_CALLS[case] = tuple(calls)
        rows += _run_case(case, [("fragdefense", ours), ("Quantus 0.6", theirs)], None, min(rounds, 3), slow)
    # scores whose cost is the map comparison itself: Quantus' similarity functions run per map in numpy/scipy
    a, b = _maps(n_images, 32, 5), _maps(n_images, 32, 6)
    fa, fb = a.flatten(1).numpy(), b.flatten(1).numpy()
    for label, ours, qfn in (
        ("Spearman", lambda: spearman(a, b), quantus.similarity_func.correlation_spearman),
        ("Kendall tau", lambda: kendall_tau(a, b), quantus.similarity_func.correlation_kendall_tau),
    ):
        ref = np.array([qfn(x, y) for x, y in zip(fa, fb)])
        rows += _run_case(
            f"quality map comparison: {label} {n_images}x32x32",
            [("fragdefense", ours), ("Quantus 0.6", lambda qfn=qfn: [qfn(x, y) for x, y in zip(fa, fb)])],
            ref,
            rounds,
            slow,
        )
    return rows


if __name__ == "__main__":
    main()
