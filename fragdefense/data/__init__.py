"""Data: procedural synthetic images with masks, CIFAR-10, and any ImageFolder tree (LightningDataModules)."""

from fragdefense.data.augment import BatchAugment
from fragdefense.data.datamodules import (
    BaseImageDataModule,
    CIFAR10DataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    TensorImageDataset,
)
from fragdefense.data.synthetic import CLASS_NAMES, generate_synthetic

__all__ = [
    "BatchAugment",
    "BaseImageDataModule",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "TensorImageDataset",
    "CLASS_NAMES",
    "generate_synthetic",
]
