"""The tiny model's domain: scikit-learn's bundled digits, and a small classifier whose
penultimate layer is the feature space for the tiny model's Frechet distance.

Everything goes through uint8 NHWC images, the same format the runner writes for samples, so
the reference set and the samples are featurised by exactly one path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from rfc.utils.images import to_uint8_nhwc
from rfc.utils.progress import bar, label

DIGITS_LEVELS = 16  # digits pixels are integers 0..16


def digits_to_unit(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) digits in 0..16 -> float32 in [-1, 1], the model's pixel space."""
    return (images.astype(np.float32) / DIGITS_LEVELS) * 2.0 - 1.0


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 (N, 8, 8, 1) images and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    unit = torch.from_numpy(digits_to_unit(data.images)).unsqueeze(1)  # (N, 1, 8, 8)
    return to_uint8_nhwc(unit), data.target.astype(np.int64)


class DigitsClassifier(nn.Module):
    """Two conv layers and two linear layers on 8x8 images; ``features`` gives the 64-d
    penultimate activations used for Frechet distances."""

    feature_dim = 64

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # (B, 64, 4, 4)
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.feature_dim), nn.GELU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    @staticmethod
    def prepare(images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 8, 8, 1) -> float (B, 1, 8, 8) in [-1, 1]."""
        return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def features(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images_u8))

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images_u8))


class DigitsExtractor:
    """Feature extractor of the tiny model's metrics: classifier features and predicted labels."""

    name = "digits-classifier"

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = DigitsClassifier()
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images_u8: np.ndarray, batch_size: int = 1000) -> dict[str, np.ndarray]:
        """uint8 (N, 8, 8, 1) -> {"features": (N, 64) float64, "predictions": (N,) int64}."""
        if images_u8.ndim != 4 or images_u8.shape[1:] != (8, 8, 1) or images_u8.dtype != np.uint8:
            raise ValueError(
                f"digits extractor expects uint8 (N, 8, 8, 1) images, got {images_u8.dtype} {images_u8.shape}"
            )
        feats, preds = [], []
        with bar(total=len(images_u8), unit="img", desc=label("digits features"), secondary=True) as shown:
            for start in range(0, len(images_u8), batch_size):
                batch = torch.from_numpy(images_u8[start : start + batch_size]).to(self.device)
                f = self.model.features(batch)
                feats.append(f.double().cpu())
                preds.append(self.model.head(f).argmax(dim=1).cpu())
                shown.update(len(batch))
        return {"features": torch.cat(feats).numpy(), "predictions": torch.cat(preds).numpy()}
