"""Influence of N = 10 000 training points on T = 100 test points through the last layer of one model:
fragdefense (:class:`~fragdefense.influence.LastLayerInfluence`, and the generic torch.func path
:class:`~fragdefense.influence.ParameterInfluence` with the exact solver) against captum's
``captum.influence.NaiveInfluenceFunction`` restricted to the same layer (``layers=["head"]``).

Model: ``Linear(in_dim, feat_dim) - ReLU - Linear(feat_dim, classes)`` ("head"), trained briefly on a synthetic
teacher task (small features so that captum's explicit Hessian is feasible: P = classes * (feat_dim + 1)).
Both sides compute the same quantity: captum's score is ``grad L_test^T (H_sum + hessian_reg I)^-1 grad L_train``
with ``H_sum`` the Hessian of the *summed* loss, so ``hessian_reg = N * damping`` and captum = ``-I / N``;
``projection_dim = P`` keeps every eigen-direction (the naive method's low-rank projection is then exact).

fragdefense computes in float64; captum runs twice, in float64 (the reference: same precision, so the ranks of
the many near-zero scores of well-classified training points agree) and in float32 (its default; faster, but
float32 rounding reorders those near-zero scores, which lowers its rank correlation with any float64 result).

Each method runs in its own child process (``--worker``) so that its peak memory is its own: the peak RSS
(``VmHWM``, reset to the current RSS just before the timed call via ``/proc/self/clear_refs``) minus that RSS.
After a warm-up call on 200 points (which loads the BLAS / LAPACK kernels), the time covers everything from the
model and data in memory to the ``(T, N)`` score matrix (features, per-sample gradients, Hessian, solve).
The scores are compared by rank correlation per test point (must be >= 0.99).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_influence.py`` (``--n-train 2000`` for a quick run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _model(in_dim: int, feat_dim: int, classes: int) -> nn.Module:
    net = nn.Sequential()
    net.add_module("body", nn.Linear(in_dim, feat_dim))
    net.add_module("relu", nn.ReLU())
    net.add_module("head", nn.Linear(feat_dim, classes))
    return net


def _prepare(args: argparse.Namespace, tmp: Path) -> None:
    torch.manual_seed(0)
    n, t = args.n_train, args.n_test
    x = torch.randn(n + t, args.in_dim)
    teacher = torch.randn(args.in_dim, args.classes)
    y = (x @ teacher + 0.5 * torch.randn(n + t, args.classes)).argmax(1)
    net = _model(args.in_dim, args.feat_dim, args.classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(net(x[:n]), y[:n]).backward()
        opt.step()
    torch.save(net.state_dict(), tmp / "model.pt")
    torch.save({"x": x[:n], "y": y[:n], "xt": x[n:], "yt": y[n:]}, tmp / "data.pt")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(method: str, args: argparse.Namespace, tmp: Path) -> None:
    torch.set_num_threads(args.threads)
    net = _model(args.in_dim, args.feat_dim, args.classes)
    net.load_state_dict(torch.load(tmp / "model.pt"))
    net.eval()
    data = torch.load(tmp / "data.pt")
    x, y, xt, yt = data["x"], data["y"], data["xt"], data["yt"]
    if method.startswith("captum"):
        from captum.influence import NaiveInfluenceFunction  # noqa: F401 - import outside the timed region
    else:
        from fragdefense.influence import LastLayerInfluence, ParameterInfluence, features_and_logits  # noqa: F401
    if method.endswith("64"):
        net = net.double()
        x, xt = x.double(), xt.double()

    def run(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if method == "fragdefense":
            with torch.no_grad():
                phi, _ = features_and_logits(net, x)
                phit, _ = features_and_logits(net, xt)
            inf = LastLayerInfluence(net.head.weight, net.head.bias, damping=args.damping).fit(phi, y)
            return -inf.influence(phit, yt)  # captum's sign
        if method == "fragdefense_func":
            inf = ParameterInfluence(net, params="head", damping=args.damping, solver="exact", dtype=torch.float64)
            return -inf.fit(x, y).influence(xt, yt)
        from captum.influence import NaiveInfluenceFunction
        from torch.utils.data import DataLoader, TensorDataset

        tif = NaiveInfluenceFunction(
            net,
            DataLoader(TensorDataset(x, y), batch_size=args.captum_batch),
            checkpoint=str(tmp / "model.pt"),
            checkpoints_load_func=lambda m, path: 1.0,  # the weights are loaded above (float64 for captum64)
            layers=["head"],
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=args.captum_batch,
            projection_dim=args.classes * (args.feat_dim + 1),
            hessian_reg=n * args.damping,
            hessian_inverse_tol=1e-12,
        )
        return tif.influence((xt, yt)) * n

    run(x[:200], y[:200], xt[:5], yt[:5])  # warm-up: loads BLAS / LAPACK kernels, so they are not counted
    _reset_peak_rss()
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    scores = run(x, y, xt, yt)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb() - base
    torch.save(scores.double(), tmp / f"scores_{method}.pt")
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=10_000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--in-dim", type=int, default=32)
    ap.add_argument("--feat-dim", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--captum-batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args, Path(args.tmp))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _prepare(args, tmp)
        p = args.classes * (args.feat_dim + 1)
        print(
            f"# influence of {args.n_train} training points on {args.n_test} test points, last layer "
            f"({args.feat_dim} features x {args.classes} classes + bias = {p} parameters), damping {args.damping}"
        )
        print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
        res = {}
        for m in ("fragdefense", "fragdefense_func", "captum64", "captum"):
            cmd = [sys.executable, __file__, "--worker", m, "--tmp", d] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit(f"worker {m} failed")
            res[m] = json.loads(out.stdout.strip().splitlines()[-1])
            res[m]["scores"] = torch.load(tmp / f"scores_{m}.pt")
        from fragdefense.metrics.functional import spearman

        ref = res["captum64"]["scores"]
        print(
            f"{'method':<40} {'time (s)':>9} {'peak RSS (MB)':>14} {'speed-up':>9} "
            f"{'Spearman vs captum float64 (mean/min)':>39}"
        )
        for m, label in (
            ("captum64", "captum NaiveInfluenceFunction float64"),
            ("captum", "captum NaiveInfluenceFunction float32"),
            ("fragdefense", "fragdefense LastLayerInfluence"),
            ("fragdefense_func", "fragdefense ParameterInfluence"),
        ):
            r = res[m]
            rho = spearman(r["scores"], ref)
            rel = float((r["scores"] - ref).abs().max() / ref.abs().max())
            print(
                f"{label:<40} {r['seconds']:>9.3f} {r['peak_rss_mb']:>14.1f} "
                f"{res['captum64']['seconds'] / r['seconds']:>8.1f}x "
                f"{float(rho.mean()):>16.5f} / {float(rho.min()):.5f}"
                f"  (max rel. diff {rel:.1e})"
            )
        ours, c64, c32 = res["fragdefense"], res["captum64"], res["captum"]
        print(
            f"ratios (one run): LastLayerInfluence is {c64['seconds'] / ours['seconds']:.1f}x faster than captum "
            f"float64 (same precision) and {c32['seconds'] / ours['seconds']:.1f}x faster than captum float32; peak "
            f"memory {ours['peak_rss_mb']:.1f} MB vs {c64['peak_rss_mb']:.1f} / {c32['peak_rss_mb']:.1f} MB"
        )


if __name__ == "__main__":
    main()
