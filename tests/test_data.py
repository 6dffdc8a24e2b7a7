"""Data: synthetic generator, augmentation, data modules, probe subset, missing/corrupt data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fragdefense.data import (
    CLASS_NAMES,
    BatchAugment,
    CIFAR10DataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    generate_synthetic,
)


def test_synthetic_deterministic_and_seed_dependent():
    a = generate_synthetic(64, 32, seed=3)
    b = generate_synthetic(64, 32, seed=3)
    c = generate_synthetic(64, 32, seed=4)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


def test_synthetic_chunking_does_not_change_data():
    a = generate_synthetic(50, 32, seed=1, chunk=2048)
    b = generate_synthetic(50, 32, seed=1, chunk=2048)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("size", [32, 48])
def test_synthetic_shapes_range_masks(size):
    x, y, m = generate_synthetic(400, size, seed=0)
    assert x.shape == (400, 3, size, size) and x.dtype == torch.float32
    assert y.shape == (400,) and y.dtype == torch.int64
    assert m.shape == (400, size, size) and m.dtype == torch.bool
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(len(CLASS_NAMES)))
    frac = m.float().mean(dim=(1, 2))
    assert bool((frac > 0.02).all()) and bool((frac < 0.6).all())  # every image has an object
    # the mask is the object: object pixels are more saturated than the muted background
    sat = x.amax(1) - x.amin(1)
    inside = (sat * m).sum((1, 2)) / m.sum((1, 2))
    outside = (sat * ~m).sum((1, 2)) / (~m).sum((1, 2))
    assert float((inside > outside).float().mean()) > 0.9


def test_synthetic_bad_args():
    with pytest.raises(ValueError, match="`size`"):
        generate_synthetic(4, size=8)
    with pytest.raises(ValueError, match="`n`"):
        generate_synthetic(0)


def test_batch_augment_crop_is_a_shift_and_flip_is_a_flip():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 12, 12)
    out = BatchAugment(crop_padding=2, hflip=False)(x)
    assert out.shape == x.shape
    # each output equals the input shifted by some (dy, dx) in [-2, 2], zero-filled
    for i in range(16):
        ok = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[i])
                ys, yd = slice(max(0, dy), 12 + min(0, dy)), slice(max(0, -dy), 12 + min(0, -dy))
                xs, xd = slice(max(0, dx), 12 + min(0, dx)), slice(max(0, -dx), 12 + min(0, -dx))
                ref[:, yd, xd] = x[i][:, ys, xs]
                ok = ok or torch.equal(ref, out[i])
        assert ok
    flipped = BatchAugment(0, hflip=True)(x)
    for i in range(16):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    with pytest.raises(ValueError, match="crop_padding"):
        BatchAugment(crop_padding=-1)


def test_synthetic_datamodule_split_probe_and_loaders(tmp_path):
    dm = SyntheticDataModule(n_train=200, n_test=100, batch_size=32, probe_size=16, val_fraction=0.2, seed=1)
    dm.setup()
    assert len(dm.train_set) == 160 and len(dm.val_set) == 40 and len(dm.test_set) == 100
    assert not set(dm.train_indices) & set(dm.val_indices)
    dm2 = SyntheticDataModule(n_train=200, n_test=100, batch_size=32, probe_size=16, val_fraction=0.2, seed=1)
    dm2.setup()
    assert dm.val_indices == dm2.val_indices and dm.probe_indices == dm2.probe_indices
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and y.shape == (32,)
    probe = dm.probe_batch()
    assert probe["x"].shape == (16, 3, 32, 32) and probe["mask"].shape == (16, 32, 32)
    assert torch.equal(probe["x"][0], dm.test_set[probe["indices"][0]][0])
    path = dm.save_probe(tmp_path / "probe.json")
    saved = json.loads(path.read_text())
    assert saved["indices"] == dm.probe_indices and saved["split"] == "test"


def test_cifar10_missing_gives_clear_error(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError, match="nowhere") as e:
        dm.setup()
    assert "download=true" in str(e.value) and "imagefolder" in str(e.value)


def _write_tree(root: Path, classes=("a", "b"), n=6, size=20, splits=("train", "test")) -> None:
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(size, size, 3, generator=g) * 120 + 100 * ci).clamp(0, 255).byte().numpy()
                Image.fromarray(arr).save(d / f"{i}.png")


@pytest.mark.parametrize("in_memory", [True, False])
def test_imagefolder_reads_tree(tmp_path, in_memory):
    _write_tree(tmp_path)
    dm = ImageFolderDataModule(
        root=str(tmp_path),
        num_classes=2,
        image_size=16,
        in_memory=in_memory,
        batch_size=4,
        val_fraction=0.25,
        augment={"crop_padding": 2, "hflip": True},
        probe_size=3,
    )
    dm.setup()
    assert dm.class_names == ["a", "b"]
    assert len(dm.train_set) == 9 and len(dm.val_set) == 3 and len(dm.test_set) == 12
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert dm.probe_batch()["mask"] is None


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="`root`"):
        ImageFolderDataModule(root=str(tmp_path / "missing")).setup()
    _write_tree(tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        ImageFolderDataModule(root=str(tmp_path), num_classes=10, image_size=16).setup()
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderDataModule(root=str(tmp_path), num_classes=2, image_size=16, in_memory=True).setup()


@pytest.mark.realdata
def test_real_cifar10_jpeg_copy(cifar10_jpeg_root):
    dm = ImageFolderDataModule(root=cifar10_jpeg_root, num_classes=10, image_size=32, val_fraction=0.1)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 50_000 and len(dm.test_set) == 10_000
    assert dm.class_names[0] == "airplane" and len(dm.class_names) == 10
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (3, 32, 32) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    counts = torch.bincount(torch.tensor(dm.test_set.labels), minlength=10)
    assert counts.tolist() == [1000] * 10
