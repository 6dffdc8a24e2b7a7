"""Overhead of ``fragdefense.certify.certify_attribution`` over the attribution calls it needs.

Certifying a batch (``--batch`` CIFAR-size synthetic images, ``small_cnn`` of ``--width``, ``saliency``,
``n0 = 10``, ``n = 100``, per-image seeds) needs ``n0 + n`` attribution maps per image. The **floor** is the time of
exactly those attribution calls: the same noisy images (drawn beforehand with the same per-image generators and
cut into the same chunks of ``chunk_size`` rows), the same targets, the same registered ``saliency`` spec, in eval
mode. ``certify_attribution`` adds the noise draws, the channel reduction, the top-k labels, the counting, the
binomial tests, the Clopper-Pearson bounds and the correction. Both are interleaved round-robin (``--rounds``,
alternating which runs first) after an untimed warm-up; the reported figure is the median over rounds of
certify / floor (the ratio of the medians beside it). Goal: <= 1.2.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_certify.py [--out benchmarks/results/bench_certify.json]``
(about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--n0", type=int, default=10)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_certify.json")
    args = ap.parse_args()

    from fragdefense.attributions import resolve_attribution
    from fragdefense.certify import certify_attribution
    from fragdefense.certify.smoothing import _default_chunk, _noisy_rows, _unbounded_inputs
    from fragdefense.data.synthetic import generate_synthetic
    from fragdefense.models import create_model
    from fragdefense.utils.conventions import eval_mode, make_generator

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=args.width).eval()
    x, _, _ = generate_synthetic(args.batch, size=32, seed=0)
    seeds = list(range(args.batch))
    sigma = 0.25
    chunk = args.chunk_size or _default_chunk(x)
    spec = resolve_attribution("saliency")
    with torch.no_grad():
        t = model(x).argmax(1)

    # the floor's inputs: the same noisy chunks and targets, drawn once
    chunks = []
    for start, z in _noisy_rows(x, sigma, args.n0 + args.n, chunk, make_generator(seeds, x.device)):
        img = torch.arange(start, start + z.shape[0]) % args.batch
        chunks.append((z, t[img]))
    n_calls = len(chunks)

    def run_certify() -> float:
        t0 = time.perf_counter()
        certify_attribution(model, x, "saliency", sigma=sigma, n0=args.n0, n=args.n, generator=seeds, chunk_size=chunk)
        return time.perf_counter() - t0

    def run_floor() -> float:
        t0 = time.perf_counter()
        with eval_mode(model), _unbounded_inputs():
            for z, tt in chunks:
                spec(model, z, tt)
        return time.perf_counter() - t0

    run_certify(), run_floor()  # warm-up
    cert_t, floor_t = [], []
    for r in range(args.rounds):
        if r % 2 == 0:
            cert_t.append(run_certify())
            floor_t.append(run_floor())
        else:
            floor_t.append(run_floor())
            cert_t.append(run_certify())
    ratios = [c / f for c, f in zip(cert_t, floor_t)]
    med = statistics.median(ratios)
    ratio_of_medians = statistics.median(cert_t) / statistics.median(floor_t)
    print(
        f"certify {args.batch} images x {args.n0 + args.n} samples (small_cnn width {args.width}, saliency, "
        f"{n_calls} attribution calls of <= {chunk} rows): median certify {statistics.median(cert_t):.3f} s, "
        f"floor {statistics.median(floor_t):.3f} s"
    )
    print(
        f"ratio certify / floor: median over {args.rounds} rounds {med:.3f} "
        f"(ratio of medians {ratio_of_medians:.3f}); goal <= 1.2"
    )
    payload = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_average_end": os.getloadavg()[0],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "settings": {
            "batch": args.batch,
            "width": args.width,
            "n0": args.n0,
            "n": args.n,
            "sigma": sigma,
            "chunk_size": chunk,
            "attribution_calls": n_calls,
            "rounds": args.rounds,
            "method": "saliency",
        },
        "certify_seconds": cert_t,
        "floor_seconds": floor_t,
        "ratios": ratios,
        "median_ratio": med,
        "ratio_of_medians": ratio_of_medians,
        "goal": 1.2,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
