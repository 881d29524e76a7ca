"""Score a sample set made anywhere against a reference, like OpenAI's ADM evaluator.

    python scripts/evaluate.py REF.npz SAMPLES.npz [--extractor inception|digits] [--save-stats OUT.npz]

REF.npz: an ADM reference batch (arr_0 and/or mu, sigma, mu_s, sigma_s), statistics written by
--save-stats or by a run (stats.npz), or any sample set (arr_0). SAMPLES.npz: arr_0 uint8 NHWC
images (a run's samples.npz). Prints one JSON line with fid, sfid, inception_score, precision,
recall (null where the extractor cannot give one, with the reason in "notes").
--save-stats writes the samples' statistics in the same layout, reusable as REF.npz (a
full-compute run's statistics become the reference for FID2FC).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", type=Path)
    p.add_argument("samples", type=Path)
    p.add_argument("--extractor", default="inception", choices=["inception", "digits"])
    p.add_argument("--assets", type=Path, default=Path(os.environ.get("RFC_ASSETS", ROOT / "assets")))
    p.add_argument("--digits-classifier", type=Path, default=ROOT / "checkpoints" / "digits-classifier.pt")
    p.add_argument("--save-stats", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    from eval.extractors import get_extractor
    from eval.stats import load_reference, quality_metrics, save_stats
    from rfc.models.load import MissingAssetError

    for f in (args.reference, args.samples):
        if not f.exists():
            print(f"error: {f} does not exist", file=sys.stderr)
            return 2
    paths = {"assets": str(args.assets), "digits_classifier": str(args.digits_classifier)}
    spec = get_extractor(args.extractor)
    try:
        spec.check(paths)
        extract = spec.build(paths, args.device)
        with np.load(args.samples) as data:
            if "arr_0" not in data.files:
                print(f"error: {args.samples} has no arr_0 images", file=sys.stderr)
                return 2
            images = data["arr_0"]
        feats = extract(images)
        ref = load_reference(args.reference, spec.name, extract)
        reason = "the Inception weights have no logits layer" if args.extractor == "inception" else None
        metrics = quality_metrics(feats, ref, reason)
    except (MissingAssetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.save_stats is not None:
        save_stats(args.save_stats, feats, spec.name)
    print(json.dumps({"extractor": spec.name, "reference": str(args.reference), "samples": str(args.samples),
                      "num_samples": len(images), **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
