"""Procedurally generated, seeded, learnable 10-class images with ground-truth object masks.

Each image is a textured shape on a textured background. The class is the pair
(shape, texture): 5 shapes (disc, square, triangle, cross, ring) x 2 textures (stripes, checks).
Position, size, orientation of the texture, colours and the background vary per image. The binary
mask of the object's pixels is the ground truth for scoring where an explanation points.

Generation is vectorised over images (no per-image Python loop) and reproducible from a seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SHAPES", "TEXTURES", "CLASS_NAMES", "generate_synthetic"]

SHAPES = ("disc", "square", "triangle", "cross", "ring")
TEXTURES = ("stripes", "checks")
CLASS_NAMES = tuple(f"{s}_{t}" for s in SHAPES for t in TEXTURES)


def _shape_masks(shape_id: Tensor, dy: Tensor, dx: Tensor, r: Tensor) -> Tensor:
    """Boolean masks (N, H, W) for each image's shape; dy, dx: offsets from the centre (N, H, W)."""
    ady, adx = dy.abs(), dx.abs()
    dist = torch.sqrt(dy**2 + dx**2)
    disc = dist <= r
    square = torch.maximum(ady, adx) <= 0.85 * r
    # upward triangle: apex at -r, base at +0.8r; half-width grows linearly from 0 to r
    tri = (dy >= -r) & (dy <= 0.8 * r) & (adx <= (dy + r) * (r / (1.8 * r)))
    arm = 0.38 * r
    cross = ((adx <= arm) & (ady <= r)) | ((ady <= arm) & (adx <= r))
    ring = (dist <= r) & (dist >= 0.55 * r)
    stack = torch.stack([disc, square, tri, cross, ring], dim=1)  # (N, 5, H, W)
    return stack.gather(1, shape_id.view(-1, 1, 1, 1).expand(-1, 1, *dy.shape[1:])).squeeze(1)


def _smooth_noise(n: int, size: int, cells: int, g: torch.Generator) -> Tensor:
    """Low-frequency colour noise (n, 3, size, size) in [0, 1]."""
    coarse = torch.rand(n, 3, cells, cells, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def generate_synthetic(n: int, size: int = 32, seed: int = 0, *, chunk: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``n`` images.

    Args:
        n: number of images.
        size: image height and width in pixels (>= 16).
        seed: RNG seed; the same (n, size, seed) always gives the same images.
        chunk: images generated per vectorised chunk (bounds memory).

    Returns:
        ``(images, labels, masks)``: float32 ``(n, 3, size, size)`` in ``[0, 1]``, int64 ``(n,)`` in
        ``[0, 10)``, bool ``(n, size, size)`` object masks.

    >>> x, y, m = generate_synthetic(4, size=32, seed=0)
    >>> x.shape, y.shape, m.shape, bool(x.min() >= 0) and bool(x.max() <= 1)
    (torch.Size([4, 3, 32, 32]), torch.Size([4]), torch.Size([4, 32, 32]), True)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an int >= 1, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"`size` must be an int >= 16 (pixels), got {size!r}")
    g = torch.Generator().manual_seed(int(seed))
    xs, ys, ms = [], [], []
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = torch.randint(0, len(CLASS_NAMES), (m,), generator=g)
        shape_id, tex_id = labels // 2, labels % 2
        r = size * (0.2 + 0.12 * torch.rand(m, generator=g))  # radius 20-32% of the side
        margin = r + 1.0
        cy = margin + torch.rand(m, generator=g) * (size - 2 * margin)
        cx = margin + torch.rand(m, generator=g) * (size - 2 * margin)
        dy = coords.view(1, -1, 1) - cy.view(-1, 1, 1)
        dx = coords.view(1, 1, -1) - cx.view(-1, 1, 1)
        dy, dx = dy.expand(m, size, size), dx.expand(m, size, size)
        rr = r.view(-1, 1, 1)
        mask = _shape_masks(shape_id, dy, dx, rr)

        # object texture: stripes (one orientation) or checks (two), period 3-5 px
        theta = torch.rand(m, generator=g) * math.pi
        period = 3.0 + 2.0 * torch.rand(m, generator=g)
        ct, st = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
        u = (dx * ct + dy * st) * (2 * math.pi / period.view(-1, 1, 1))
        v = (-dx * st + dy * ct) * (2 * math.pi / period.view(-1, 1, 1))
        stripes = torch.sin(u) > 0
        checks = (torch.sin(u) * torch.sin(v)) > 0
        pattern = torch.where(tex_id.view(-1, 1, 1) == 0, stripes, checks).float()

        # saturated object colours: a random hue mixed with its dark version by the pattern
        hue = torch.rand(m, 3, generator=g)
        hue = 0.25 + 0.75 * (hue - hue.amin(1, keepdim=True)) / (
            hue.amax(1, keepdim=True) - hue.amin(1, keepdim=True) + 1e-6
        )
        light = hue.view(m, 3, 1, 1)
        dark = light * (0.15 + 0.2 * torch.rand(m, 1, 1, 1, generator=g))
        obj = pattern.unsqueeze(1) * light + (1 - pattern.unsqueeze(1)) * dark

        # background: muted low-frequency colour noise plus fine grain
        bg = 0.15 + 0.55 * _smooth_noise(m, size, 4, g)
        bg = bg + 0.06 * torch.randn(m, 3, size, size, generator=g)
        img = torch.where(mask.unsqueeze(1), obj, bg).clamp_(0.0, 1.0)
        xs.append(img)
        ys.append(labels)
        ms.append(mask)
    return torch.cat(xs), torch.cat(ys), torch.cat(ms)
