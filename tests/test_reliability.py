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
    "data.n_train=320",
    "data.n_test=64",
    "data.batch_size=32",
    "data.probe_size=8",
    "model.width=8",
    "trainer.max_epochs=3",
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

    proc = subprocess.Popen(_cmd(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere inside the second epoch
    assert proc.poll() is None, "the run finished before it could be killed; make the tiny run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)  # the checkpoint on disk is whole
    assert killed_at["epoch"] < 2
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
    assert len(runs) == 2 and all(r.endswith(res_m["wandb"]["id"]) for r in runs)
