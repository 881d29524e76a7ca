"""Image conversions and the sample grid, shared by the runner and the digits metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] samples (B, C, *spatial) -> uint8 channels last, DiT's conversion clamp(127.5 x + 128):
    images (B, C, H, W) -> (B, H, W, C) (the ADM layout), and a sample of any other rank likewise
    (video (B, C, T, H, W) -> (B, T, H, W, C)), so sampling never assumes 2-D images."""
    order = (0, *range(2, x.dim()), 1)
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(*order).to("cpu", torch.uint8).numpy()


def save_grid(images: np.ndarray, path: Path, n: int = 64, min_side: int = 32, nrow: int = 8) -> Path:
    """PNG grid of the first ``n`` uint8 NHWC images, ``nrow`` per row, 2 white pixels between them
    (torchvision's make_grid and save_image). Images smaller than ``min_side`` are enlarged with
    the whole grid by an integer factor, nearest neighbour, so an 8x8 digit stays a crisp block of
    pixels instead of a blur or a speck. Grayscale images are written as RGB with equal channels
    (make_grid's convention). Written under a temporary name and renamed."""
    from torchvision.utils import make_grid, save_image

    from rfc.utils.files import atomic_path

    imgs = torch.from_numpy(np.ascontiguousarray(images[:n])).permute(0, 3, 1, 2)
    grid = make_grid(imgs.float() / 255.0, nrow=min(nrow, len(imgs)), padding=2, pad_value=1.0)
    scale = max(1, -(-min_side // imgs.shape[2]))
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="PNG")
    return path
