"""A user's own model and data, as a new user would write them (no fragdefense base classes): importable by path
(``helpers_custom_model.TinyCNN``) so Hydra ``_target_`` configs and checkpoints can name them."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class TinyCNN(nn.Module):
    """A small CNN on images in ``[0, 1]``; ReLU is the functional ``torch.relu`` (no ``nn.ReLU`` module)."""

    def __init__(self, num_classes: int = 10, width: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x - 0.5))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


class ReluNet(nn.Sequential):
    """Flatten -> Linear -> nn.ReLU -> Linear (has an ``nn.ReLU`` module, for ``softplus_beta``)."""

    def __init__(self, num_classes: int = 10, in_features: int = 3 * 16 * 16, hidden: int = 8) -> None:
        super().__init__(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def random_images(n: int, size: int = 16, num_classes: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` images in ``[0, 1]`` whose label is readable (the brightest of ``num_classes`` horizontal bands)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = 0.3 * torch.rand(n, 3, size, size, generator=g)
    band = size // num_classes or 1
    for i in range(n):
        r = int(y[i]) * band % size
        x[i, :, r : r + band] += 0.6
    return x.clamp(0, 1), y


class TrainOnlyDataModule(L.LightningDataModule):
    """A plain LightningDataModule (no ``probe_batch()``) with only a shuffled train loader.

    ``normalise=True`` delivers already-normalised images (``(x - 0.5) / 0.25``, outside ``[0, 1]``).
    """

    def __init__(
        self, n_train: int = 64, n_val: int = 32, size: int = 16, batch_size: int = 16, normalise: bool = False
    ) -> None:
        super().__init__()
        self.n_train, self.n_val, self.size, self.batch_size = n_train, n_val, size, batch_size
        self.normalise = normalise
        self.num_classes = 10

    def setup(self, stage: str | None = None) -> None:
        xtr, ytr = random_images(self.n_train, self.size, seed=1)
        xva, yva = random_images(self.n_val, self.size, seed=2)
        if self.normalise:
            xtr, xva = (xtr - 0.5) / 0.25, (xva - 0.5) / 0.25
        self.train_ds, self.val_ds = TensorDataset(xtr, ytr), TensorDataset(xva, yva)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_ds, batch_size=self.batch_size, shuffle=True)


class TinyDataModule(TrainOnlyDataModule):
    """A plain LightningDataModule (no ``probe_batch()``): shuffled train loader and a val loader, no test loader."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_ds, batch_size=self.batch_size)


class NetModule(L.LightningModule):
    """A user's own LightningModule: the network is ``self.net`` (not ``self.model``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)
