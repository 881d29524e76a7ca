"""The built-in metrics, registered in the result row's column order (eval.registry reads this
module on its first look-up). Each entry names the function that computes it: FID, sFID, IS,
precision and recall against the reference (eval.stats, ADM's definitions), FID and sFID to full
compute, PSNR and SSIM against full compute (eval.metrics), LPIPS, ImageReward and CLIP score
(eval.t2i) and the domain classifier's agreement with the labels.

Metrics one call computes together (FID ... recall from ``quality_metrics``; PSNR and SSIM) share
that call through ``MetricInputs.shared``, so registering them one by one costs nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from eval import t2i, vbench
from eval.metrics import psnr_ssim
from eval.registry import CLASS, T2I, T2V, Metric, MetricInputs, register
from eval.stats import distances, quality_metrics
from rfc.utils.progress import task

QUALITY = ("features", "stats", "reference")  # against the reference, in the extractor's space
FLOOR_FID = 1000  # FID-like estimates: bias ~ feature dimension / N (rfc/reports/figures.py)
FLOOR_MEAN = 100  # per-image means: standard error sd / sqrt(N)


def _quality(inputs: MetricInputs) -> dict[str, object]:
    """FID, sFID, IS, precision and recall of the samples against the reference, computed once."""

    def run() -> dict[str, object]:
        extractor = inputs.extractor or ""
        reason = "the Inception weights have no logits layer" if extractor.startswith("inception") else None
        with task("precision/recall"):
            q = quality_metrics(inputs.features, inputs.reference, reason, inputs.stats)
        inputs.note(q["notes"])
        return q

    return inputs.shared("quality", run)


def _to_full_compute(inputs: MetricInputs) -> tuple[float, float | None]:
    """(FID, sFID) of the samples' statistics against the full-compute set's, computed once."""
    return inputs.shared("to_full_compute", lambda: distances(inputs.stats, inputs.pair_stats))


def _psnr_ssim(inputs: MetricInputs) -> tuple[float, float]:
    """Mean PSNR and SSIM against full compute, computed once. Text-to-image images (1024 px) go
    on the run's device (t2i.psnr_ssim_on), videos frame by frame (``frames``); class-conditional
    rows keep their CPU float64 numbers."""

    def run() -> tuple[float, float]:
        with task("PSNR/SSIM"):
            if inputs.kind in (T2I, T2V):
                return t2i.psnr_ssim_on(frames(inputs.images), frames(inputs.pair), torch.device(inputs.device))
            return psnr_ssim(inputs.images, inputs.pair)

    return inputs.shared("psnr_ssim", run)


def frames(images: np.ndarray) -> np.ndarray:
    """Videos (N, F, H, W, C) as their N x F frames, each an image paired with the same frame of
    the full-compute video (how the video caching papers report PSNR, SSIM and LPIPS: per frame,
    averaged); images as they are."""
    return images.reshape(-1, *images.shape[2:]) if images.ndim == 5 else images


def _class_acc(inputs: MetricInputs) -> float | None:
    """How often the domain classifier's prediction is the conditioning label (extractors with one)."""
    feats = inputs.features or {}
    if "predictions" not in feats:
        return None
    return float((feats["predictions"] == inputs.labels).mean())


def _clip(inputs: MetricInputs) -> float:
    device = torch.device(inputs.device)
    model, tokenizer = t2i.load_clip(device)
    try:
        return t2i.clip_score(inputs.images, inputs.prompts, model, tokenizer, device)
    finally:
        del model


def _part(compute: Callable[[MetricInputs], Any], key: str | int) -> Callable[[MetricInputs], float | None]:
    """One value of what a shared computation returns (a dict's key, a tuple's index)."""
    return lambda inputs: compute(inputs)[key]


BUILTIN = (
    Metric(
        name="fid",
        column="fid",
        compute=_part(_quality, "fid"),
        needs=QUALITY,
        rows=(CLASS,),
        better=-1,
        label="FID",
        axis="FID",
        tables=(CLASS,),
        table_order=0,
        figures=(CLASS,),
        figure_order=0,
        min_samples=FLOOR_FID,
    ),
    Metric(
        name="sfid",
        column="sfid",
        compute=_part(_quality, "sfid"),
        needs=QUALITY,
        rows=(CLASS,),
        better=-1,
        label="sFID",
        axis="sFID",
        tables=(CLASS,),
        table_order=1,
        figures=(CLASS,),
        figure_order=2,
        min_samples=FLOOR_FID,
    ),
    Metric(
        name="inception_score",
        column="inception_score",
        compute=_part(_quality, "inception_score"),
        needs=QUALITY,
        rows=(CLASS,),
        better=1,
        label="IS",
        axis="Inception Score",
        tables=(CLASS,),
        table_order=4,
        figures=(CLASS,),
        figure_order=3,
        min_samples=FLOOR_FID,
    ),
    Metric(
        name="precision",
        column="precision",
        compute=_part(_quality, "precision"),
        needs=QUALITY,
        rows=(CLASS,),
        better=1,
        label="Precision",
        axis="Precision (k = 3 manifold)",
        log_label="precision",
        log_format="{:.3f}",
        min_samples=FLOOR_FID,
    ),
    Metric(
        name="recall",
        column="recall",
        compute=_part(_quality, "recall"),
        needs=QUALITY,
        rows=(CLASS,),
        better=1,
        label="Recall",
        axis="Recall (k = 3 manifold)",
        log_label="recall",
        log_format="{:.3f}",
        min_samples=FLOOR_FID,
    ),
    Metric(
        name="fid2fc",
        column="fid2fc",
        compute=_part(_to_full_compute, 0),
        needs=("stats", "pair_stats"),
        rows=(CLASS,),
        better=-1,
        label="FID2FC",
        axis="FID to full compute (FID2FC)",
        tables=(CLASS,),
        table_order=2,
        figures=(CLASS,),
        figure_order=1,
        min_samples=FLOOR_FID,
    ),
    Metric(
        name="sfid2fc",
        column="sfid2fc",
        compute=_part(_to_full_compute, 1),
        needs=("stats", "pair_stats"),
        rows=(CLASS,),
        better=-1,
        label="sFID2FC",
        axis="sFID2FC",
        tables=(CLASS,),
        table_order=3,
        min_samples=FLOOR_FID,
    ),
    # mean per-image PSNR (dB) against full compute, same noise
    Metric(
        name="psnr",
        column="psnr",
        compute=_part(_psnr_ssim, 0),
        needs=("images", "pair"),
        rows=(CLASS, T2I, T2V),
        better=1,
        label="PSNR",
        axis="PSNR vs full compute (dB)",
        log_format="{:.4g} dB",
        tables=(T2I, T2V),
        table_order=0,
        figures=(T2I, T2V),
        figure_order=0,
        min_samples=FLOOR_MEAN,
    ),
    # mean per-image SSIM against full compute
    Metric(
        name="ssim",
        column="ssim",
        compute=_part(_psnr_ssim, 1),
        needs=("images", "pair"),
        rows=(CLASS, T2I, T2V),
        better=1,
        label="SSIM",
        axis="SSIM vs full compute",
        log_format="{:.4f}",
        tables=(T2I, T2V),
        table_order=1,
        min_samples=FLOOR_MEAN,
    ),
    # mean per-image LPIPS (AlexNet) against full compute (text-to-image rows)
    Metric(
        name="lpips",
        column="lpips",
        compute=lambda i: t2i.lpips_score(frames(i.images), frames(i.pair), torch.device(i.device)),
        needs=("images", "pair"),
        rows=(T2I, T2V),
        better=-1,
        label="LPIPS",
        axis="LPIPS vs full compute",
        log_format="{:.4f}",
        tables=(T2I, T2V),
        table_order=2,
        figures=(T2I, T2V),
        figure_order=3,
        min_samples=FLOOR_MEAN,
        check=lambda: t2i.weights_missing("lpips"),
    ),
    # mean ImageReward of image and prompt (text-to-image rows)
    Metric(
        name="image_reward",
        column="image_reward",
        compute=lambda i: t2i.image_reward_score(i.images, i.prompts, torch.device(i.device)),
        needs=("images", "prompts"),
        rows=(T2I,),
        better=1,
        label="ImageReward",
        axis="ImageReward",
        log_format="{:.4f}",
        tables=(T2I,),
        table_order=3,
        figures=(T2I,),
        figure_order=1,
        min_samples=FLOOR_MEAN,
        check=lambda: t2i.weights_missing("image_reward"),
    ),
    # mean CLIP score of image and prompt, the papers' scale (eval/t2i.py)
    Metric(
        name="clip",
        column="clip_score",
        compute=_clip,
        needs=("images", "prompts"),
        rows=(T2I,),
        better=1,
        label="CLIP",
        axis="CLIP score",
        tables=(T2I,),
        table_order=4,
        figures=(T2I,),
        figure_order=2,
        min_samples=FLOOR_MEAN,
        check=lambda: t2i.weights_missing("clip"),
    ),
    # VBench's total score of the videos with their prompts, by the vbench package (text-to-video rows; eval/vbench.py)
    Metric(
        name="vbench",
        column="vbench",
        compute=lambda i: vbench.vbench_score(i.images, i.prompts, torch.device(i.device), i.notes),
        needs=("images", "prompts"),
        rows=(T2V,),
        better=1,
        label="VBench (%)",
        axis="VBench total score (%)",
        log_format="{:.2f}",
        tables=(T2V,),
        table_order=3,
        figures=(T2V,),
        figure_order=1,
        min_samples=FLOOR_MEAN,
        check=vbench.missing,
    ),
    # the domain classifier's agreement with the conditioning labels
    Metric(
        name="class_acc",
        column="class_acc",
        compute=_class_acc,
        needs=("features", "labels"),
        rows=(CLASS,),
        better=1,
        label="class_acc",
        axis="Classifier agreement with the labels",
        log_format="{:.3f}",
    ),
)

for _metric in BUILTIN:
    register(_metric)
