"""Score a sample set made anywhere against a reference, like OpenAI's ADM evaluator.

    python scripts/evaluate.py REF.npz SAMPLES.npz [--extractor inception|digits] [--save-stats OUT.npz]
                               [--cache DIR]

REF.npz: an ADM reference batch (arr_0 and/or mu, sigma, mu_s, sigma_s), statistics written by
--save-stats or by a run (stats.npz), any sample set (arr_0), or a builtin reference's name, as a
run's eval.reference takes it (``digits``: the 1,797 bundled digits that dit-tiny rows score
against). SAMPLES.npz: arr_0 uint8 NHWC images (a run's samples.npz). Prints one JSON line with
fid, sfid, inception_score, precision, recall (null where the extractor cannot give one, with the reason in "notes").
--save-stats writes the samples' statistics in the same layout, reusable as REF.npz (a
full-compute run's statistics become the reference for FID2FC).
--cache DIR keeps REF.npz's extracted features there (a run's paths.store works), keyed by the
file's sha256 and the extractor's weights, so scoring again against an ADM reference batch does not
run its 10,000 images through Inception again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", type=Path)
    p.add_argument("samples", type=Path)
    p.add_argument("--extractor", default="inception", choices=["inception", "digits"])
    p.add_argument("--assets", type=Path, default=Path(os.environ.get("RFC_ASSETS", ROOT / "assets")))
    p.add_argument("--digits-classifier", type=Path, default=ROOT / "checkpoints" / "digits-classifier.pt")
    p.add_argument("--save-stats", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", type=Path, default=None, help="folder for the reference's extracted features")
    args = p.parse_args(argv)

    from eval.extractors import BUILTIN_REFERENCES, get_extractor, resolve_reference
    from eval.stats import (
        check_features,
        check_images,
        check_reference_file,
        quality_metrics,
        read_npz,
        save_stats,
    )
    from rfc.models.load import MissingAssetError
    from rfc.utils.errors import ConfigError, RunError
    from rfc.utils.files import check_writable_file

    paths = {"assets": str(args.assets), "digits_classifier": str(args.digits_classifier)}
    if args.cache is not None:
        paths["store"] = str(args.cache)
    spec = get_extractor(args.extractor)
    try:
        # Everything that can be checked cheaply, before any feature is extracted.
        if str(args.reference) not in BUILTIN_REFERENCES:  # a builtin data set is no file to check
            check_reference_file(args.reference, spec.name, spec.dim)
        images = read_npz(args.samples, "samples").get("arr_0")
        if images is None:
            raise ConfigError(f"{args.samples} has no arr_0 images")
        check_images(images.shape, images.dtype, args.samples)
        if len(images) < 2:
            raise ConfigError(f"{args.samples} holds {len(images)} image; FID needs at least 2")
        if args.save_stats is not None:
            check_writable_file(args.save_stats, "--save-stats")
        spec.check(paths)
        extract = spec.build(paths, args.device)
        feats = extract(images)
        check_features(feats, spec.name, str(args.samples))
        ref = resolve_reference(str(args.reference), spec, extract, paths)
        reason = "the Inception weights have no logits layer" if args.extractor == "inception" else None
        metrics = quality_metrics(feats, ref, reason)
        if args.save_stats is not None:
            save_stats(args.save_stats, feats, spec.name)
    except (MissingAssetError, ValueError, RunError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot use {err.filename or 'a file'}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(json.dumps({"extractor": spec.name, "reference": str(args.reference), "samples": str(args.samples),
                      "num_samples": len(images), **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
