"""Benchmark fragdefense.attributions against captum on CPU.

``python benchmarks/bench_attributions.py [--batch 64] [--steps 50] [--repeats 3]``

* time: median wall time of our ``saliency`` / ``integrated_gradients`` vs captum's ``Saliency`` /
  ``IntegratedGradients`` (same steps, ``riemann_right``), ``small_cnn`` (width 32) on a batch of
  CIFAR-size images, float32, 2 threads; with the max relative difference of the maps as a check.
* memory: each IG setting runs in a fresh subprocess; we report the growth of the process peak RSS
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) caused by one IG call, after model, data and a warm-up
  saliency call are in memory, plus the number of rows in the largest batch sent through the model.
  Peak RSS includes allocator slack, so read the figures as "order of magnitude", not bytes.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch

SETTINGS = {
    "ours ibs=None": ("ours", None),
    "ours ibs=128 (default)": ("ours", 128),
    "ours ibs=64": ("ours", 64),
    "captum ibs=None (default)": ("captum", None),
    "captum ibs=128": ("captum", 128),
}


def setup(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from fragdefense.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10).eval()
    x = torch.rand(batch, 3, 32, 32)
    with torch.no_grad():
        t = model(x).argmax(1)
    return model, x, t


def run_ig(kind: str, ibs: int | None, model, x, t, steps: int) -> torch.Tensor:
    if kind == "ours":
        from fragdefense.attributions import integrated_gradients

        return integrated_gradients(model, x, t, steps=steps, internal_batch_size=ibs)
    from captum.attr import IntegratedGradients

    return IntegratedGradients(model).attribute(
        x, target=t, n_steps=steps, method="riemann_right", internal_batch_size=ibs
    )


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Reset the peak-RSS counter (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``); return current RSS.

    ``ru_maxrss`` is not usable in a child process: Linux carries the parent's peak over fork + exec,
    so it would report the parent's (benchmark driver's) peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_mb() -> float:
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(setting: str, batch: int, steps: int) -> None:
    torch.set_num_threads(2)
    from fragdefense.attributions import saliency

    model, x, t = setup(batch)
    saliency(model, x, t)  # warm-up: one forward/backward of the plain batch
    before = reset_peak_rss()
    kind, ibs = SETTINGS[setting]
    run_ig(kind, ibs, model, x, t, steps)
    rows = batch * steps if ibs is None else min(ibs, batch * steps)
    print(json.dumps({"before": before, "after": peak_rss_mb(), "rows": rows}))


def timeit(fn: Callable[[], torch.Tensor], repeats: int, warmup: bool) -> tuple[float, torch.Tensor]:
    """Minimum wall time over ``repeats`` calls (the least disturbed run on a shared machine) and the
    last output."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of saliency (after a warm-up)")
    ap.add_argument("--ig-repeats", type=int, default=3, help="timed runs of IG (~15 s each on 2 cores)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.batch, args.steps)
        return

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    from captum.attr import Saliency

    from fragdefense.attributions import integrated_gradients, saliency

    model, x, t = setup(args.batch)
    b, m = args.batch, args.steps
    print(
        f"small_cnn (width 32), batch {b} x 3x32x32 float32, torch {torch.__version__}, 2 threads, "
        f"best of {args.repeats} saliency runs (after a warm-up) and {args.ig_repeats} IG runs"
    )
    print()
    print(f"{'method':<34}{'ours [s]':>10}{'captum [s]':>12}{'ours/captum':>13}{'max rel diff':>14}")

    def row(name: str, ours: Callable[[], torch.Tensor], ref: Callable[[], torch.Tensor], ig: bool) -> None:
        r = args.ig_repeats if ig else args.repeats
        (to, ao), (tc, ac) = timeit(ours, r, not ig), timeit(ref, r, not ig)
        print(f"{name:<34}{to:>10.3f}{tc:>12.3f}{to / tc:>13.2f}{rel_diff(ao, ac):>14.1e}", flush=True)

    row(
        "saliency",
        lambda: saliency(model, x, t),
        lambda: Saliency(model).attribute(x, target=t, abs=False),
        ig=False,
    )
    row(
        f"IG m={m}, ours ibs=128 / captum None",
        lambda: integrated_gradients(model, x, t, steps=m),
        lambda: run_ig("captum", None, model, x, t, m),
        ig=True,
    )
    row(
        f"IG m={m}, both ibs=128",
        lambda: integrated_gradients(model, x, t, steps=m, internal_batch_size=128),
        lambda: run_ig("captum", 128, model, x, t, m),
        ig=True,
    )

    # float32 ReLU maps are discontinuous: captum's riemann_right alphas come from a float32 linspace, 1 ulp
    # away from i/m for some i, which flips a few ReLU / max-pool decisions. In float64 they agree:
    m64, x64 = copy.deepcopy(model).double(), x[:8].double()
    d64 = rel_diff(
        integrated_gradients(m64, x64, t[:8], steps=m),
        run_ig("captum", None, m64, x64, t[:8], m),
    )
    print(f"(IG max rel diff in float64 on 8 images: {d64:.1e}; the float32 difference comes from captum's")
    print(" float32-linspace alphas being 1 ulp off i/m, which flips a few ReLU/max-pool decisions)")
    print()
    print(f"IG m={m} peak memory (one subprocess per setting; peak RSS during the IG call minus RSS before it)")
    print(f"{'setting':<28}{'rows/forward':>14}{'peak RSS growth [MB]':>22}")
    for name in SETTINGS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--batch", str(b), "--steps", str(m)],
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<28}{res['rows']:>14d}{res['after'] - res['before']:>22.0f}", flush=True)


if __name__ == "__main__":
    main()
