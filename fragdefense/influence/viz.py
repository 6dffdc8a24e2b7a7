"""Figures of the most influential training images (matplotlib, Agg backend) and image strips for W&B."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fragdefense.utils.io import atomic_savefig

__all__ = ["influence_strip", "plot_top_influential"]


def _rgb(img: Tensor) -> Tensor:
    img = img.detach().float().cpu().clamp(0, 1)
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def influence_strip(test_image: Tensor, train_images: Tensor, scale: int = 2, gap: int = 2) -> np.ndarray:
    """One RGB uint8 strip: the test image, a white gap, then its most influential training images.

    >>> influence_strip(torch.rand(3, 8, 8), torch.rand(4, 3, 8, 8)).shape
    (16, 90, 3)
    """
    h = test_image.shape[-2]
    parts = [_rgb(test_image), torch.ones(3, h, gap)]
    for im in train_images:
        parts += [_rgb(im), torch.ones(3, h, 1)]
    row = torch.cat(parts[:-1] if len(train_images) else parts[:1], dim=2)
    row = row.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def plot_top_influential(
    x: Tensor,
    x_adv: Tensor,
    train_images: Tensor,
    top_clean: Tensor,
    top_adv: Tensor,
    path: str | Path,
    *,
    title: str = "",
    row_labels: Sequence[str] | None = None,
    adv_labels: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    train_labels: Tensor | None = None,
    train_ids: Sequence[int] | None = None,
) -> Path:
    """Per test image two rows: the clean image and its top-k training images, then the perturbed image and its
    top-k training images after the attack (images that stayed in the top-k are framed in green).

    Args:
        x, x_adv: ``(n, C, H, W)`` clean and perturbed test images.
        train_images: ``(N, C, H, W)`` the training images the indices refer to.
        top_clean, top_adv: ``(n, k)`` indices into ``train_images`` (most influential first).
        path: PNG path.
        row_labels, adv_labels: a caption per test image, beside its clean / attacked row.
        class_names, train_labels: label the training images with their class.
        train_ids: the training images' dataset indices shown in the captions (default: positions in
            ``train_images``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = top_clean.shape
    fig, axes = plt.subplots(2 * n, k + 1, figsize=(1.3 * (k + 1), 1.45 * 2 * n), squeeze=False)
    for i in range(n):
        kept = set(top_clean[i].tolist()) & set(top_adv[i].tolist())
        for r, (img, top, name) in enumerate(((x[i], top_clean[i], "clean"), (x_adv[i], top_adv[i], "attacked"))):
            ax = axes[2 * i + r]
            ax[0].imshow(_rgb(img).permute(1, 2, 0).numpy())
            ax[0].set_title(f"{name} test", fontsize=7)
            side = row_labels if r == 0 else adv_labels
            if side is not None:
                ax[0].set_ylabel(side[i], fontsize=6)
            for j, t in enumerate(top.tolist()):
                a = ax[j + 1]
                a.imshow(_rgb(train_images[t]).permute(1, 2, 0).numpy())
                cap = f"#{train_ids[t] if train_ids is not None else t}"
                if train_labels is not None:
                    c = int(train_labels[t])
                    cap += f" {class_names[c] if class_names is not None else c}"
                a.set_title(cap, fontsize=6)
                if t in kept:
                    for s in a.spines.values():
                        s.set_edgecolor("limegreen")
                        s.set_linewidth(2.5)
            for a in ax:
                a.set_xticks([])
                a.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path
