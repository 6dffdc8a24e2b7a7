"""CIFAR-size architectures (32x32 inputs). Every activation is an ``nn.ReLU`` module (not ``F.relu``)
and no ReLU is in-place, so :func:`~fragdefense.models.to_softplus` and double back-propagation work."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN", "ResNetCifar", "PreActResNet", "WideResNet"]


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """Five 3x3 conv + BatchNorm + ReLU layers, two max-pools, global average pool, linear head.

    The fast CPU default (~0.3 M parameters at ``width=32``). Works for any input size >= 4.

    >>> import torch
    >>> SmallCNN(num_classes=10)(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w),
            *_conv_bn(w, w),
            nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w),
            *_conv_bn(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)
        self.feature_dim = 4 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-18 for CIFAR (He et al. 2016; 3x3 stem, no max-pool), as in the adversarial-robustness
    literature (11.2 M parameters).

    >>> import torch
    >>> ResNetCifar(num_blocks=(1, 1, 1, 1), width=8)(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, num_blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, width))
        layers: list[nn.Module] = []
        cin = width
        for i, n in enumerate(num_blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.layers(self.stem(x))))


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + sc


class PreActResNet(nn.Module):
    """Pre-activation ResNet-18 (He et al. 2016b), the usual adversarial-training backbone.

    >>> import torch
    >>> PreActResNet(num_blocks=(1, 1, 1, 1), width=8)(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, num_blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = width
        for i, n in enumerate(num_blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(_PreActBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.final(self.layers(self.stem(x))))


class WideResNet(nn.Module):
    """Wide ResNet (Zagoruyko & Komodakis 2016), WRN-``depth``-``widen``; WRN-28-10 has 36.5 M parameters.

    >>> import torch
    >>> WideResNet(depth=10, widen=1)(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"`depth` must be 6n + 4 (e.g. 16, 22, 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                layers.append(_PreActBlock(cin, cout, 2 if (j == 0 and i > 0) else 1, dropout))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.final(self.layers(self.stem(x))))
