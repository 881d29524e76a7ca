"""Record tests/data/vbench_reference.json: what VBench's own code gives, for the tests to hold the harness to.

    python scripts/vbench_reference.py --scripts PATH/TO/VBench/scripts [--python VBENCH-ENV/bin/python]

Two records, each made by running VBench's code, not the harness's:

- ``final_score``: dimension scores drawn at random (seeded) and the quality, semantic and total
  scores that the repository's final-score script computes from them (scripts/cal_final_score.py's
  functions with scripts/constant.py, imported from a checkout of Vchitect/VBench given by
  ``--scripts``). eval.vbench.total_score must give the same numbers.
- ``temporal_flickering``: seeded videos written by the harness as mp4 (eval.vbench.write_videos,
  the encoding every VBench row uses) and scored by the vbench package in its environment through
  eval/vbench_worker.py: the one dimension that loads no weights, so it runs here. The test writes
  the same videos again and checks that they decode to frames giving the package's score, which
  holds the harness's encoding and naming to what the package reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from eval import vbench

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "vbench_reference.json"
SEED = 20261205
TF_VIDEOS = 4  # videos of the first two temporal-flickering prompts, two each


def reference_videos(seed: int = SEED) -> np.ndarray:
    """Four 9-frame 64x64 videos: a still picture with per-frame noise of growing strength, so the
    temporal-flickering scores differ from video to video."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (TF_VIDEOS, 1, 64, 64, 3))
    strength = np.linspace(1.0, 4.0, TF_VIDEOS)[:, None, None, None, None]
    noise = rng.integers(-24, 25, (TF_VIDEOS, 9, 64, 64, 3)) * strength
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def final_score_cases(scripts: Path, n: int = 5) -> list[dict]:
    """Random dimension scores and VBench's final-score script's quality / semantic / total."""
    sys.path.insert(0, str(scripts))
    spec = importlib.util.spec_from_file_location("cal_final_score", scripts / "cal_final_score.py")
    assert spec is not None and spec.loader is not None
    cal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cal)
    rng = np.random.default_rng(SEED)
    cases = []
    for _ in range(n):
        scores = {d: float(rng.uniform(*vbench.NORMALIZE[d])) for d in vbench.DIMENSIONS}
        upload = {d.replace("_", " "): v for d, v in scores.items()}  # the script's keys
        norm = cal.get_nomalized_score(upload)
        quality, semantic = cal.get_quality_score(norm), cal.get_semantic_score(norm)
        cases.append({"scores": scores, "quality": quality, "semantic": semantic,
                      "total": cal.get_final_score(quality, semantic)})
    return cases


def temporal_flickering(python: Path) -> dict:
    """The package's temporal flickering of the reference videos, through the worker."""
    import os

    os.environ["RFC_VBENCH_PYTHON"] = str(python)
    prompts = [line for line in (vbench.WORKER.parents[1] / "prompts" / "vbench.txt").read_text().splitlines()]
    tf = [p for p in prompts if p.startswith("In a still frame")][:2]  # VBench's temporal-flickering prompts
    chosen = [tf[0], tf[1], tf[0], tf[1]]
    videos = reference_videos()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "videos").mkdir()
        names = vbench.video_names(chosen)
        vbench.write_videos(videos, names, work / "videos")
        result = vbench._run_worker({"videos": str(work / "videos"), "output": str(work / "out"),
                                     "result": str(work / "result.json"), "device": "cpu",
                                     "dimensions": ["temporal_flickering"]}, work)
        per_video = json.loads((work / "out" / "rfc_eval_results.json").read_text())["temporal_flickering"][1]
    by_name = {Path(v["video_path"]).name: v["video_results"] for v in per_video}
    return {"seed": SEED, "prompts": chosen, "names": names, "per_video": [by_name[n] for n in names],
            "score": result["scores"]["temporal_flickering"], "vbench": result["version"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", type=Path, required=True, help="scripts/ of a Vchitect/VBench checkout")
    p.add_argument("--python", type=Path, default=None, help="VBench's environment's python (default: eval.vbench)")
    args = p.parse_args(argv)
    record = {
        "made_with": {"imageio": metadata.version("imageio"), "imageio-ffmpeg": metadata.version("imageio-ffmpeg")},
        "final_score": final_score_cases(args.scripts),
        "temporal_flickering": temporal_flickering(args.python or vbench.python()),
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(record['final_score'])} final-score cases, temporal flickering "
          f"{record['temporal_flickering']['score']:.6f} (vbench {record['temporal_flickering']['vbench']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
