"""The ImageNet path, exercised at 224 x 224 on the CPU: ``data=imagenet`` (streamed ImageFolder, resize 256,
centre crop 224, random-resized training crops, ``val/`` test split) with the two ImageNet architectures,
``squeezenet1_1`` (the model of Ghorbani et al.) and ``resnet50``. For each model:

(a) one training step through ``fragdefense-train`` (``python -m fragdefense.cli.train`` with Hydra overrides,
    W&B offline, the default light FragilityMonitor cut to 2 probe images and 2 attack steps);
(b) a FragilityMonitor evaluation on 2 images at 224: the callback of (a) on the probe set, and
    ``FragilityMonitor.evaluate`` called directly on the checkpoint's model with the model's own predictions as
    labels (so both images are attacked whatever the one-step model predicts);
(c) ``fragdefense-eval`` end to end on the checkpoint: 1 method (saliency), 1 attack (top-k, 2 steps), 1 eps
    (8/255), the 6 images of the tiny ``val/`` split in batches of 2. (Not 2 images: eval attacks only correctly
    classified images, and the one-step squeezenet1_1 predicts one class for every image, so the 2 images drawn
    with seed 0, of the two other classes, left nothing to attack; with all 6, 2 are attacked.)

Memory: every command runs in its own process (started from a small launcher interpreter, see ``_LAUNCHER``),
and its peak RSS (``ru_maxrss``: the process and the descendants it waited for, not W&B's detached service) must
stay under ``PEAK_RSS_MB`` (the direct ``FragilityMonitor.evaluate`` of (b) runs in the test process and is not
bounded). Measured on the 2-core / 24 GB CPU machine (torch 2.14, CPU), with the CIFAR-derived
and with the synthetic tree alike: squeezenet1_1 train 1.04 GB, eval 1.12 GB; resnet50 train 1.62 GB, eval
1.75-1.77 GB. The bounds, about 30 % above the larger of the two: squeezenet1_1 1.5 GB, resnet50 2.3 GB.

Runtime on that machine: the whole file takes about 60-70 s (squeezenet1_1 about 20 s, resnet50 about 35 s, the
JPEG tree and pytest start-up the rest), so nothing here is marked ``slow``.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fragdefense.callbacks import FragilityMonitor
from fragdefense.models import load_checkpoint_model

MODELS = ("squeezenet1_1", "resnet50")
#: peak RSS bound of each command's process, MB (see the module docstring for the measured figures)
PEAK_RSS_MB = {"squeezenet1_1": 1500, "resnet50": 2300}
N_CLASSES = 3
N_TRAIN_PER_CLASS = 6  # 18 training images: 4 go to validation (val_fraction=0.2), 14 train
N_VAL_PER_CLASS = 2  # the `val/` split (data=imagenet uses test_split=val): 6 images
SIDE = 224
TIMEOUT_S = 600

# the ImageNet data config, made tiny: no worker processes, no pinned memory, batches of 2, a 2-image probe
DATA = [
    "data=imagenet",
    f"data.num_classes={N_CLASSES}",
    "data.num_workers=0",
    "data.pin_memory=false",
]


@dataclass
class TinyImageNet:
    root: Path
    source: str  # "cifar10-jpeg" (upsampled real images) or "synthetic" (random JPEGs)


def _cifar_root() -> Path | None:
    root = os.environ.get("FRAGDEFENSE_CIFAR10_JPEG")
    if root and (Path(root) / "train").is_dir() and (Path(root) / "test").is_dir():
        return Path(root)
    return None


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> TinyImageNet:
    """A 224 x 224 ImageFolder tree ``train/<class>/*.jpg`` + ``val/<class>/*.jpg`` of 3 classes.

    With ``$FRAGDEFENSE_CIFAR10_JPEG`` set (``.ci/run`` sets it): real CIFAR-10 images of the first 3 classes
    (6 training images per class from ``train/``, 2 validation images per class from ``test/``), upsampled from
    32 x 32 to 224 x 224 with PIL (bicubic). Without it: random-noise JPEGs with a class-dependent tint, so the
    test still runs (it is never skipped). ``source`` says which was used (also printed, and recorded as the
    ``data_source`` property of every test)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_imagenet")
    cifar = _cifar_root()
    if cifar is not None:
        classes = sorted(p.name for p in (cifar / "train").iterdir() if p.is_dir())[:N_CLASSES]
        for split, src_split, n in (("train", "train", N_TRAIN_PER_CLASS), ("val", "test", N_VAL_PER_CLASS)):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                files = sorted((cifar / src_split / c).glob("*.jpg"))[:n]
                assert len(files) == n, f"{cifar / src_split / c} holds fewer than {n} JPEGs"
                for i, f in enumerate(files):
                    with Image.open(f) as im:
                        im.convert("RGB").resize((SIDE, SIDE), Image.BICUBIC).save(
                            root / split / c / f"{i:04d}.jpg", quality=90
                        )
        source = "cifar10-jpeg"
    else:
        rng = random.Random(0)
        g = torch.Generator().manual_seed(0)
        for split, n in (("train", N_TRAIN_PER_CLASS), ("val", N_VAL_PER_CLASS)):
            for ci in range(N_CLASSES):
                c = f"class{ci}"
                (root / split / c).mkdir(parents=True)
                tint = torch.tensor([0.3 + 0.2 * ci, 0.5, 0.7 - 0.2 * ci]).view(3, 1, 1)
                for i in range(n):
                    img = (tint + 0.25 * torch.randn(3, SIDE, SIDE, generator=g)).clamp(0, 1)
                    arr = (img * 255).round().byte().permute(1, 2, 0).numpy()
                    Image.fromarray(arr).save(root / split / c / f"{i:04d}.jpg", quality=rng.choice((85, 90, 95)))
        source = "synthetic"
    print(f"tiny ImageNet tree ({source}) at {root}")
    return TinyImageNet(root, source)


@dataclass
class Proc:
    returncode: int
    output: str
    peak_rss_mb: float
    seconds: float


# Runs the command as its own child and writes the child's peak RSS (KB) to argv[1]. A child's ru_maxrss starts
# from the RSS of the process that forked it (Linux records the pre-exec address space's high-water mark), so the
# command is started from this small interpreter rather than from the test process (about 2 GB after the
# in-process resnet50 evaluation), whose own size would otherwise be reported.
_LAUNCHER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(r.returncode)"
)


def _run(args: list[str], log: Path) -> Proc:
    """Run ``python <args>`` with W&B offline; returns its exit code, output, peak RSS (``ru_maxrss`` of the
    process and of the descendants it waited for; not W&B's detached service) and wall time."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_WAIT_POLICY": "PASSIVE"}
    rss_file = log.with_suffix(".maxrss")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(rss_file), sys.executable, *args],
            cwd=log.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a timeout kills the launcher and the command (its process group)
        )
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"timed out after {TIMEOUT_S} s: {' '.join(args)}\n{log.read_text()[-3000:]}")
    seconds = time.perf_counter() - t0
    peak_kb = int(rss_file.read_text()) if rss_file.is_file() else -1
    return Proc(proc.returncode, log.read_text(), peak_kb / 1024, seconds)


@dataclass
class TrainRun:
    model: str
    run_dir: Path
    proc: Proc
    metrics: dict
    data: TinyImageNet


_TRAINED: dict[str, TrainRun] = {}


@pytest.fixture(scope="module")
def trained(tiny_imagenet, tmp_path_factory):
    """``trained(name)``: the one-step ``fragdefense-train`` run of model ``name`` (run once per module); the
    checkpoints (180 MB each for resnet50) are deleted at the end of the module."""

    def get(name: str) -> TrainRun:
        if name not in _TRAINED:
            run_dir = tmp_path_factory.mktemp(f"train_{name}")
            proc = _run(
                [
                    "-m",
                    "fragdefense.cli.train",
                    *DATA,
                    f"data.root={tiny_imagenet.root}",
                    "data.batch_size=2",
                    "data.eval_batch_size=2",
                    "data.val_fraction=0.2",
                    "data.probe_size=2",
                    f"model={name}",
                    "trainer.max_epochs=1",
                    "+trainer.limit_train_batches=1",
                    "+trainer.limit_val_batches=1",
                    "+trainer.limit_test_batches=1",
                    "trainer.enable_progress_bar=false",
                    "callbacks.fragility.n_probe=2",
                    "callbacks.fragility.steps=2",
                    "callbacks.fragility.check_every=1",
                    "callbacks.fragility.batch_size=2",
                    "callbacks.fragility.n_images_logged=2",
                    f"hydra.run.dir={run_dir}",
                ],
                run_dir / "train.out",
            )
            assert proc.returncode == 0, f"fragdefense-train {name} failed:\n{proc.output[-4000:]}"
            metrics = json.loads((run_dir / "metrics.json").read_text())
            _TRAINED[name] = TrainRun(name, run_dir, proc, metrics, tiny_imagenet)
        return _TRAINED[name]

    yield get
    for run in _TRAINED.values():
        for ckpt in (run.run_dir / "checkpoints").glob("*.ckpt"):
            ckpt.unlink()
    _TRAINED.clear()


def _finite_in(v: float, lo: float, hi: float) -> bool:
    return math.isfinite(v) and lo - 1e-6 <= v <= hi + 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_train_one_step(name, trained, record_property):
    run = trained(name)
    record_property("data_source", run.data.source)
    record_property("peak_rss_mb", round(run.proc.peak_rss_mb))
    record_property("seconds", round(run.proc.seconds, 1))
    print(f"{name}: fragdefense-train {run.proc.seconds:.1f} s, peak RSS {run.proc.peak_rss_mb:.0f} MB")
    m = run.metrics
    assert m["model"] == name and m["epochs"] == 1 and m["global_step"] == 1
    assert m["device"] == "cpu"
    assert math.isfinite(m["final_epoch_metrics"]["train/loss"])
    assert 0.0 <= m["test"]["test/acc"] <= 1.0
    assert Path(m["best_checkpoint"]).is_file() and Path(m["last_checkpoint"]).is_file()
    cfg = OmegaConf.load(run.run_dir / "config.yaml")
    assert (cfg.data.image_size, cfg.data.resize, cfg.data.test_split) == (224, 256, "val")
    assert cfg.data.random_resized_crop and not cfg.data.in_memory  # the streamed ImageNet pipeline
    assert m["wandb"]["mode"] == "offline" and list(Path(m["wandb"]["dir"]).glob("run-*.wandb"))
    assert "val/acc" in (run.run_dir / "csv" / "metrics.csv").read_text()
    assert run.proc.peak_rss_mb < PEAK_RSS_MB[name], f"{name} train: {run.proc.peak_rss_mb:.0f} MB"


@pytest.mark.parametrize("name", MODELS)
def test_fragility_monitor_224(name, trained):
    run = trained(name)
    # the callback during training: 2 probe images of val/, protocol as overridden
    f = run.metrics["fragility"]
    assert f["n_probe"] == 2 and f["protocol"]["steps"] == 2 and f["eps_255"] == pytest.approx(8.0)
    assert 0.0 <= f["probe_acc"] <= 1.0
    assert set(f["methods"]["saliency"]["attacks"]) == {"random_sign", "topk"}
    for v in f["methods"]["saliency"]["attacks"].values():
        # NaN when the one-step model misclassifies both probe images (only correct images are attacked)
        assert f["probe_acc"] == 0.0 or _finite_in(v["topk_intersection"], 0, 1)
    assert "fragility/saliency/topk/spearman" in run.metrics["final_epoch_metrics"]

    # FragilityMonitor.evaluate on the trained checkpoint's model, labels = its own predictions: both attacked
    cfg = OmegaConf.load(run.run_dir / "config.yaml")
    dm = instantiate(cfg.data)
    dm.setup("test")
    probe = dm.probe_batch()
    assert probe["x"].shape == (2, 3, 224, 224)
    model = load_checkpoint_model(run.metrics["best_checkpoint"])
    with torch.no_grad():
        probe["y"] = model(probe["x"]).argmax(1)
    mon = FragilityMonitor(
        methods={"saliency": {}},
        attacks=["random_sign", "topk"],
        eps="8/255",
        steps=2,
        check_every=1,
        k=100,
        n_probe=2,
        batch_size=2,
        n_images_logged=2,
        maps_png=None,
    )
    before = [p.detach().clone() for p in model.parameters()]
    rep = mon.evaluate(model, probe)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched
    assert rep.metrics["probe_acc"] == 1.0 and rep.n_probe == 2
    for attack in ("random_sign", "topk"):
        pre = f"saliency/{attack}/"
        assert _finite_in(rep.metrics[pre + "topk_intersection"], 0, 1)
        assert _finite_in(rep.metrics[pre + "spearman"], -1, 1)
        assert _finite_in(rep.metrics[pre + "kendall"], -1, 1)
        assert _finite_in(rep.metrics[pre + "lens_recall"], 0, 1)
        assert _finite_in(rep.metrics[pre + "label_kept_rate"], 0, 1)
        assert math.isfinite(rep.metrics[pre + "center_shift"]) and rep.metrics[pre + "center_shift"] >= 0
        ex = rep.examples[("saliency", attack)]
        assert len(ex["x"]) == 2 and ex["x_adv"][0].shape == (3, 224, 224) and ex["clean_map"][0].shape == (224, 224)
        for x0, xa in zip(ex["x"], ex["x_adv"]):
            assert float((xa - x0).abs().max()) <= 8 / 255 + 1e-6
    assert len(rep.records) == 4  # 2 images x 2 attacks
    for r in rep.records:
        assert r["linf_distance"] <= 8 / 255 + 1e-6 and r["test_index"] in probe["indices"]


@pytest.mark.parametrize("name", MODELS)
def test_eval_cli_224(name, trained, tmp_path, record_property):
    run = trained(name)
    out = tmp_path / "eval"
    n_val = N_CLASSES * N_VAL_PER_CLASS
    proc = _run(
        [
            "-m",
            "fragdefense.cli.evaluate",
            f"checkpoint={run.metrics['best_checkpoint']}",
            *DATA,
            f"data.root={run.data.root}",
            "device=cpu",
            f"n_images={n_val}",
            "batch_size=2",
            "~methods.integrated_gradients",  # (a dict override merges: the default IG entry is removed)
            "attacks=[topk]",
            "eps=[8/255]",
            "protocol.steps=2",
            "protocol.check_every=1",
            "n_figure_images=2",
            f"hydra.run.dir={out}",
        ],
        tmp_path / "eval.out",
    )
    record_property("peak_rss_mb", round(proc.peak_rss_mb))
    record_property("seconds", round(proc.seconds, 1))
    print(f"{name}: fragdefense-eval {proc.seconds:.1f} s, peak RSS {proc.peak_rss_mb:.0f} MB")
    assert proc.returncode == 0, f"fragdefense-eval {name} failed:\n{proc.output[-4000:]}"
    res = json.loads((out / "results.json").read_text())
    assert res["model_name"] == name and res["device"] == "cpu"
    assert sorted(res["image_indices"]) == list(range(n_val))
    assert len(res["records"]) == 1
    rec = res["records"][0]
    assert (rec["method"], rec["attack"], rec["epsilon_255"]) == ("saliency", "topk", pytest.approx(8.0))
    assert rec["protocol"]["steps"] == 2
    # misclassified images are skipped and counted; the rest are attacked
    assert rec["n_images"] + rec["n_skipped"] == n_val
    assert rec["n_images"] == round(res["clean_accuracy"] * n_val)
    # the one-step models predict at least one val/ image right (squeezenet1_1: one class for every image)
    assert rec["n_images"] >= 1, f"no image was attacked (clean accuracy {res['clean_accuracy']})"
    assert _finite_in(rec["topk_intersection"], 0, 1) and _finite_in(rec["spearman"], -1, 1)
    assert _finite_in(rec["label_kept_rate"], 0, 1)
    rows = res["per_image"][0]["images"]
    assert len(rows) == rec["n_images"] and all(r["linf_distance"] <= 8 / 255 + 1e-6 for r in rows)
    assert (out / "results.md").is_file() and (out / "metrics_vs_eps.png").is_file()
    # the example figure shows the first attacked images, whichever batch they are in
    assert (out / "examples_saliency_topk.png").is_file() == bool(rows)
    assert proc.peak_rss_mb < PEAK_RSS_MB[name], f"{name} eval: {proc.peak_rss_mb:.0f} MB"


def test_metrics_vs_eps_figure_without_attacked_images(tmp_path):
    """fragdefense-eval crashed in ``plot_metrics_vs_eps`` (matplotlib: "Number of columns must be a positive
    integer, not 0") when every selected image was misclassified, as with a one-step squeezenet1_1 and 2 images."""
    from fragdefense.viz import plot_metrics_vs_eps

    records = [
        {"method": "saliency", "attack": "topk", "epsilon": 8 / 255, "epsilon_255": 8.0, "n_images": 0}
        | dict.fromkeys(("topk_intersection", "spearman", "kendall", "center_shift", "lens_recall"))
    ]
    path = plot_metrics_vs_eps(records, tmp_path / "m.png")
    assert path.is_file() and path.stat().st_size > 0
