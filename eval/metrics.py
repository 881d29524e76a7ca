"""Sample-quality metrics as OpenAI's ADM evaluator defines them, plus paired image metrics.

FID / sFID: Frechet distance of Gaussian fits (eval.fid). IS: exp(E_x KL(p(y|x) || p(y))) per part
of ``IS_SPLIT_SIZE`` = 5,000 consecutive samples (the last part may be smaller), averaged over the
parts, exactly as ADM's ``compute_inception_score`` does: the number of parts follows from the
sample count (50,000 -> 10 parts, 12,000 -> 5,000 / 5,000 / 2,000), so IS is comparable with the
papers' only when it is split the same way. Precision / recall: the k = 3 nearest-neighbour
manifold estimate (Kynkaanniemi et al.): a point is inside a set's manifold when it lies within the
distance from some set member to that member's k-th nearest neighbour; precision = fraction of
samples inside the reference manifold, recall = fraction of reference points inside the samples'
manifold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from rfc.utils.progress import bar, label

if TYPE_CHECKING:
    from tqdm import tqdm

IS_SPLIT_SIZE = 5000  # ADM: compute_inception_score(activations, split_size=5000)


def is_parts(n: int, split_size: int = IS_SPLIT_SIZE) -> list[int]:
    """Sizes of the consecutive parts IS averages over: ``split_size`` each, the rest in a last,
    smaller part (ADM's ``range(0, n, split_size)``). Public so the split itself can be checked."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"inception score needs at least 1 sample, got {n!r}")
    if isinstance(split_size, bool) or not isinstance(split_size, int | np.integer) or split_size < 1:
        raise ValueError(f"inception score split_size must be a positive integer, got {split_size!r}")
    return [min(split_size, n - start) for start in range(0, n, split_size)]


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """IS of (N, K) classifier logits, as ADM computes it: softmax per row, then for each part of
    ``is_parts(N, split_size)`` exp(mean over rows of KL(p(y|x) || part's mean p(y))), and the mean
    of those part scores.

    The softmax is taken in float64 after subtracting each row's maximum, so large logits neither
    overflow nor lose the small probabilities. There is no epsilon inside the logs: a probability
    is 0 only when it underflows float64 (a logit gap over ~745), and its term is then given its
    limit, 0 * log 0 = 0 (ADM's arithmetic gives NaN there; wherever it gives a number, this is
    the same arithmetic term for term)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"inception score needs (N, K) logits, got an array of shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"inception score needs at least one sample and one class, got logits of shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("inception score logits hold NaN or inf")
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    scores = []
    start = 0
    for size in is_parts(len(probs), split_size):
        part = probs[start : start + size]
        start += size
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), clamped at 0 like ADM's."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)


def _radii(feats: torch.Tensor, k: int, block: int, shown: tqdm | None = None) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in its own set."""
    out = []
    for s in range(0, len(feats), block):
        d = _sq_distances(feats[s : s + block], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
        if shown is not None:
            shown.update(1)
    return torch.cat(out)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int,
              shown: tqdm | None = None) -> float:
    inside = []
    for s in range(0, len(points), block):
        d = _sq_distances(points[s : s + block], centres)
        inside.append((d <= radii[None]).any(dim=1))
        if shown is not None:
            shown.update(1)
    return float(torch.cat(inside).double().mean())


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 2048) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference`` features."""
    if len(reference) <= k or len(samples) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    ref = torch.from_numpy(np.asarray(reference, dtype=np.float64))
    smp = torch.from_numpy(np.asarray(samples, dtype=np.float64))
    # float64 distances of 50,000 samples to each other take minutes on a CPU: a bar over the blocks
    blocks = 2 * (-(-len(ref) // block) + -(-len(smp) // block))
    with bar(total=blocks, unit="block", desc=label("precision/recall"), secondary=True) as shown:
        precision = _coverage(smp, ref, _radii(ref, k, block, shown), block, shown)
        recall = _coverage(ref, smp, _radii(smp, k, block, shown), block, shown)
    return precision, recall


def psnr_ssim(images: np.ndarray, reference: np.ndarray, device: torch.device | str = "cpu",
              chunk: int | None = None) -> tuple[float, float]:
    """Mean per-image PSNR (dB, data range 255) and SSIM of uint8 NHWC images against their pairs.
    Identical images have infinite PSNR. SSIM uses an 11-pixel Gaussian window, or the largest odd
    window that fits images smaller than that (the 8x8 digits use 7). Computed in float64 on
    ``device``, ``chunk`` images at a time (all at once by default): float64 convolutions have no
    fast CPU kernel, and SSIM of four 1024x1024 images at once took 163 s and 22 GB on a 2-core CPU.
    Per-image values do not depend on the chunking."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if images.shape != reference.shape:
        raise ValueError(f"paired images differ in shape: {images.shape} vs {reference.shape}")
    step = chunk or len(images)
    psnrs, ssims = [], []
    for s in bar(iterable=range(0, len(images), step), unit="chunk", desc=label("PSNR/SSIM"), secondary=True):
        x = torch.from_numpy(images[s:s + step]).to(device).permute(0, 3, 1, 2).double()
        y = torch.from_numpy(reference[s:s + step]).to(device).permute(0, 3, 1, 2).double()
        mse = (x - y).pow(2).flatten(1).mean(1)
        psnrs.append(torch.where(mse == 0, torch.full_like(mse, float("inf")),
                                 peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=(1, 2, 3))))
        side = min(x.shape[-2:])
        kernel = 11 if side >= 11 else (side if side % 2 else side - 1)
        ssims.append(structural_similarity_index_measure(x, y, data_range=255.0, kernel_size=kernel,
                                                         reduction="none"))
    return float(torch.cat(psnrs).cpu().mean()), float(torch.cat(ssims).cpu().mean())
