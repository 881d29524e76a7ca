"""VBench (Huang et al., 2024) for text-to-video rows: the column and its plumbing, not the scorer yet.

RFC's Table 3 reports VBench's total score (%) of each method's videos. The ``vbench`` package (0.1.5)
pins transformers 4.33.2 and numpy < 2, which cannot share an environment with this project's pins
(transformers 5, numpy 2), and its dimensions load a dozen models (CLIP, DINO, RAFT, MUSIQ, a
tagger, detectors...) by their own download code. How the harness will run it (an environment of its
own that the harness creates and calls, or the dimension scorers used without the package's pins,
each checked against the package's numbers) is not built yet. Until it is:

- ``missing()`` says so, so that ``eval.missing_metrics=error`` refuses a run that asks for the
  ``vbench`` metric before sampling, and ``skip`` leaves the column empty with this reason in the
  row's notes: never a number;
- ``SCORER`` is where a scorer plugs in: a function (videos uint8 (N, F, H, W, 3), one prompt per
  video, device) -> the total score in percent. The tests plug a small stand-in there to check that
  a video row's VBench column, its table and its figure are wired end to end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

Scorer = Callable[["np.ndarray", Sequence[str], "torch.device"], float]

SCORER: Scorer | None = None  # none ships yet (see the module docstring)
REASON = ("VBench is not available in this harness yet (the vbench package pins transformers 4.33.2 and numpy < 2, "
          "which cannot share this environment)")


def missing() -> tuple[str, str] | None:
    """(why VBench cannot be scored here, where to read more), or None when a scorer is plugged in."""
    return None if SCORER is not None else (REASON, "see docs/hunyuan_video.md")


def vbench_score(videos: np.ndarray, prompts: Sequence[str], device: torch.device) -> float:
    """VBench's total score (%) of uint8 (N, F, H, W, 3) videos with their prompts, by the plugged-in
    scorer; a RunError where none is."""
    from rfc.utils.errors import RunError

    if SCORER is None:
        raise RunError(f"cannot score vbench: {REASON}")
    if videos.ndim != 5 or len(prompts) != len(videos):
        raise ValueError(f"VBench needs uint8 (N, F, H, W, 3) videos and one prompt per video, got {videos.shape} "
                         f"and {len(prompts)} prompts")
    return float(SCORER(videos, prompts, device))
