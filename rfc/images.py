"""Image conversions and the sample grid, shared by the runner and the digits metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (B, C, H, W) -> uint8 (B, H, W, C), DiT's conversion clamp(127.5 x + 128)."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def save_grid(images: np.ndarray, path: Path, n: int = 64, min_side: int = 32) -> Path:
    """PNG grid of the first ``n`` images (8 per row); small images are enlarged (nearest)."""
    from PIL import Image

    imgs = images[:n]
    cols = min(8, len(imgs))
    rows = -(-len(imgs) // cols)
    _, h, w, c = imgs.shape
    pad = 2
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, -(-min_side // h))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    from rfc.files import atomic_path

    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return path
