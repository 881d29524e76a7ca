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


VIDEO_FRAMES = 8  # frames of a video a grid row shows, evenly spaced from first to last


def video_strips(videos: np.ndarray, n: int, frames: int = VIDEO_FRAMES) -> tuple[np.ndarray, int]:
    """The first videos of uint8 (N, F, H, W, C) as image rows: at most ``frames`` frames of each,
    evenly spaced from the first to the last, and at most n // frames videos (at least one), as
    (videos x frames, H, W, C) images and the number per row."""
    count = videos.shape[1]
    picked = np.unique(np.linspace(0, count - 1, min(frames, count)).round().astype(int))
    rows = max(1, n // len(picked))
    return videos[:rows, picked].reshape(-1, *videos.shape[2:]), len(picked)


def save_grid(images: np.ndarray, path: Path, n: int = 64, min_side: int = 32, nrow: int = 8) -> Path:
    """PNG grid of the first ``n`` uint8 NHWC images, ``nrow`` per row, 2 white pixels between them
    (torchvision's make_grid and save_image); videos (N, F, H, W, C) as strips, one video per row
    (``video_strips``). Images smaller than ``min_side`` are enlarged with the whole grid by an
    integer factor, nearest neighbour, so an 8x8 digit stays a crisp block of pixels instead of a blur
    or a speck. Grayscale images are written as RGB with equal channels (make_grid's convention).
    Written under a temporary name and renamed."""
    from torchvision.utils import make_grid, save_image

    from rfc.utils.files import atomic_path

    if images.ndim == 5:
        images, nrow = video_strips(images, n)
        n = len(images)
    imgs = torch.from_numpy(np.ascontiguousarray(images[:n])).permute(0, 3, 1, 2)
    grid = make_grid(imgs.float() / 255.0, nrow=min(nrow, len(imgs)), padding=2, pad_value=1.0)
    scale = max(1, -(-min_side // imgs.shape[2]))
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="PNG")
    return path


def save_video_preview(videos: np.ndarray, path: Path, n: int = 4, fps: int = 8, min_side: int = 128) -> Path:
    """An animated GIF a person can watch: the first ``n`` uint8 (N, F, H, W, C) videos side by
    side, 2 white pixels apart, ``fps`` frames per second, looping; small videos enlarged by an
    integer factor (nearest neighbour). Written under a temporary name and renamed."""
    from PIL import Image

    from rfc.utils.files import atomic_path

    clips = np.ascontiguousarray(videos[:n])
    k, frames, h, w, c = clips.shape
    scale = max(1, -(-min_side // h))
    canvas = np.full((frames, h * scale, k * (w * scale + 2) - 2, 3), 255, np.uint8)
    for i, clip in enumerate(clips):
        big = clip.repeat(scale, axis=1).repeat(scale, axis=2)
        canvas[:, :, i * (w * scale + 2):i * (w * scale + 2) + w * scale] = big if c == 3 else big[..., :1]
    pictures = [Image.fromarray(frame) for frame in canvas]
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:],
                         duration=max(1, round(1000 / fps)), loop=0)
    return path
