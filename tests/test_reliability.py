"""Reliability: a training run killed with SIGKILL and relaunched with the same command resumes from its last
checkpoint and ends with bitwise the same weights and metrics as an uninterrupted run; W&B continues the same
run id; determinism of seeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = [
    "data.n_train=640",
    "data.n_test=64",
    "data.batch_size=32",
    "data.probe_size=8",
    "model.width=8",
    "trainer.max_epochs=6",
    "trainer.enable_progress_bar=false",
    "~callbacks.fragility",
    "~callbacks.progress_bar",
]


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fragdefense.cli.train", *TINY, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.timeout(600)
def test_sigkill_and_relaunch_resumes_to_identical_weights(tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(_cmd(ref_dir), env=_env(), check=True, capture_output=True, timeout=300)

    # a crashed job dies with its whole process tree (as under a scheduler or the OOM killer): W&B's service too
    proc = subprocess.Popen(
        _cmd(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.05)  # somewhere inside the second epoch
    assert proc.poll() is None, "the run finished before it could be killed; make the tiny run longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)  # the checkpoint on disk is whole
    assert killed_at["epoch"] < 5
    print("killed after checkpoint of epoch", killed_at["epoch"], "step", killed_at["global_step"])

    out = subprocess.run(_cmd(run_dir), env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stderr + out.stdout

    ref_w, res_w = _weights(ref_dir / "checkpoints" / "last.ckpt"), _weights(last)
    assert ref_w.keys() == res_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], res_w[k]), f"{k} differs after resume"
    ref_m = json.loads((ref_dir / "metrics.json").read_text())
    res_m = json.loads((run_dir / "metrics.json").read_text())
    assert ref_m["test"] == res_m["test"]
    assert ref_m["global_step"] == res_m["global_step"]
    # W&B continued the same run id instead of starting a new one
    assert res_m["wandb"]["id"] == (run_dir / "wandb_id.txt").read_text().strip()
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # (a start that found the id still held by the killed run's service leaves an extra directory of the same run)
    assert len(runs) >= 2 and all(r.endswith(res_m["wandb"]["id"]) for r in runs)


# ---------------------------------------------------------------- determinism


def _eval_cfg(tmp_path: Path, weights: Path, seed: int, out: str):
    from fragdefense.cli._config import compose_config

    return compose_config(
        "eval",
        [
            f"out_dir={tmp_path / out}",
            "model_name=small_cnn",
            f"weights_path={weights}",
            "+model_kwargs.width=8",
            f"seed={seed}",
            "n_images=8",
            "batch_size=8",
            "attacks=[random_sign,topk]",
            "eps=[8/255]",
            "methods={saliency:{}}",
            "protocol.steps=3",
            "protocol.k=40",
            "protocol.random_start=true",
            "data.n_train=32",
            "data.n_test=64",
            "figures=false",
        ],
    )


def test_eval_same_seed_identical_different_seed_differs(tmp_path):
    from fragdefense.cli.evaluate import evaluate
    from fragdefense.models import create_model

    torch.manual_seed(0)
    w = tmp_path / "w.pt"
    torch.save(create_model("small_cnn", num_classes=10, width=8).state_dict(), w)
    # the labels are the model's own predictions only through the data; use all images the model gets right
    a = evaluate(_eval_cfg(tmp_path, w, 0, "a"))
    b = evaluate(_eval_cfg(tmp_path, w, 0, "b"))
    c = evaluate(_eval_cfg(tmp_path, w, 1, "c"))

    def strip(p):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in p["records"]]

    assert strip(a) == strip(b) and a["per_image"] == b["per_image"]
    assert a["image_indices"] != c["image_indices"]


# ---------------------------------------------------------------- offline operation


def test_offline_wandb_auto_mode_and_download_fail_fast(tmp_path, monkeypatch):
    from fragdefense.data import CIFAR10DataModule
    from fragdefense.lit import make_loggers
    from fragdefense.lit.loggers import resolve_wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    t0 = time.perf_counter()
    assert resolve_wandb_mode("auto") == "offline"  # no key (and, on this machine, no network)
    loggers = make_loggers(tmp_path, wandb={"project": "t", "mode": "auto"})
    run = loggers[-1].experiment
    assert run.offline
    run.log({"x": 1.0})
    run.finish()
    assert time.perf_counter() - t0 < 10.0, "W&B offline start-up must not hang"

    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        CIFAR10DataModule(root=str(tmp_path / "cifar"), download=True).setup("fit")
    assert time.perf_counter() - t0 < 10.0, "an offline download must fail, not hang"


# ---------------------------------------------------------------- soak


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) to read the RSS")
def test_twenty_attack_evaluations_do_not_grow_memory():
    import gc

    from fragdefense.attacks import attack_interpretation
    from fragdefense.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=16).eval()
    x = torch.rand(16, 3, 32, 32)
    y = model(x).argmax(1)

    def one() -> None:
        res = attack_interpretation(
            model, x, y, attack="topk", method="integrated_gradients", method_opts={"steps": 4}, steps=3, k=50
        )
        res.summary()

    for _ in range(3):  # warm-up: allocator pools, lazy imports
        one()
    gc.collect()
    before = _rss_mb()
    for _ in range(20):
        one()
    gc.collect()
    after = _rss_mb()
    assert after < 1.05 * before, f"RSS grew from {before:.0f} MB to {after:.0f} MB over 20 evaluations"
