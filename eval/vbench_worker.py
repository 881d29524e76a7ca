"""VBench's side of the VBench column: run in VBench's own environment, never imported by the harness.

    <vbench-env>/bin/python eval/vbench_worker.py REQUEST.json

The harness (eval/vbench.py) writes the videos as ``{prompt}-{k}.mp4`` and a request; this script
imports only the standard library and the ``vbench`` package (with its pins: transformers 4.33.2,
numpy < 2), so it runs where the harness cannot. The request:

- ``version``: the vbench release the harness's final-score arithmetic is checked for; any other
  installed release is refused;
- ``videos``, ``output``, ``result``: the video folder, VBench's output folder, where to write the
  result; ``device``; ``dimensions``: the dimensions to score;
- ``check: true`` instead: write ``{"version", "detectron2"}`` (the installed release or "none",
  whether detectron2 is importable) to ``result`` without importing either: the pre-flight the
  harness runs before sampling and before installing;
- ``fetch: true`` instead: download every weight VBench loads in local mode by the package's own code
  (``init_submodules`` with ``local=True``, the aesthetic head's loader) and bert-base-uncased into
  the Hugging Face cache (Tag2Text and GRiT load it by name), then stop.

Scoring calls ``VBench.evaluate`` in its standard mode with ``local=True`` on the dimensions that have
at least one video (a dimension with none would fail inside the package), and writes
``{"version", "scores": {dimension: score}, "videos": {dimension: count}, "unknown_prompts",
"unscored_videos"}``; the total is computed by the harness.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path

NAME = "rfc"
# Run as a script, this file's folder comes first on sys.path, where the harness's eval/vbench.py
# would shadow the package of the same name.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _prompt_of(filename: str) -> str:
    """The prompt of ``{prompt}-{k}.mp4`` (a prompt may itself hold '-')."""
    return Path(filename).stem.rsplit("-", 1)[0]


def fetch(dims: list[str]) -> None:
    """Every weight the dimensions load, by the package's own download code."""
    from vbench.aesthetic_quality import get_aesthetic_model
    from vbench.utils import CACHE_DIR, init_submodules

    init_submodules(dims, local=True)
    get_aesthetic_model(os.path.join(CACHE_DIR, "aesthetic_model", "emb_reader"))
    from transformers import BertModel, BertTokenizer

    BertTokenizer.from_pretrained("bert-base-uncased")
    BertModel.from_pretrained("bert-base-uncased")


def score(req: dict) -> dict:
    """Score the request's videos with VBench's standard mode (the module docstring)."""
    import torch
    import vbench
    from vbench import VBench

    full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    with open(full_info, encoding="utf-8") as f:
        info = json.load(f)
    dims_of: dict[str, set[str]] = {}
    for entry in info:
        dims_of.setdefault(entry["prompt_en"], set()).update(entry["dimension"])
    files = sorted(f for f in os.listdir(req["videos"]) if f.endswith(".mp4"))
    unknown = sorted({_prompt_of(f) for f in files} - set(dims_of))
    known = [f for f in files if _prompt_of(f) in dims_of]
    dims = [d for d in req["dimensions"] if any(d in dims_of[_prompt_of(f)] for f in known)]
    scores: dict[str, float] = {}
    counts: dict[str, int] = {}
    if dims:
        bench = VBench(torch.device(req["device"]), full_info, req["output"])
        bench.evaluate(videos_path=req["videos"], name=NAME, dimension_list=dims, local=True,
                       mode="vbench_standard")
        with open(os.path.join(req["output"], f"{NAME}_eval_results.json"), encoding="utf-8") as f:
            results = json.load(f)
        for d in dims:
            value, per_video = results[d][0], results[d][1]
            scores[d] = float(value)
            counts[d] = len(per_video) if isinstance(per_video, list) else 0
    return {"version": metadata.version("vbench"), "scores": scores, "videos": counts, "unknown_prompts": unknown,
            "unscored_videos": len(files) - len(known)}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: vbench_worker.py REQUEST.json", file=sys.stderr)
        return 2
    req = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        installed = metadata.version("vbench")
    except metadata.PackageNotFoundError:
        installed = "none"
    if req.get("check"):  # before the release check: the harness compares
        import importlib.util

        found = {"version": installed, "detectron2": importlib.util.find_spec("detectron2") is not None}
        Path(req["result"]).write_text(json.dumps(found), encoding="utf-8")
        return 0
    if installed != req["version"]:
        print(f"vbench {installed} is installed in {sys.prefix}; the harness scores with vbench {req['version']} "
              f"(python scripts/fetch_assets.py vbench rebuilds the environment)", file=sys.stderr)
        return 3
    if req.get("fetch"):
        fetch(req["dimensions"])
        return 0
    result = score(req)
    tmp = Path(req["result"] + ".part")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(req["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
