"""LightningDataModules. Images are delivered as float tensors in ``[0, 1]``; normalisation lives in the
model wrapper (:class:`fragdefense.models.ImageClassifier`), so attack budgets are in pixel units.

Every data module has:

* a seeded train/validation split (``val_fraction`` of the training set, ``seed``);
* configurable augmentation (random crop with padding, horizontal flip), applied batched on the device
  for in-memory data, or per image (torchvision transforms) for streamed ImageFolder trees;
* a fixed *probe* subset of the test split (``probe_size`` images drawn with ``probe_seed``) used by the
  monitoring callbacks; :meth:`save_probe` writes its indices next to the run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from fragdefense.data.augment import BatchAugment
from fragdefense.data.synthetic import CLASS_NAMES, generate_synthetic

__all__ = [
    "TensorImageDataset",
    "BaseImageDataModule",
    "SyntheticDataModule",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
]


class TensorImageDataset(Dataset):
    """Images held in memory as a ``uint8`` (0-255) or float (0-1) tensor ``(N, C, H, W)``.

    ``dataset[i]`` returns ``(image_float_in_[0,1], label)``; optional ``masks`` ``(N, H, W)`` are kept
    as an attribute (ground truth for scoring maps), not returned, so batches stay ``(x, y)``.
    """

    def __init__(self, images: Tensor, labels: Tensor, masks: Tensor | None = None) -> None:
        if images.ndim != 4:
            raise ValueError(f"`images` must have shape (N, C, H, W), got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"`labels` must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels, self.masks = images, labels.long(), masks

    def __len__(self) -> int:
        return self.images.shape[0]

    def _to_float(self, img: Tensor) -> Tensor:
        return img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self._to_float(self.images[i]), self.labels[i]

    def __getitems__(self, idx: list[int]) -> list[tuple[Tensor, Tensor]]:  # batched fetch
        imgs = self._to_float(self.images[idx])
        return list(zip(imgs, self.labels[idx]))


class BaseImageDataModule(L.LightningDataModule):
    """Shared logic: split, loaders, batched augmentation, probe subset.

    Subclasses implement :meth:`_load` returning ``(train_full, test)`` datasets.
    """

    name = "base"

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: dict[str, Any] | None = None,
        probe_size: int = 64,
        probe_seed: int = 0,
        num_classes: int = 10,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}")
        if int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}")
        if int(probe_size) < 0:
            raise ValueError(f"`probe_size` must be >= 0, got {probe_size!r}")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 2 * batch_size)
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        aug = dict(augment or {})
        unknown = set(aug) - {"crop_padding", "hflip"}
        if unknown:
            raise ValueError(f"unknown `augment` keys {sorted(unknown)}; expected crop_padding, hflip")
        self.augment = BatchAugment(int(aug.get("crop_padding", 0)), bool(aug.get("hflip", False)))
        self.probe_size = int(probe_size)
        self.probe_seed = int(probe_seed)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = bool(pin_memory)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.class_names: list[str] = []
        self._probe_indices: list[int] | None = None
        self._batched_augment = True  # False when per-image transforms are used instead

    # --- to implement -------------------------------------------------------------------------------
    def _load(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    # --- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_full, test = self._load()
        n = len(train_full)
        n_val = int(round(self.val_fraction * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_indices = sorted(perm[:n_val])
        self.train_indices = sorted(perm[n_val:])
        self.train_set = Subset(train_full, self.train_indices)
        self.val_set = Subset(self._eval_view(train_full), self.val_indices) if n_val > 0 else None
        self.test_set = test

    def _eval_view(self, ds: Dataset) -> Dataset:
        """The training set as seen for validation (no per-image augmentation)."""
        return ds

    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        return self._loader(self.val_set, False, self.eval_batch_size) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test_set, False, self.eval_batch_size)

    def _require_setup(self) -> None:
        if self.train_set is None:
            self.setup()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if self._batched_augment and self.augment.enabled and trainer is not None and trainer.training:
            x, y = batch
            return self.augment(x), y
        return batch

    # --- probe subset -------------------------------------------------------------------------------
    @property
    def probe_indices(self) -> list[int]:
        """Indices into the test split of the fixed probe subset (seeded by ``probe_seed``)."""
        self._require_setup()
        if self._probe_indices is None:
            n = len(self.test_set)
            k = min(self.probe_size, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.probe_seed))
            self._probe_indices = sorted(perm[:k].tolist())
        return self._probe_indices

    def probe_batch(self) -> dict[str, Any]:
        """The probe subset as one batch: ``{"x": (P,C,H,W), "y": (P,), "mask": (P,H,W) or None,
        "indices": list}``."""
        idx = self.probe_indices
        items = [self.test_set[i] for i in idx]
        x = torch.stack([it[0] for it in items]) if items else torch.empty(0)
        y = torch.stack([torch.as_tensor(it[1]) for it in items]) if items else torch.empty(0, dtype=torch.long)
        masks = getattr(self.test_set, "masks", None)
        return {"x": x, "y": y, "mask": masks[idx] if masks is not None else None, "indices": idx}

    def save_probe(self, path: str | os.PathLike) -> Path:
        """Write the probe indices (and the data identity) as JSON; returns the path."""
        from fragdefense.utils.io import atomic_write_json

        payload = {
            "datamodule": type(self).__name__,
            "split": "test",
            "probe_seed": self.probe_seed,
            "indices": self.probe_indices,
            "class_names": self.class_names,
        }
        return atomic_write_json(path, payload)


class SyntheticDataModule(BaseImageDataModule):
    """Procedural 10-class textured shapes with ground-truth masks (the built-in default; no download).

    >>> dm = SyntheticDataModule(n_train=64, n_test=32, batch_size=16, probe_size=8)
    >>> dm.setup()
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> x.shape, float(x.min()) >= 0.0, float(x.max()) <= 1.0
    (torch.Size([16, 3, 32, 32]), True, True)
    >>> dm.probe_batch()["mask"].shape
    torch.Size([8, 32, 32])
    """

    name = "synthetic"

    def __init__(
        self, n_train: int = 5000, n_test: int = 1000, data_seed: int = 0, image_size: int = 32, **kw: Any
    ) -> None:
        kw.setdefault("mean", (0.5, 0.5, 0.5))
        kw.setdefault("std", (0.25, 0.25, 0.25))
        super().__init__(image_size=image_size, **kw)
        if self.num_classes != len(CLASS_NAMES):
            raise ValueError(f"`num_classes` must be {len(CLASS_NAMES)} for synthetic data, got {self.num_classes}")
        self.n_train, self.n_test, self.data_seed = int(n_train), int(n_test), int(data_seed)
        self.class_names = list(CLASS_NAMES)

    def _load(self) -> tuple[Dataset, Dataset]:
        xtr, ytr, mtr = generate_synthetic(self.n_train, self.image_size, seed=2 * self.data_seed)
        xte, yte, mte = generate_synthetic(self.n_test, self.image_size, seed=2 * self.data_seed + 1)
        return TensorImageDataset(xtr, ytr, mtr), TensorImageDataset(xte, yte, mte)


_CIFAR_HELP = (
    "CIFAR-10 (python version) was not found under `root`={root!r}. Either set `download=true` on a machine "
    "with internet access, copy the extracted 'cifar-10-batches-py' folder into that root (from "
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz), or use the ImageFolder copy: "
    "`data=imagefolder data.root=<path to cifar10-jpeg>`."
)


class CIFAR10DataModule(BaseImageDataModule):
    """torchvision ``CIFAR10`` (the python pickles), held in memory as uint8.

    Args:
        root: folder that contains (or will receive) ``cifar-10-batches-py``.
        download: download the archive if absent (needs internet; fails with a clear error offline).
    """

    name = "cifar10"

    def __init__(self, root: str = "data", download: bool = False, **kw: Any) -> None:
        from fragdefense.models import CIFAR10_MEAN, CIFAR10_STD

        kw.setdefault("mean", CIFAR10_MEAN)
        kw.setdefault("std", CIFAR10_STD)
        super().__init__(**kw)
        self.root, self.download = str(root), bool(download)

    def _load(self) -> tuple[Dataset, Dataset]:
        from torchvision.datasets import CIFAR10

        try:
            tr = CIFAR10(self.root, train=True, download=self.download)
            te = CIFAR10(self.root, train=False, download=self.download)
        except RuntimeError as e:  # "Dataset not found or corrupted"
            raise FileNotFoundError(_CIFAR_HELP.format(root=self.root)) from e
        except OSError as e:  # URLError etc. when downloading offline
            raise FileNotFoundError(
                f"downloading CIFAR-10 failed ({e}); this machine may be offline. " + _CIFAR_HELP.format(root=self.root)
            ) from e
        self.class_names = list(tr.classes)

        def to_ds(d: Any) -> TensorImageDataset:
            return TensorImageDataset(
                torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets)
            )

        return to_ds(tr), to_ds(te)


def _pil_loader(path: str) -> Any:
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read image file {path!r} ({type(e).__name__}: {e}); remove or replace it") from e


class ImageFolderDataModule(BaseImageDataModule):
    """Any ImageFolder tree ``root/train/<class>/*`` with ``root/val`` or ``root/test`` as the test split
    (e.g. ImageNet, or the CIFAR-10 JPEG copy).

    Args:
        root: the tree's root folder.
        test_split: ``"val"``, ``"test"`` or ``"auto"`` (``val`` if present, else ``test``).
        resize: resize the shorter side to this many pixels before cropping (``None``: no resize).
        image_size: final crop size (center crop for evaluation; random-resized crop for training when
            ``random_resized_crop``; ``None`` or equal to the stored size: no crop).
        random_resized_crop: ImageNet-style training crops (per image, streamed mode only).
        in_memory: decode every image once into a uint8 tensor (fast for small images). ``None`` (auto):
            when the decoded data would take less than 4 GiB.
        decode_threads: threads used to decode images into memory.
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str | None = None,
        test_split: str = "auto",
        resize: int | None = None,
        random_resized_crop: bool = False,
        in_memory: bool | None = None,
        decode_threads: int = 4,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if root is None:
            raise ValueError("`root` must be the path of an ImageFolder tree (root/train/<class>/...), got None")
        self.root = Path(root).expanduser()
        if test_split not in ("auto", "val", "test"):
            raise ValueError(f"`test_split` must be 'auto', 'val' or 'test', got {test_split!r}")
        self.test_split = test_split
        self.resize = resize
        self.random_resized_crop = bool(random_resized_crop)
        self.in_memory = in_memory
        self.decode_threads = int(decode_threads)

    def _split_dirs(self) -> tuple[Path, Path]:
        train = self.root / "train"
        if not self.root.is_dir():
            raise FileNotFoundError(f"`root` {str(self.root)!r} does not exist (expected an ImageFolder tree)")
        if not train.is_dir():
            raise FileNotFoundError(f"`root` {str(self.root)!r} has no 'train' folder (expected root/train/<class>/*)")
        names = ["val", "test"] if self.test_split == "auto" else [self.test_split]
        for n in names:
            if (self.root / n).is_dir():
                return train, self.root / n
        raise FileNotFoundError(f"`root` {str(self.root)!r} has no {' or '.join(repr(n) for n in names)} folder")

    def _eval_transform(self) -> Any:
        from torchvision.transforms import v2

        ops: list[Any] = []
        if self.resize:
            ops.append(v2.Resize(self.resize, antialias=True))
        if self.image_size:
            ops.append(v2.CenterCrop(self.image_size))
        return ops

    def _load(self) -> tuple[Dataset, Dataset]:
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2

        train_dir, test_dir = self._split_dirs()
        tr = ImageFolder(str(train_dir), loader=_pil_loader)
        te = ImageFolder(str(test_dir), loader=_pil_loader)
        if tr.classes != te.classes:
            raise ValueError(f"class folders differ between {train_dir} and {test_dir}")
        if len(tr.classes) != self.num_classes:
            raise ValueError(
                f"`num_classes`={self.num_classes} but {train_dir} holds {len(tr.classes)} class folders; "
                f"set data.num_classes={len(tr.classes)}"
            )
        self.class_names = list(tr.classes)
        eval_ops = self._eval_transform()
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        in_memory = self.in_memory
        if in_memory is None:
            side = self.image_size or 256
            in_memory = (len(tr) + len(te)) * 3 * side * side < 4 * 2**30
        if in_memory:
            tf = v2.Compose([*eval_ops, v2.ToImage()])
            return self._decode_all(tr, tf), self._decode_all(te, tf)
        self._batched_augment = False
        train_ops: list[Any]
        if self.random_resized_crop:
            train_ops = [v2.RandomResizedCrop(self.image_size, antialias=True)]
        else:
            train_ops = list(eval_ops)
            if self.augment.crop_padding:
                train_ops.append(v2.RandomCrop(self.image_size, padding=self.augment.crop_padding))
        if self.augment.hflip:
            train_ops.append(v2.RandomHorizontalFlip())
        self._train_tf = v2.Compose([*train_ops, *to_tensor])
        self._test_tf = v2.Compose([*eval_ops, *to_tensor])
        tr_aug = ImageFolder(str(train_dir), loader=_pil_loader, transform=self._train_tf)
        tr_eval = ImageFolder(str(train_dir), loader=_pil_loader, transform=self._test_tf)
        te.transform = self._test_tf
        self._train_eval_view = tr_eval
        return tr_aug, te

    def _eval_view(self, ds: Dataset) -> Dataset:
        return getattr(self, "_train_eval_view", ds)

    def _decode_all(self, folder: Any, tf: Any) -> TensorImageDataset:
        def load(i: int) -> Tensor:
            path, _ = folder.samples[i]
            return tf(_pil_loader(path))

        with ThreadPoolExecutor(max(1, self.decode_threads)) as pool:
            imgs = list(pool.map(load, range(len(folder))))
        shapes = {tuple(im.shape) for im in imgs}
        if len(shapes) != 1:
            raise ValueError(
                f"images under {folder.root} have different sizes {sorted(shapes)[:3]}...; set data.image_size "
                "(and data.resize) so that they are cropped to one size"
            )
        return TensorImageDataset(torch.stack(imgs), torch.tensor(folder.targets))
