"""Benchmark of the interpretation attacks (issue: attacks on interpretations).

1. Cost of one attack iteration relative to the algorithm's floor — one forward plus one double-backward
   of the same batch through the softplus surrogate (``grad_x D(map(x))``) — with the label/criterion check
   on the original network every step (``check_every=1``, as the authors) and every 5 steps.
2. Attacking 64 images as one batch versus looping the same attack over single images (how the authors'
   single-image code runs).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attacks.py`` (ratios are measured in one run).
"""

from __future__ import annotations

import time

import torch

from fragdefense.attacks import attack_interpretation
from fragdefense.attributions import attribute, to_map
from fragdefense.models import create_model, to_softplus


def timeit(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = create_model("small_cnn", num_classes=10, width=32).eval()
    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        c = model(x).argmax(1)
    sur = to_softplus(model, 10.0).eval()
    bmask = torch.zeros(64, 32 * 32)
    bmask[:, :100] = 1
    bmask = bmask.view(64, 32, 32)

    def floor_step() -> None:
        xg = x.detach().requires_grad_(True)
        m = to_map(attribute("saliency", sur, xg, c, create_graph=True))
        torch.autograd.grad(-(m * bmask).sum(), xg)

    n_floor = 10
    t_floor = timeit(lambda: [floor_step() for _ in range(n_floor)]) / n_floor

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

    rows = []
    for ce in (1, 5):
        t_lo = timeit(lambda ce=ce: attack(5, ce))
        t_hi = timeit(lambda ce=ce: attack(25, ce))
        per_it = (t_hi - t_lo) / 20
        rows.append((ce, per_it, per_it / t_floor))

    steps = 10
    t_batch = timeit(lambda: attack(steps, 1), repeat=1)
    n_loop = 16  # loop over 16 single images and scale to 64 (a full loop takes minutes)
    t_loop16 = timeit(lambda: [attack(steps, 1, x[i : i + 1]) for i in range(n_loop)], repeat=1)
    t_loop = t_loop16 * 64 / n_loop

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; small_cnn width 32, 64 images 3x32x32, "
        "saliency, top-k attack, k=100"
    )
    print(f"floor: forward + double-backward of the batch = {1000 * t_floor:.1f} ms")
    print(f"{'setting':40s} {'ms / iteration':>15s} {'x floor':>8s}  goal <= 1.3x")
    for ce, per_it, ratio in rows:
        print(f"{f'attack iteration, check_every={ce}':40s} {1000 * per_it:15.1f} {ratio:8.2f}")
    print(f"\nbatched vs per-image loop ({steps} iterations, check_every=1):")
    print(f"  64 images as one batch: {t_batch:.2f} s")
    print(f"  loop over single images: {t_loop:.2f} s (measured on {n_loop} images, scaled to 64)")
    print(f"  speed-up: {t_loop / t_batch:.1f}x   goal >= 10x")


if __name__ == "__main__":
    main()
