"""Sample-quality metrics as OpenAI's ADM evaluator defines them, plus paired image metrics.

FID / sFID: Frechet distance of Gaussian fits (eval.fid). IS: exp(E_x KL(p(y|x) || p(y))) averaged
over 10 splits. Precision / recall: the k = 3 nearest-neighbour manifold estimate (Kynkaanniemi et
al.): a point is inside a set's manifold when it lies within the distance from some set member to
that member's k-th nearest neighbour; precision = fraction of samples inside the reference
manifold, recall = fraction of reference points inside the samples' manifold.
"""

from __future__ import annotations

import numpy as np
import torch


def inception_score(logits: np.ndarray, splits: int = 10) -> float:
    """IS from (N, K) logits; N must be divisible into ``splits`` parts (ADM: 10 of 5,000)."""
    if len(logits) < splits:
        raise ValueError(f"need at least {splits} samples for {splits} IS splits, got {len(logits)}")
    probs = torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(dim=1).numpy()
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-30) - np.log(marginal + 1e-30))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), clamped at 0 like ADM's."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)


def _radii(feats: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in its own set."""
    out = []
    for s in range(0, len(feats), block):
        d = _sq_distances(feats[s : s + block], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(out)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    inside = []
    for s in range(0, len(points), block):
        d = _sq_distances(points[s : s + block], centres)
        inside.append((d <= radii[None]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 2048) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference`` features."""
    if len(reference) <= k or len(samples) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    ref = torch.from_numpy(np.asarray(reference, dtype=np.float64))
    smp = torch.from_numpy(np.asarray(samples, dtype=np.float64))
    precision = _coverage(smp, ref, _radii(ref, k, block), block)
    recall = _coverage(ref, smp, _radii(smp, k, block), block)
    return precision, recall


def psnr_ssim(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean per-image PSNR (dB, data range 255) and SSIM of uint8 NHWC images against their pairs.
    Identical images have infinite PSNR. SSIM uses an 11-pixel Gaussian window, or the largest odd
    window that fits images smaller than that (the 8x8 digits use 7)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if images.shape != reference.shape:
        raise ValueError(f"paired images differ in shape: {images.shape} vs {reference.shape}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(reference).permute(0, 3, 1, 2).double()
    mse = (x - y).pow(2).flatten(1).mean(1)
    psnr = torch.where(mse == 0, torch.full_like(mse, float("inf")),
                       peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=(1, 2, 3)))
    side = min(x.shape[-2:])
    kernel = 11 if side >= 11 else (side if side % 2 else side - 1)
    ssim = structural_similarity_index_measure(x, y, data_range=255.0, kernel_size=kernel, reduction="none")
    return float(psnr.mean()), float(ssim.mean())
