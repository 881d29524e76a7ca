"""Write prompts/vbench.txt, VBench's standard prompt list, from the package's VBench_full_info.json.

    python scripts/vbench_prompts.py PATH/TO/VBench_full_info.json

VBench 0.1.5 ships VBench_full_info.json inside the package (vbench/VBench_full_info.json): 946
entries, each a prompt and the dimensions it is scored on. Two prompts appear twice (for two
dimensions each), and VBench names a video by its prompt, so the standard set is 944 distinct
prompts with 5 videos each: 4,720 videos.

The file lists the distinct prompts once, in an order that takes the dimensions in turn (VBench's
dimension order, each time the next prompt of that dimension not yet listed), so that any prefix of
the set spreads over every dimension: a run with fewer samples than the full protocol still has
videos for all 16 dimensions once it has at least 16 prompts. The set is the same; only the order is
the harness's. The harness's sample i gets prompt i mod 944 (rfc.models.prompts), so 4,720 samples
give each prompt its 5 videos.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# VBench's 16 dimensions in the order of its final-score script
DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
              "dynamic_degree", "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects",
              "human_action", "color", "spatial_relationship", "scene", "appearance_style", "temporal_style",
              "overall_consistency")
OUT = Path(__file__).resolve().parents[1] / "prompts" / "vbench.txt"


def ordered_prompts(full_info: list[dict]) -> list[str]:
    """VBench's distinct prompts, the dimensions taken in turn (see the module docstring)."""
    by_dim: dict[str, list[str]] = {d: [] for d in DIMENSIONS}
    for entry in full_info:
        for d in entry["dimension"]:
            if d not in by_dim:
                raise ValueError(f"unknown VBench dimension {d!r} in the prompt list")
            by_dim[d].append(entry["prompt_en"])
    seen: set[str] = set()
    out: list[str] = []
    position = dict.fromkeys(DIMENSIONS, 0)
    while any(position[d] < len(by_dim[d]) for d in DIMENSIONS):
        for d in DIMENSIONS:
            while position[d] < len(by_dim[d]) and by_dim[d][position[d]] in seen:
                position[d] += 1
            if position[d] < len(by_dim[d]):
                prompt = by_dim[d][position[d]]
                seen.add(prompt)
                out.append(prompt)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("full_info", type=Path, help="VBench_full_info.json of the vbench package (0.1.5)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    prompts = ordered_prompts(json.loads(args.full_info.read_text(encoding="utf-8")))
    if any("\n" in x or x != x.strip() or not x for x in prompts):
        raise SystemExit(f"{args.full_info}: a prompt is empty, has a line break or surrounding spaces")
    args.out.write_text("".join(f"{x}\n" for x in prompts), encoding="utf-8")
    print(f"{args.out}: {len(prompts)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
