"""Benchmark cases: the explanation robustness scores of :mod:`fragdefense.metrics.robustness` against Quantus 0.6.

:func:`cases` returns ``(name, ours, quantus, our model calls)`` for max-sensitivity, avg-sensitivity, the local
Lipschitz estimate and the three relative stabilities on CIFAR-size images (``small_cnn``, saliency maps
absolute-summed over channels, ``n_samples`` perturbations per image). Both sides use the same settings: uniform
noise in ``[-0.2, 0.2]`` (Quantus' sensitivity default, its own numpy sampler, given to every Quantus metric)
with the perturbed images clamped to ``[0, 1]`` (the attribution methods reject pixels outside), no
normalisation / abs of the maps, each library's default rule for samples that change the prediction (the
stabilities check it on both sides, the sensitivities on neither), and the same ``explain`` function (Quantus
gets a numpy adapter). :func:`model_calls` gives the number of forward passes of each side (an explanation is one
forward pass plus its backward), counted by :func:`count_forwards`. The last case computes all six scores: ours
from one set of samples (:func:`fragdefense.metrics.robustness.robustness_scores`), Quantus' six metrics in turn.

Run alone as ``python benchmarks/_quality_robustness.py [--n-images 16] [--n-samples 10]`` for one timing of each
case; ``benchmarks/bench_metrics.py`` times the cases with its interleaved rounds.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting threads on shared cores

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fragdefense.metrics import robustness as R  # noqa: E402
from fragdefense.models import create_model  # noqa: E402

#: perturbed images per explain call on our side (64 images x 10 samples = 640 -> 3 calls)
CHUNK = 256

_QUANTUS = {
    "max_sensitivity": "MaxSensitivity",
    "avg_sensitivity": "AvgSensitivity",
    "local_lipschitz_estimate": "LocalLipschitzEstimate",
    "relative_input_stability": "RelativeInputStability",
    "relative_output_stability": "RelativeOutputStability",
    "relative_representation_stability": "RelativeRepresentationStability",
}


def _setup(n_images: int, size: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, Any]:
    torch.manual_seed(seed)
    net = create_model("small_cnn", num_classes=10).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(n_images, 3, 1, 1, generator=g) + 0.15 * torch.rand(n_images, 3, size, size, generator=g)).clamp(
        0, 1
    )
    y = torch.randint(0, 10, (n_images,), generator=g)
    return net, x, y, R.make_explain(net, "saliency")


def _quantus_kwargs(name: str) -> dict[str, Any]:
    from quantus.functions.perturb_func import batch_uniform_noise

    def clamped_uniform_noise(arr: np.ndarray, **kw: Any) -> np.ndarray:
        return np.clip(batch_uniform_noise(arr, **kw), 0.0, 1.0)

    kw: dict[str, Any] = {"normalise": False, "abs": False, "disable_warnings": True}
    kw["perturb_func"] = clamped_uniform_noise
    kw["perturb_func_kwargs"] = {"lower_bound": 0.2, "upper_bound": None}
    if name == "relative_representation_stability":
        kw["layer_names"] = ["backbone.features.18"]  # the input of the last nn.Linear, our default
    return kw


def _our_kwargs(name: str) -> dict[str, Any]:
    return {"radius": 0.2, "norm": "linf", "clamp": True, "chunk_size": CHUNK}


Case = tuple[str, Callable[[], Any], Callable[[], Any], int]


def cases(n_images: int = 64, size: int = 32, n_samples: int = 10) -> list[Case]:
    """``(case name, ours thunk, quantus thunk, our model calls)`` per score (:func:`model_calls` counts both
    sides' forward passes)."""
    return _build(n_images, size, n_samples)[1]


def _build(n_images: int, size: int, n_samples: int) -> tuple[torch.nn.Module, list[Case]]:
    import quantus

    net, x, y, explain = _setup(n_images, size)
    xn, yn = x.numpy(), y.numpy()

    def qexplain(model: Any, inputs: np.ndarray, targets: np.ndarray, **kw: Any) -> np.ndarray:
        return explain(torch.from_numpy(np.asarray(inputs)), torch.from_numpy(np.asarray(targets))).numpy()[:, None]

    out = []
    for name, cls in _QUANTUS.items():

        def ours(name: str = name) -> torch.Tensor:
            return getattr(R, name)(net, x, y, explain, n_samples=n_samples, generator=0, **_our_kwargs(name))

        def theirs(name: str = name, cls: str = cls) -> Any:
            np.random.seed(0)
            metric = getattr(quantus, cls)(nr_samples=n_samples, **_quantus_kwargs(name))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return metric(model=net, x_batch=xn, y_batch=yn, explain_func=qexplain, batch_size=64)

        label = f"{name} ({n_images}x3x{size}x{size}, n={n_samples})"
        out.append((label, ours, theirs, _our_calls(name, n_images, n_samples)))

    # all six scores: ours from one set of samples (robustness_scores), Quantus' six metrics one after the other
    def ours_all() -> dict[str, torch.Tensor]:
        kw = _our_kwargs("all")
        return R.robustness_scores(net, x, y, explain, R.ROBUSTNESS_SCORES, n_samples=n_samples, generator=0, **kw)

    def theirs_all() -> list[Any]:
        return [t() for _, _, t, _ in out]

    label = f"all six scores ({n_images}x3x{size}x{size}, n={n_samples})"
    out.append((label, ours_all, theirs_all, _our_calls("relative_output_stability", n_images, n_samples)))
    return net, out


def _our_calls(name: str, b: int, n: int) -> int:
    chunks = math.ceil(b * n / CHUNK)
    if name in ("max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate"):
        return 1 + chunks  # clean maps + one explain per chunk
    return 1 + 1 + 2 * chunks  # clean maps, clean forward, explain + forward per chunk


def count_forwards(model: torch.nn.Module, thunk: Callable[[], Any]) -> int:
    """Forward passes of ``model`` during ``thunk()``."""
    calls = [0]
    h = model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        thunk()
    finally:
        h.remove()
    return calls[0]


def model_calls(n_images: int = 16, size: int = 16, n_samples: int = 4) -> dict[str, tuple[int, int]]:
    """``{case: (our forward passes, Quantus' forward passes)}``, counted with :func:`count_forwards`."""
    net, cs = _build(n_images, size, n_samples)
    return {name: (count_forwards(net, ours), count_forwards(net, theirs)) for name, ours, theirs, _ in cs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--n-samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net, cs = _build(args.n_images, args.size, args.n_samples)
    print(f"{'case':<62} {'ours s':>7} {'quantus s':>9} {'ratio':>6} {'forwards ours/quantus':>22}")
    for name, ours, theirs, _ in cs:
        ours()  # warm-up
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        theirs()
        t2 = time.perf_counter()
        calls = f"{count_forwards(net, ours)}/{count_forwards(net, theirs)}"
        print(f"{name:<62} {t1 - t0:7.3f} {t2 - t1:9.3f} {(t2 - t1) / (t1 - t0):6.2f} {calls:>22}")


if __name__ == "__main__":
    main()
