"""Extra cost of one training step with each regularizer, relative to plain training.

Same model (``small_cnn``, width 32, CIFAR-10 shapes), same batch (128 random 32x32 images, seeded), same
optimizer (SGD); one step = :func:`fragdefense.regularizers.regularized_loss` (exactly what
``ClassifierModule.training_step`` computes) + ``backward`` + ``optimizer.step``. Each regularizer runs
with its config-file defaults (``fragdefense/configs/regularizer/<name>.yaml``). Steps are timed interleaved
(round-robin over the regularizers, ``--repeat`` rounds after a warm-up round) and the median is reported,
so a background load affects all rows alike. Goals: ``input_grad`` <= 3x, ``pgd_at`` (7 steps) <= 9x.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_regularizers.py [--batch 128 --repeat 5]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from hydra.utils import instantiate

from fragdefense.cli._config import compose_config
from fragdefense.models import create_model
from fragdefense.regularizers import list_regularizers, regularized_loss

GOALS = {"input_grad": 3.0, "pgd_at": 9.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="regularizer names (default: all + pgd_at_igr)")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    args = ap.parse_args()

    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    names = args.only or [*list_regularizers(), "pgd_at_igr"]
    setups: dict[str, tuple] = {}
    for name in ["none", *names]:
        model = create_model("small_cnn", num_classes=10)
        reg = None
        if name != "none":
            reg = instantiate(compose_config("train", [f"regularizer={name}"]).regularizer, _convert_="all")
            model = reg.prepare_model(model)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        setups[name] = (model, reg, opt)

    def step(name: str) -> float:
        model, reg, opt = setups[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = regularized_loss(model, reg, x, y, epoch=100.0)
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in setups}
    for r in range(args.repeat + 1):
        for n in setups:
            t = step(n)
            if r > 0:
                times[n].append(t)
    base = statistics.median(times["none"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"small_cnn, batch {args.batch}, median of {args.repeat} interleaved steps; plain step = {base * 1e3:.0f} ms")
    print(f"{'regularizer':<14}{'ms/step':>10}{'x plain':>10}{'goal':>8}")
    rows = []
    for n, ts in times.items():
        med = statistics.median(ts)
        goal = GOALS.get(n)
        verdict = "" if goal is None else ("met" if med / base <= goal else "MISSED")
        print(f"{n:<14}{med * 1e3:>10.0f}{med / base:>10.2f}{(f'<={goal:g}x' if goal else ''):>8} {verdict}")
        rows.append({"regularizer": n, "ms_per_step": med * 1e3, "ratio": med / base, "goal": goal})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "repeat": args.repeat, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
