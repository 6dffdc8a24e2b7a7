"""Runtime of robust accuracy on 64 CIFAR-size (32x32) images with ``small_cnn`` on this machine: AutoAttack's
standard version (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks": APGD-CE, APGD-T, FAB-T at 100 iterations, Square at 5000 queries) and the project's PGD.

The model is trained briefly on the synthetic 10-class images (a realistic, non-robust network: AutoAttack's cost
depends on how many images survive its first attack - the later ones only run on those).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_robust_accuracy.py [--steps 100] [--n 64]``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fragdefense.attacks.robust_accuracy import robust_accuracy
from fragdefense.data.synthetic import generate_synthetic
from fragdefense.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="None: each attack's published default")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--attacks", default="pgd,autoattack")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    x, y, _ = generate_synthetic(2048, 32, seed=0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    t = time.perf_counter()
    for i in range(args.train_steps):
        sl = slice((i * 64) % 2048, (i * 64) % 2048 + 64)
        loss = F.cross_entropy(model(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"trained {args.train_steps} steps in {time.perf_counter() - t:.1f} s, last loss {loss.item():.3f}")
    model.eval()
    xt, yt, _ = generate_synthetic(args.n, 32, seed=1)
    for attack in args.attacks.split(","):
        t = time.perf_counter()
        r = robust_accuracy(model, xt, yt, attack=attack, eps=args.eps, steps=args.steps, seed=0)
        dt = time.perf_counter() - t
        print(f"{attack:>10}: {dt:7.1f} s  {r.summary()}", flush=True)


if __name__ == "__main__":
    main()
