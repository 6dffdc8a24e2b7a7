"""Batched, device-side augmentation for in-memory image tensors (no per-image Python loop)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BatchAugment"]


class BatchAugment:
    """Random crop with zero padding and random horizontal flip, applied to a whole batch at once.

    Uses torch's global RNG on the batch's device, so ``lightning.seed_everything`` fixes it.

    Args:
        crop_padding: pixels of zero padding before a random crop back to the input size (0 disables).
        hflip: flip each image horizontally with probability 0.5.

    >>> aug = BatchAugment(crop_padding=4, hflip=True)
    >>> aug(torch.rand(8, 3, 32, 32)).shape
    torch.Size([8, 3, 32, 32])
    """

    def __init__(self, crop_padding: int = 0, hflip: bool = False) -> None:
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"`crop_padding` must be an int >= 0 (pixels), got {crop_padding!r}")
        self.crop_padding = crop_padding
        self.hflip = bool(hflip)

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"`x` must have shape (B, C, H, W), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        if self.crop_padding > 0:
            p = self.crop_padding
            xp = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), device=x.device)
            ox = torch.randint(0, 2 * p + 1, (b,), device=x.device)
            rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
            cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
            bidx = torch.arange(b, device=x.device)[:, None, None]
            x = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            x = x.contiguous()
        if self.hflip:
            flip = torch.rand(b, device=x.device) < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        return x

    def __repr__(self) -> str:
        return f"BatchAugment(crop_padding={self.crop_padding}, hflip={self.hflip})"
