"""Faithfulness scores (``fragdefense.metrics.faithfulness``) against Quantus 0.6 on CIFAR-size images.

``cases(n_images, size)`` returns ``(name, ours, quantus, (our_forwards, quantus_forwards))`` rows for
``benchmarks/bench_metrics.py``; both thunks score the same images, labels and saliency maps (``small_cnn``,
``sum_c |grad|``) with the same settings, and the forward counts are those of one call (ours: the flat batch of
images x steps / percentages / runs in ``chunk_size`` forwards; Quantus: one forward per step of ``batch_size =
n_images``). Differences that cannot be removed are in the case names:

* deletion: Quantus's ``PixelFlipping`` must remove a divisor of ``H * W`` channel elements per step, so on
  colour ``32 x 32`` images it removes 64 elements (not whole pixels) per step for 48 steps; ours 48 steps of
  whole pixels.
* insertion: Quantus has none; its ``PixelFlipping`` loop is run from the blurred image with a ``perturb_func``
  that puts the original elements back (the same work as an insertion curve).
* ROAD: Quantus's ``ROAD`` fails on colour images (``IndexError``), so this case uses single-channel images and a
  single-channel ``small_cnn``; 9 percentages.
* faithfulness correlation: 100 runs; ours draws 64 pixels, Quantus 192 channel elements per subset.

Run alone: ``python benchmarks/_quality_faithfulness.py --n 16`` (one timed call of each thunk).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from fragdefense.attributions import saliency
from fragdefense.metrics import faithfulness as FM
from fragdefense.models import create_model

Thunk = Callable[[], object]


def _setup(n: int, size: int, channels: int, seed: int = 0):
    torch.manual_seed(seed)
    kw = {} if channels == 3 else {"mean": [0.5], "std": [0.25]}
    model = create_model("small_cnn", 10, in_channels=channels, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    maps = saliency(model, x, y).abs().sum(1).detach()
    return model, x, y, maps


def _quantus_kw(x: torch.Tensor, y: torch.Tensor, maps: torch.Tensor) -> dict:
    return {
        "x_batch": x.numpy(),
        "y_batch": y.numpy(),
        "a_batch": maps[:, None].numpy(),
        "batch_size": x.shape[0],
    }


def _quiet(fn: Thunk) -> Thunk:
    def run() -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()

    return run


def cases(n_images: int = 64, size: int = 32) -> list[tuple[str, Thunk, Thunk, tuple[int, int]]]:
    """Benchmark rows: ``(name, ours, quantus, (our model forwards, Quantus model forwards))``."""
    import quantus

    model, x, y, maps = _setup(n_images, size, 3)
    d = size * size
    out: list[tuple[str, Thunk, Thunk, tuple[int, int]]] = []
    chunk = FM._default_chunk(x)

    # deletion: 48 steps
    elems = 3 * d // 48
    pf = quantus.PixelFlipping(features_in_step=elems, abs=False, normalise=False, disable_warnings=True)
    qkw = _quantus_kw(x, y, maps)
    black = x.amin((1, 2, 3), keepdim=True)  # Quantus's "black" = per-image minimum
    out.append(
        (
            f"deletion AUC, 48 steps ({n_images} x 3x{size}x{size}; Quantus {elems} elements/step)",
            lambda: FM.deletion_auc(model, x, y, maps, steps=48, baseline=black),
            _quiet(lambda: pf(model=model, **qkw)),
            (math.ceil(n_images * 49 / chunk), 48),
        )
    )

    # insertion from the blurred image: Quantus's PixelFlipping loop with a put-back perturb_func
    blurred = FM.gaussian_blur(x, 11, 5.0)
    flat_x = x.reshape(n_images, -1).numpy()

    def put_back(arr: np.ndarray, indices: np.ndarray, **kw: object) -> np.ndarray:
        arr = arr.copy()
        rows = np.arange(arr.shape[0])[:, None]
        arr[rows, indices] = flat_x[rows, indices]
        return arr

    pf_ins = quantus.PixelFlipping(
        features_in_step=elems, abs=False, normalise=False, perturb_func=put_back, disable_warnings=True
    )
    qkw_ins = {**qkw, "x_batch": blurred.numpy()}
    out.append(
        (
            f"insertion AUC (blur), 48 steps ({n_images} x 3x{size}x{size}; Quantus PixelFlipping put-back loop)",
            lambda: FM.insertion_auc(model, x, y, maps, steps=48, baseline="blur"),
            _quiet(lambda: pf_ins(model=model, **qkw_ins)),
            (math.ceil(n_images * 49 / chunk), 48),
        )
    )

    # ROAD on single-channel images (Quantus's ROAD fails on colour images)
    model1, x1, y1, maps1 = _setup(n_images, size, 1)
    pct = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    road_q = quantus.ROAD(percentages=pct, noise=0.01, abs=False, normalise=False, disable_warnings=True)
    qkw1 = _quantus_kw(x1, y1, maps1)
    chunk_road = max(64, 2**21 // x1[0].numel())
    out.append(
        (
            f"ROAD MoRF, 9 percentages ({n_images} x 1x{size}x{size})",
            lambda: FM.road(model1, x1, y1, maps1, percentages=pct, generator=0),
            _quiet(lambda: road_q(model=model1, **qkw1)),
            (math.ceil(n_images * len(pct) / chunk_road), len(pct)),
        )
    )

    # faithfulness correlation: 100 runs
    s = max(1, d // 16)
    fc_q = quantus.FaithfulnessCorrelation(
        nr_runs=100, subset_size=3 * s, abs=False, normalise=False, return_aggregate=False, disable_warnings=True
    )
    out.append(
        (
            f"faithfulness correlation, 100 runs ({n_images} x 3x{size}x{size}; {s} pixels vs {3 * s} elements)",
            lambda: FM.faithfulness_correlation(
                model, x, y, maps, subset_size=s, n_runs=100, baseline=black, generator=0
            ),
            _quiet(lambda: fc_q(model=model, **qkw)),
            (math.ceil(n_images * 101 / chunk), 101),
        )
    )
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    for name, ours, theirs, calls in cases(args.n, args.size):
        ours()  # warm-up
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        theirs()
        t2 = time.perf_counter()
        print(f"{name}: ours {t1 - t0:.2f}s, Quantus {t2 - t1:.2f}s, x{(t2 - t1) / (t1 - t0):.1f}, forwards {calls}")


if __name__ == "__main__":
    main()
