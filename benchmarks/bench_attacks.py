"""Benchmark of the interpretation attacks (Ghorbani et al.'s top-k attack on saliency maps).

1. Cost of one attack iteration relative to the algorithm's floor — one forward plus one double-backward
   of the same batch through the softplus surrogate (``grad_x D(map(x))``) — with the label/criterion check
   on the original network every step (``check_every=1``, as the authors) and every 5 steps.
2. The any-network surrogate (:func:`fragdefense.models.softplus_surrogate`, every ReLU call smoothed by a
   torch function mode) against the module-swap surrogate (:func:`fragdefense.models.to_softplus`, only
   ``nn.ReLU`` modules), one attack iteration each on the same model and batch, timed round-robin
   (goal: <= 1.05x).
3. Attacking 64 images as one batch versus looping the same attack over single images (how the authors'
   single-image code runs).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attacks.py`` (ratios are measured in one run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import fragdefense.attacks.interpretation as interp
from fragdefense.attacks import attack_interpretation
from fragdefense.attributions import attribute, to_map
from fragdefense.models import create_model, softplus_surrogate, to_softplus


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timeit(fn: Callable[[], object], repeat: int = 3) -> float:
    fn()  # warm-up
    return statistics.median(_time(fn) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds for the per-iteration ratio")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = create_model("small_cnn", num_classes=10, width=32).eval()
    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        c = model(x).argmax(1)
    sur = softplus_surrogate(model, 10.0)
    bmask = torch.zeros(64, 32 * 32)
    bmask[:, :100] = 1
    bmask = bmask.view(64, 32, 32)

    def floor_step() -> None:
        xg = x.detach().requires_grad_(True)
        m = to_map(attribute("saliency", sur, xg, c, create_graph=True))
        torch.autograd.grad(-(m * bmask).sum(), xg)

    n_floor = 10

    def floor() -> None:
        for _ in range(n_floor):
            floor_step()

    def attack(steps: int, check_every: int, xb: torch.Tensor = x) -> None:
        attack_interpretation(
            model,
            xb,
            attack="topk",
            eps=8 / 255,
            step_size=1 / 255,
            steps=steps,
            k=100,
            beta=10.0,
            check_every=check_every,
        )

    # Round-robin: every round times the floor and each attack length once, so a load change on a shared
    # machine hits all of them alike; each ratio is formed within a round and the median over rounds is shown.
    floor()  # warm-up
    attack(5, 1)
    t_floor_r: list[float] = []
    per_it: dict[int, list[float]] = {1: [], 5: []}
    ratio: dict[int, list[float]] = {1: [], 5: []}
    for _ in range(args.rounds):
        tf = _time(floor) / n_floor
        t_floor_r.append(tf)
        for ce in (1, 5):
            t_lo = _time(lambda ce=ce: attack(5, ce))
            t_hi = _time(lambda ce=ce: attack(25, ce))
            it = (t_hi - t_lo) / 20
            per_it[ce].append(it)
            ratio[ce].append(it / tf)
    t_floor = statistics.median(t_floor_r)
    rows = [(ce, statistics.median(per_it[ce]), ratio[ce]) for ce in (1, 5)]

    # any-network (function mode) vs module-swap surrogate: the same attack, only the surrogate differs
    mode_factory = interp._make_surrogate

    def swap_factory(m: torch.nn.Module, beta: float) -> torch.nn.Module:
        return to_softplus(m, beta)

    sur_it: dict[str, list[float]] = {"function mode": [], "module swap": []}
    sur_ratio: list[float] = []
    for _ in range(args.rounds):
        its = {}
        for name, fac in (("module swap", swap_factory), ("function mode", mode_factory)):
            interp._make_surrogate = fac
            try:
                t_lo = _time(lambda: attack(5, 1))
                t_hi = _time(lambda: attack(25, 1))
            finally:
                interp._make_surrogate = mode_factory
            its[name] = (t_hi - t_lo) / 20
            sur_it[name].append(its[name])
        sur_ratio.append(its["function mode"] / its["module swap"])

    steps = 10
    t_batch = timeit(lambda: attack(steps, 1), repeat=1)
    n_loop = 16  # loop over 16 single images and scale to 64 (a full loop takes minutes)
    t_loop16 = timeit(lambda: [attack(steps, 1, x[i : i + 1]) for i in range(n_loop)], repeat=1)
    t_loop = t_loop16 * 64 / n_loop

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; small_cnn width 32, 64 images 3x32x32, "
        "saliency, top-k attack, k=100"
    )
    print(f"floor: forward + double-backward of the batch = {1000 * t_floor:.1f} ms (median of {args.rounds} rounds)")
    print(f"{'setting':40s} {'ms / iteration':>15s} {'x floor':>8s}  {'range over rounds':>18s}  goal <= 1.3x")
    for ce, it, rs in rows:
        spread = f"{min(rs):.2f}-{max(rs):.2f}"
        name = f"attack iteration, check_every={ce}"
        print(f"{name:40s} {1000 * it:15.1f} {statistics.median(rs):8.2f}  {spread:>18s}")
    print("\nany-network surrogate vs module-swap surrogate (one iteration, check_every=1):")
    for name, v in sur_it.items():
        print(f"  {name:14s} {1000 * statistics.median(v):8.1f} ms / iteration")
    print(
        f"  ratio function mode / module swap: {statistics.median(sur_ratio):.3f} "
        f"(range {min(sur_ratio):.3f}-{max(sur_ratio):.3f} over {args.rounds} rounds)   goal <= 1.05x"
    )
    print(f"\nbatched vs per-image loop ({steps} iterations, check_every=1):")
    print(f"  64 images as one batch: {t_batch:.2f} s")
    print(f"  loop over single images: {t_loop:.2f} s (measured on {n_loop} images, scaled to 64)")
    print(f"  speed-up: {t_loop / t_batch:.1f}x   goal >= 10x")


if __name__ == "__main__":
    main()
