"""Memory and speed of the streamed evaluation engine behind ``fragdefense-eval`` (``fragdefense/evaluation``).

Two measurements, each a ratio of figures taken in the same run of this script:

(a) **Peak RSS of** ``fragdefense-eval`` **on 256 vs 2048 images.** Each evaluation is its own process,
    ``python -m fragdefense.cli.evaluate ...`` on synthetic data (``data.n_test=2048`` in both, so the dataset held
    in memory is the same and only ``n_images`` differs), with a cheap grid: ``saliency`` x ``random_sign`` x one
    eps, no figures, W&B disabled. The checkpoint is a tiny ``small_cnn`` (``model.width=8``) trained first by
    ``python -m fragdefense.cli.train`` in a temporary directory. Peak RSS is ``ru_maxrss`` of
    ``RUSAGE_CHILDREN`` read by a small launcher interpreter that runs the command as its child: Linux starts a
    child's ``ru_maxrss`` from the size of the process that forked it, so a child of this (larger) script would
    report this script's size. The peak of the same command varies by tens of MB from run to run (the allocator,
    not the number of images), so each size runs ``--rss-repeats`` times, the sizes interleaved, and the ratio is
    taken between the medians (each pair's ratio is printed too). Goal: ``RSS(2048) / RSS(256) - 1 < 15 %``.

(b) **Time per image, streamed vs in memory.** In this process, on the same images and the same grid
    (``saliency`` x ``[random_sign, topk]`` x ``8/255``, 5 attack steps of 2/255, the rest of the protocol
    from ``eval.yaml``, seed 0): ``run_grid`` over one in-memory list of ``(x, y, ids)`` batches (the old path: every
    selected image loaded first) vs ``run_grid`` over a ``DataLoader`` of the dataset built as ``fragdefense-eval``
    builds it (``_Indexed`` of the selected indices, batch 64, no shuffling, no workers). The two are interleaved
    round-robin (``--rounds``, alternating which goes first) after one untimed warm-up each; the reported ratio is
    the median over rounds of streamed / in memory (wall clock and process CPU time; the ratio of the best times
    beside it). Times are per selected image and per cell (attacked or skipped). Both paths must give
    identical per-image rows (asserted). Goal: streamed within 10 % of in memory. On a shared machine one grid
    takes seconds and its time moves by 10-20 % from run to run, so the cost of the data path alone is measured
    too: one pass over each path (through the engine's ``iter_batches``, what ``run_grid`` does once per cell),
    interleaved 20 times, medians; its difference, times the number of cells, over the in-memory grid time is
    the ratio the streaming alone accounts for.

Only correctly classified images are attacked (as in ``fragdefense-eval``), so the training budget of the
checkpoint sets how many images the grid attacks: 320 training images for one epoch give a chance-level model
(about 10 % attacked); the defaults (5000 images, 3 epochs, about 15 s) give one that classifies about half the
test images. The number attacked is printed with every figure.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_eval.py [--out benchmarks/results/bench_eval.json]``
(a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# Runs argv[2:] as its own child, then writes the child's peak RSS (KB; the child and the descendants it waited for)
# to argv[1]. Started from a small interpreter so the child's ru_maxrss does not start at this script's size.
_LAUNCHER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(r.returncode)"
)

RSS_GOAL = 0.15
TIME_GOAL = 0.10


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "OMP_WAIT_POLICY": "PASSIVE"}


def _run(cmd: list[str], log: Path, rss_file: Path | None = None) -> float | None:
    """Run ``cmd`` (through the launcher when ``rss_file`` is given); returns the peak RSS in MB or None. A failure
    raises with the tail of the command's output."""
    argv = [sys.executable, "-c", _LAUNCHER, str(rss_file), *cmd] if rss_file is not None else cmd
    with open(log, "w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=log.parent).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(cmd)}\n--- output tail ({log}) ---\n{tail}")
    return int(rss_file.read_text()) / 1024 if rss_file is not None else None


def train_checkpoint(work: Path, n_train: int, epochs: int, n_test: int) -> Path:
    """A tiny ``small_cnn`` trained by ``fragdefense-train`` (no fragility monitor, CSV logger, no test pass)."""
    run_dir = work / "train"
    cmd = [
        sys.executable,
        "-m",
        "fragdefense.cli.train",
        f"data.n_train={n_train}",
        f"data.n_test={n_test}",
        "model.width=8",
        f"trainer.max_epochs={epochs}",
        "~callbacks.fragility",
        "logger=csv",
        "test=false",
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    _run(cmd, work / "train.log")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise RuntimeError(f"training wrote no {ckpt}; see {work / 'train.log'}")
    return ckpt


def measure_rss(work: Path, ckpt: Path, sizes: list[int], n_test: int, repeats: int) -> dict[str, Any]:
    """Peak RSS of ``fragdefense-eval`` processes (same data, grid and checkpoint), ``repeats`` per size, the sizes
    interleaved (``a, b, a, b, ...``); the peak of the same command varies from run to run by tens of MB."""
    out: dict[str, Any] = {str(n): {"peak_rss_mb": [], "seconds": []} for n in sizes}
    for rep in range(repeats):
        for n in sizes:
            out_dir = work / f"eval_{n}_{rep}"
            cmd = [
                sys.executable,
                "-m",
                "fragdefense.cli.evaluate",
                f"checkpoint={ckpt}",
                "data.n_train=320",  # eval reads only the test split; a small training split keeps the baseline small
                f"data.n_test={n_test}",
                f"n_images={n}",
                "attacks=[random_sign]",
                "~methods",
                "+methods={saliency:{}}",
                "eps=[8/255]",
                "figures=false",
                "wandb.mode=disabled",
                f"out_dir={out_dir}",
                f"hydra.run.dir={out_dir}",
            ]
            t0 = time.perf_counter()
            mb = _run(cmd, work / f"eval_{n}_{rep}.log", work / f"eval_{n}_{rep}.maxrss")
            res = json.loads((out_dir / "results.json").read_text())
            r = out[str(n)]
            r["peak_rss_mb"].append(mb)
            r["seconds"].append(time.perf_counter() - t0)
            r.update(
                n_images=len(res["image_indices"]),
                n_attacked=res["records"][0]["n_images"],
                clean_accuracy=res["clean_accuracy"],
            )
    for r in out.values():
        r["median_peak_rss_mb"] = statistics.median(r["peak_rss_mb"])
    return out


def _same(a: Any, b: Any) -> bool:
    """Exact equality of rows, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def measure_time(
    ckpt: Path,
    n_images: int,
    n_test: int,
    batch_size: int,
    steps: int,
    step_size: str,
    rounds: int,
    data_passes: int = 20,
) -> dict[str, Any]:
    """``run_grid`` over an in-memory list of batches vs over the CLI's ``DataLoader``, interleaved."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fragdefense.cli._common import select_images
    from fragdefense.cli._common import selected_indices as _selected_indices
    from fragdefense.cli._config import compose_config
    from fragdefense.cli.evaluate import _Indexed
    from fragdefense.evaluation import iter_batches, run_grid
    from fragdefense.models import load_checkpoint_model
    from fragdefense.utils.conventions import parse_budget

    cfg = compose_config("eval", [f"checkpoint={ckpt}", "data.n_train=320", f"data.n_test={n_test}"])
    seed = int(cfg.seed)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    test_set = datamodule.test_set
    model = load_checkpoint_model(str(ckpt)).eval()
    proto = OmegaConf.to_container(cfg.protocol, resolve=True)
    proto["steps"] = steps
    proto["step_size"] = parse_budget(step_size, "step_size")
    grid = {
        "explainers": {"saliency": {}},
        "attacks": ["random_sign", "topk"],
        "eps": ["8/255"],
        "protocol": proto,
        "seed": seed,
        "device": "cpu",
    }

    # the old path: every selected image in memory first, then batches of it
    t0 = time.perf_counter()
    x_all, y_all, idx = select_images(test_set, n_images, seed)
    in_memory = [
        (x_all[i : i + batch_size], y_all[i : i + batch_size], torch.tensor(idx[i : i + batch_size]))
        for i in range(0, len(idx), batch_size)
    ]
    load_seconds = time.perf_counter() - t0
    # the streamed path, as fragdefense-eval builds it
    sel = _selected_indices(len(test_set), n_images, seed)
    assert sel == idx, "the CLI's image selection differs from select_images"
    loader = torch.utils.data.DataLoader(_Indexed(test_set, sel), batch_size=batch_size, shuffle=False, num_workers=0)
    paths = {"in_memory": in_memory, "streamed": loader}

    def run(name: str) -> tuple[float, float, list]:
        t, c = time.perf_counter(), time.process_time()
        cells = list(run_grid(model, paths[name], **grid))
        return time.perf_counter() - t, time.process_time() - c, cells

    ref = {name: run(name)[2] for name in paths}  # warm-up, and the rows to compare
    for a, b in zip(ref["in_memory"], ref["streamed"]):
        assert a.cell == b.cell
        assert len(a.rows) == len(b.rows) and all(_same(r, s) for r, s in zip(a.rows, b.rows)), (
            f"{a.cell.key}: per-image rows differ between the in-memory and the streamed path"
        )
        assert _same(a.aggregate, b.aggregate), f"{a.cell.key}: aggregates differ"
    n_cells = len(ref["in_memory"])
    attacked = {c.cell.key: c.aggregate["n_images"] for c in ref["in_memory"]}

    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        order = ["in_memory", "streamed"] if r % 2 == 0 else ["streamed", "in_memory"]
        for name in order:
            w, c, cells = run(name)
            assert all(_same(x.rows, y.rows) for x, y in zip(cells, ref[name])), f"{name}: rows changed between runs"
            wall[name].append(w)
            cpu[name].append(c)
    per_image = n_images * n_cells

    # the data path alone: one pass over each (what run_grid does once per cell), interleaved, many times
    def iterate(name: str) -> float:
        t = time.perf_counter()
        for _ in iter_batches(paths[name]):
            pass
        return time.perf_counter() - t

    passes: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(data_passes):
        for name in paths:
            passes[name].append(iterate(name))
    pass_s = {k: statistics.median(v) for k, v in passes.items()}
    overhead = pass_s["streamed"] - pass_s["in_memory"]
    t_mem = statistics.median(wall["in_memory"])

    def summary(times: dict[str, list[float]]) -> dict[str, Any]:
        ratios = [s / m for s, m in zip(times["streamed"], times["in_memory"])]
        return {
            "seconds_per_image": {k: statistics.median(v) / per_image for k, v in times.items()},
            "seconds": times,
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "best_ratio": min(times["streamed"]) / min(times["in_memory"]),
        }

    return {
        "n_images": len(idx),
        "n_cells": n_cells,
        "attacked_per_cell": attacked,
        "batch_size": batch_size,
        "protocol": proto,
        "rounds": rounds,
        "in_memory_load_seconds": load_seconds,
        "rows_identical": True,
        "wall": summary(wall),
        "cpu": summary(cpu),
        "data_pass": {
            "passes": data_passes,
            "median_seconds": pass_s,
            "overhead_seconds_per_image": overhead / n_images,
            "implied_ratio": (t_mem + n_cells * overhead) / t_mem,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_eval.json"), help="JSON results")
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoint, logs and eval outputs here")
    ap.add_argument("--sizes", type=int, nargs=2, default=[256, 2048], help="n_images of the two RSS runs")
    ap.add_argument("--rss-repeats", type=int, default=3, help="eval processes per size (interleaved)")
    ap.add_argument("--train-images", type=int, default=5000, help="training images of the checkpoint")
    ap.add_argument("--train-epochs", type=int, default=3, help="training epochs of the checkpoint")
    ap.add_argument("--time-images", type=int, default=256, help="images of the timing grid")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="attack steps of the timing grid")
    ap.add_argument("--step-size", default="2/255", help="attack step size of the timing grid")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    args = ap.parse_args()
    n_test = max(2048, *args.sizes, args.time_images)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.2f}; work dir {work}"
    )
    try:
        t = time.perf_counter()
        ckpt = train_checkpoint(work, args.train_images, args.train_epochs, n_test)
        train_s = time.perf_counter() - t
        print(f"checkpoint: {ckpt} ({train_s:.0f} s)")
        rss = measure_rss(work, ckpt, list(args.sizes), n_test, args.rss_repeats)
        small, large = (rss[str(n)]["median_peak_rss_mb"] for n in args.sizes)
        growth = large / small - 1
        growths = [b / a - 1 for a, b in zip(*(rss[str(n)]["peak_rss_mb"] for n in args.sizes))]
        timing = measure_time(ckpt, args.time_images, n_test, args.batch_size, args.steps, args.step_size, args.rounds)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n(a) peak RSS of fragdefense-eval (saliency x random_sign x 8/255, synthetic, data.n_test={n_test})")
    print(f"{'n_images':>9} {'attacked':>9} {'peak RSS, median (MB)':>22} {'runs (MB)':>24} {'wall (s)':>9}")
    for n in args.sizes:
        r = rss[str(n)]
        runs = ", ".join(f"{v:.0f}" for v in r["peak_rss_mb"])
        print(
            f"{n:>9} {r['n_attacked']:>9} {r['median_peak_rss_mb']:>22.1f} {runs:>24} "
            f"{statistics.median(r['seconds']):>9.1f}"
        )
    ok_rss = growth < RSS_GOAL
    print(
        f"RSS({args.sizes[1]}) / RSS({args.sizes[0]}) - 1 = {100 * growth:+.1f} % on the medians (goal < "
        f"{100 * RSS_GOAL:.0f} %: {'met' if ok_rss else 'NOT met'}); per pair of runs: "
        f"{', '.join(f'{100 * g:+.1f} %' for g in growths)}"
    )

    n_cells = timing["n_cells"]
    print(
        f"\n(b) run_grid, {timing['n_images']} images x {n_cells} cells (saliency x random_sign, topk x 8/255, "
        f"{args.steps} steps of {args.step_size}), batch {args.batch_size}; "
        f"attacked per cell: {timing['attacked_per_cell']}"
    )
    print(
        f"{'clock':>6} {'in memory (ms/img/cell)':>24} {'streamed (ms/img/cell)':>23} "
        f"{'median streamed/in memory':>26} {'ratio of best times':>20}"
    )
    for clock in ("wall", "cpu"):
        s = timing[clock]
        print(
            f"{clock:>6} {1e3 * s['seconds_per_image']['in_memory']:>24.3f} "
            f"{1e3 * s['seconds_per_image']['streamed']:>23.3f} {s['median_ratio']:>26.3f} {s['best_ratio']:>20.3f}"
        )
    ok_time = timing["wall"]["median_ratio"] - 1 < TIME_GOAL
    print(
        f"per-round wall ratios {[round(r, 3) for r in timing['wall']['ratios']]}; streamed within "
        f"{100 * TIME_GOAL:.0f} % of in memory: {'met' if ok_time else 'NOT met'}; per-image rows identical: yes; "
        f"loading the images into memory (old path, once): {timing['in_memory_load_seconds']:.3f} s"
    )
    dp = timing["data_pass"]
    print(
        f"data path alone (one pass over the {timing['n_images']} images, median of {dp['passes']}): in memory "
        f"{1e3 * dp['median_seconds']['in_memory']:.2f} ms, streamed {1e3 * dp['median_seconds']['streamed']:.2f} ms "
        f"= {1e6 * dp['overhead_seconds_per_image']:.1f} us per image more; with one pass per cell this alone "
        f"makes streamed / in memory = {dp['implied_ratio']:.4f}"
    )

    payload = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_average_end": os.getloadavg()[0],
        },
        "checkpoint": {
            "train_images": args.train_images,
            "train_epochs": args.train_epochs,
            "width": 8,
            "train_seconds": train_s,
        },
        "rss": {
            "sizes": rss,
            "growth": growth,
            "growth_per_pair": growths,
            "goal": RSS_GOAL,
            "goal_met": ok_rss,
        },
        "timing": {**timing, "goal": TIME_GOAL, "goal_met": ok_time},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
