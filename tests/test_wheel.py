"""A built wheel, installed outside the repository, runs every command with its packaged configs.

The wheel is built from a copy of the package sources, installed with ``--no-deps`` into a fresh venv whose
dependencies (torch, lightning, hydra, ...) come from the running interpreter's site-packages through a ``.pth``
file, so nothing heavy is installed twice. The fresh venv's own site-packages comes first on ``sys.path`` and the
running environment's ``.pth`` files (an editable install's import hook among them) are not processed there, so
the commands import the wheel's copy of ``fragdefense``: a config missing from the wheel makes them fail.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout (bin/)")

TRAIN = [
    "data.n_train=160",
    "data.n_test=64",
    "data.batch_size=32",
    "data.probe_size=8",
    "model.width=4",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]
# Tiny jobs of the other commands on the trained checkpoint (the synthetic data is built in: no download).
EVAL = [
    "device=cpu",
    "data.n_train=32",
    "data.n_test=32",
    "n_images=8",
    "batch_size=8",
    "methods={saliency:{}}",
    "attacks=[topk]",
    "eps=[8/255]",
    "protocol.steps=2",
    "protocol.k=20",
    "figures=false",
]
INFLUENCE = [
    "device=cpu",
    "data.n_train=200",
    "data.n_test=60",
    "classes=[0,1]",
    "n_train=20",
    "n_test=3",
    "figures=false",
]
HESSIAN = [
    "device=cpu",
    "data.n_train=32",
    "data.n_test=32",
    "n_images=4",
    "batch_size=4",
    "param.n_samples=8",
    "param.lanczos_iters=5",
    "param.trace_matvecs=3",
    "param.density_iters=4",
    "param.density_runs=1",
    "directions.radii=[0.5]",
    "directions.n_random=1",
    "directions.max_iter=5",
    "beta_sweep.betas=[10]",
    "beta_sweep.objectives=[logit]",
    "beta_sweep.max_iter=5",
    "fragility.steps=2",
    "fragility.k=20",
    "fragility.max_iter=5",
    "figures=false",
]


def _copy_sources(dst: Path) -> None:
    """What the wheel is built from: pyproject.toml, README.md and the package (the working tree's state)."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "fragdefense", dst / "fragdefense", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel file, venv directory) with the wheel installed into the fresh venv."""
    try:
        from setuptools.command import bdist_wheel  # noqa: F401 - in setuptools itself since 70.1
    except ImportError:
        pytest.fail("building the wheel needs setuptools>=70.1 in this environment (pip install -e '.[dev]')")
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FRAGDEFENSE_CONFIG_DIR")}
    src = root / "src"
    _copy_sources(src)
    dist = root / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        root,
        env,
    )
    (whl,) = dist.glob("fragdefense-*.whl")

    venv = root / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    py = venv / "bin" / "python"
    purelib = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).stdout.strip()
    )
    # The dependencies (and pip) resolve from the running environment's site-packages, *after* the venv's own.
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        parents.append(site.getusersitepackages())
    (purelib / "_fragdefense_parent_env.pth").write_text("\n".join(parents) + "\n")
    # --ignore-installed: the running environment's fragdefense is visible but must be neither reused nor uninstalled.
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(whl)], root, env)
    return whl, venv


def test_wheel_ships_every_config(wheel_venv):
    whl, _ = wheel_venv
    want = {p.relative_to(REPO).as_posix() for p in (REPO / "fragdefense" / "configs").rglob("*.yaml")}
    assert len(want) > 10 and "fragdefense/configs/train.yaml" in want
    with zipfile.ZipFile(whl) as z:
        shipped = {n for n in z.namelist() if n.endswith(".yaml")}
    assert not want - shipped, f"configs missing from the wheel: {sorted(want - shipped)}"


def test_every_command_runs_from_the_wheel(wheel_venv, tmp_path):
    _, venv = wheel_venv
    bin_ = venv / "bin"
    work = tmp_path / "work"  # not the repository: nothing may be found relative to the working directory
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FRAGDEFENSE_CONFIG_DIR")}
    env.update(WANDB_MODE="offline", PYTHONDONTWRITEBYTECODE="1")

    where = _run([str(bin_ / "python"), "-c", "import fragdefense; print(fragdefense.__file__)"], work, env).stdout
    assert Path(where.strip()).resolve().is_relative_to(venv.resolve()), f"imported {where.strip()}, not the wheel"

    t0 = time.perf_counter()
    _run([str(bin_ / "fragdefense-train"), *TRAIN, f"hydra.run.dir={work / 'train'}"], work, env)
    assert json.loads((work / "train" / "metrics.json").read_text())
    hydra_cfg = (work / "train" / ".hydra" / "hydra.yaml").read_text()
    assert str(venv / "lib") in hydra_cfg, "fragdefense-train composed its config from outside the wheel"
    ckpt = work / "train" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    # The three analysis commands on the checkpoint, side by side (each is mostly start-up time).
    jobs = {
        "eval": [str(bin_ / "fragdefense-eval"), f"checkpoint={ckpt}", *EVAL],
        "influence": [str(bin_ / "fragdefense-influence"), f"checkpoint={ckpt}", *INFLUENCE],
        "hessian": [str(bin_ / "fragdefense-hessian"), f"checkpoint={ckpt}", *HESSIAN],
    }
    procs = {
        name: subprocess.Popen(
            [*cmd, f"hydra.run.dir={work / name}"],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, cmd in jobs.items()
    }
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"fragdefense-{name} failed:\n{out[-2000:]}\n{err[-3000:]}"
        assert json.loads((work / name / "results.json").read_text()), name
    print(f"commands from the wheel: {time.perf_counter() - t0:.1f} s")
