"""Feature extractors behind one interface: uint8 NHWC images in, named arrays out.

Each extractor also says what its Frechet distance is measured against (its reference), so a
row always names both the feature space and the reference set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rfc.models.load import require_file


@dataclass
class ExtractorSpec:
    name: str
    reference: str
    check: Callable[[dict], None]  # fails fast (before sampling) when an input file is missing
    build: Callable[[dict, str], Callable[[np.ndarray], dict[str, np.ndarray]]]
    reference_images: Callable[[], np.ndarray] | None = None


def _digits_check(paths: dict) -> None:
    require_file(paths["digits_classifier"], "digits classifier", hint="python scripts/train_tiny.py")


def _digits_build(paths: dict, device: str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    from eval.digits import DigitsExtractor

    return DigitsExtractor(Path(paths["digits_classifier"]), device=device)


def _digits_reference() -> np.ndarray:
    from eval.digits import load_digits_uint8

    return load_digits_uint8()[0]


EXTRACTORS: dict[str, ExtractorSpec] = {
    "digits": ExtractorSpec("digits-classifier", "sklearn-digits-1797", _digits_check, _digits_build,
                            _digits_reference),
}


def get_extractor(name: str) -> ExtractorSpec:
    if name not in EXTRACTORS:
        raise ValueError(f"feature extractor {name!r} is not available in this version (available: "
                         f"{', '.join(EXTRACTORS)}). "
                         "Set eval.score=false to record a run without quality metrics.")
    return EXTRACTORS[name]
