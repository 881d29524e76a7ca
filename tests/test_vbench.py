"""VBench's column (eval/vbench.py, eval/vbench_worker.py): the final-score arithmetic and the videos'
encoding against what VBench's own code gave (tests/data/vbench_reference.json, recorded by
scripts/vbench_reference.py from the repository's final-score script and the vbench 0.1.5 package in
its own environment), and the worker protocol end to end with a stand-in package in place of vbench
(the real one cannot share this environment, and its weights are not here)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import vbench

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((ROOT / "tests" / "data" / "vbench_reference.json").read_text())


def test_total_score_is_what_vbench_final_score_script_gives():
    """Quality, semantic and total scores equal scripts/cal_final_score.py's (to 1e-12, float
    summation order aside) for random dimension scores."""
    for case in REFERENCE["final_score"]:
        got = vbench.total_score(case["scores"])
        for key in ("quality", "semantic", "total"):
            assert got[key] == pytest.approx(case[key], abs=1e-12)
    with pytest.raises(ValueError, match="missing: color"):
        vbench.total_score({d: 0.5 for d in vbench.DIMENSIONS if d != "color"})


def test_the_prompt_set_is_vbench_standard_list():
    """prompts/vbench.txt: 944 distinct prompts (VBench_full_info.json's 946 entries, two prompts
    twice), its first 16 spread over the dimensions (scripts/vbench_prompts.py); the 4,720 videos of
    the protocol are 5 per prompt."""
    from rfc.models.prompts import load_prompts

    prompts = load_prompts("vbench").prompts
    assert len(prompts) == len(set(prompts)) == vbench.STANDARD_PROMPTS == 944
    assert "In a still frame, a stop sign" in prompts[:16] and "a bird and a cat" in prompts[:16]
    names = vbench.video_names(load_prompts("vbench").for_samples(vbench.STANDARD_PROMPTS * 5 + 1))
    assert names[0] == f"{prompts[0]}-0.mp4" and names[944 * 4] == f"{prompts[0]}-4.mp4" and names[-1] is None
    with pytest.raises(ValueError, match="cannot name a file"):
        vbench.video_names(["a/b"])


def test_written_videos_give_the_package_temporal_flickering(tmp_path):
    """The harness's mp4s decode to frames whose temporal flickering (VBench's formula: 1 - mean
    absolute difference of consecutive frames / 255) is what the vbench package computed from the
    same files (to 1e-6: float32 frames)."""
    import imageio.v2 as imageio

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from vbench_reference import reference_videos
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    ref = REFERENCE["temporal_flickering"]
    names = vbench.video_names(ref["prompts"])
    assert names == ref["names"]
    assert vbench.write_videos(reference_videos(ref["seed"]), names, tmp_path) == 4
    for name, want in zip(names, ref["per_video"], strict=True):
        reader = imageio.get_reader(tmp_path / name, format="FFMPEG")
        frames = np.stack(list(reader.iter_data())).astype(np.float32)
        assert frames.shape == (9, 64, 64, 3)
        got = (255.0 - np.mean([np.abs(frames[i] - frames[i + 1]).mean() for i in range(8)])) / 255.0
        assert got == pytest.approx(want, abs=1e-6)
    assert np.mean(ref["per_video"]) == pytest.approx(ref["score"], abs=1e-12)


STAND_IN = '''
"""A stand-in for the vbench package: its API (VBench.evaluate in standard mode, the results file),
scores from the decoded mp4s, and a log of what it was given."""
import json, os
import numpy as np
import imageio.v2 as imageio

class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.device, self.full_info, self.out = device, full_info_dir, output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, read_frame=False,
                 mode="vbench_standard", **kwargs):
        assert mode == "vbench_standard" and local
        info = json.load(open(self.full_info))
        files = sorted(os.listdir(videos_path))
        results, decoded = {}, {}
        for i, d in enumerate(dimension_list):
            per = []
            for e in info:
                for k in range(5):
                    f = e["prompt_en"] + "-" + str(k) + ".mp4"
                    if d in e["dimension"] and f in files:
                        reader = imageio.get_reader(os.path.join(videos_path, f), format="FFMPEG")
                        frames = np.stack(list(reader.iter_data()))
                        decoded[f] = [list(frames.shape), float(frames.mean())]
                        per.append({"video_path": f, "video_results": 0.3 + 0.02 * i + frames.mean() / 2550})
            results[d] = [float(np.mean([p["video_results"] for p in per])), per]
        json.dump(results, open(os.path.join(self.out, name + "_eval_results.json"), "w"))
        json.dump({"files": files, "device": str(self.device), "dimensions": dimension_list, "decoded": decoded,
                   "results": {d: r[0] for d, r in results.items()}}, open(os.environ["STAND_IN_LOG"], "w"))
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A stand-in vbench package (version given) with a prompt list of ``prompts`` (prompt i scored on
    dimension i mod 16), run by this interpreter as VBench's environment; its weight folder filled
    with empty files. Returns (make, log path)."""
    pkg = tmp_path / "standin"
    weights = tmp_path / "vbench-weights"
    for rel in vbench.ASSETS:
        (weights / rel).parent.mkdir(parents=True, exist_ok=True)
        (weights / rel).write_bytes(b"")
    log = tmp_path / "stand_in_log.json"
    monkeypatch.setenv("RFC_VBENCH_PYTHON", sys.executable)
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(weights))
    monkeypatch.setenv("PYTHONPATH", str(pkg))
    monkeypatch.setenv("STAND_IN_LOG", str(log))

    def make(prompts: list[str], version: str = vbench.VERSION) -> None:
        (pkg / "vbench").mkdir(parents=True, exist_ok=True)
        (pkg / "vbench" / "__init__.py").write_text(textwrap.dedent(STAND_IN))
        info = [{"prompt_en": p, "dimension": [vbench.DIMENSIONS[i % 16]]} for i, p in enumerate(prompts)]
        (pkg / "vbench" / "VBench_full_info.json").write_text(json.dumps(info))
        (pkg / "detectron2").mkdir(exist_ok=True)
        (pkg / "detectron2" / "__init__.py").write_text("")
        dist = pkg / "vbench-0.1.5.dist-info"
        dist.mkdir(exist_ok=True)
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vbench\nVersion: {version}\n")

    return make, log


def test_a_video_row_is_scored_by_the_worker_in_vbench_environment(make_cfg, tmp_path, stand_in):
    """A hunyuan-video-tiny row with prompts=vbench: its 16 videos reach the worker in another
    interpreter as ``{prompt}-0.mp4`` (9 frames of 64x64, decoding to the samples' content), the
    worker scores the dimensions that have videos, and the row's vbench is the total of its scores
    (VBench's arithmetic), its notes the quality / semantic scores, the coverage and each dimension."""
    from rfc.models.prompts import load_prompts
    from rfc.run.runner import run

    make, log = stand_in
    prompts = list(load_prompts("vbench").prompts[:16])
    make(prompts)
    assert vbench.missing() is None
    cfg = make_cfg("model=hunyuan-video-tiny", "method=none", "eval=smoke", "eval.num_samples=16",
                   "eval.batch_size=8", "sampler.num_steps=2", "prompts=vbench", "+eval.t2i_metrics=[vbench]",
                   "eval.missing_metrics=error")
    rec = run(cfg, tmp_path / "none", progress=False)
    videos = np.load(tmp_path / "none" / "samples.npz")["arr_0"]
    seen = json.loads(log.read_text())
    assert seen["files"] == sorted(f"{p}-0.mp4" for p in prompts) and seen["device"] == "cpu"
    assert seen["dimensions"] == list(vbench.DIMENSIONS)
    for i, p in enumerate(prompts):
        shape, mean = seen["decoded"][f"{p}-0.mp4"]
        assert shape == [9, 64, 64, 3] and mean == pytest.approx(videos[i].mean(), abs=2.0)  # lossy H.264
    assert rec.vbench == pytest.approx(100 * vbench.total_score(seen["results"])["total"], abs=1e-9)
    assert "vbench 0.1.5: quality" in rec.notes and "partial: 16 of the protocol's 4720 videos" in rec.notes
    assert "subject_consistency=" in rec.notes and "no static filter" in rec.notes


def test_videos_missing_a_dimension_or_the_standard_prompts_leave_the_column_empty(stand_in):
    """Two videos cover two dimensions: no total (never one of the dimensions scored), the notes name
    the dimensions without videos; a prompt that is not VBench's is said, a sixth video of one prompt
    too."""
    make, _ = stand_in
    make(["a cat", "a dog"])
    videos = np.full((8, 9, 16, 16, 3), 100, dtype=np.uint8)
    notes: list[str] = []
    got = vbench.vbench_score(videos, ["a cat", "a dog", "not standard", *["a cat"] * 5], torch.device("cpu"), notes)
    assert got is None and len(notes) == 1
    assert notes[0].startswith("vbench not scored: no video for temporal_flickering, motion_smoothness")
    assert "subject_consistency" not in notes[0] and "background_consistency" not in notes[0]
    assert "1 prompts are not VBench's standard prompts" in notes[0] and "1 videos beyond VBench's 5" in notes[0]


def test_another_vbench_release_or_a_failing_worker_is_a_loud_error(stand_in, monkeypatch):
    """Another vbench release, or no detectron2, is found before sampling (the worker's pre-flight)
    and refused at scoring; an interpreter that does not exist is named."""
    from rfc.utils.errors import RunError

    make, _ = stand_in
    make(["a cat"], version="0.1.4")
    videos = np.zeros((1, 9, 16, 16, 3), dtype=np.uint8)
    why, fix = vbench.missing()  # before sampling
    assert why.endswith("has vbench 0.1.4; the harness scores with vbench 0.1.5") and fix == vbench.FETCH
    with pytest.raises(RunError, match="has vbench 0.1.4; the harness scores with vbench 0.1.5"):
        vbench.vbench_score(videos, ["a cat"], torch.device("cpu"))
    with pytest.raises(RunError, match="vbench 0.1.4 is installed .* scores with vbench 0.1.5"):  # the worker's own
        vbench.package_score(videos, ["a cat"], torch.device("cpu"), [])
    make(["a cat"])
    (Path(os.environ["PYTHONPATH"]) / "detectron2" / "__init__.py").unlink()
    (Path(os.environ["PYTHONPATH"]) / "detectron2").rmdir()
    assert vbench.missing()[0].startswith("detectron2 is not installed in VBench's environment")
    monkeypatch.setenv("RFC_VBENCH_PYTHON", str(Path(sys.executable).with_name("no-such-python")))
    assert "VBench's environment" in vbench.missing()[0] and vbench.missing()[1] == vbench.FETCH


def test_missing_names_the_environment_then_each_weight(tmp_path, monkeypatch):
    """Before sampling: no environment names it and the fetch command; an environment without a
    weight names the file and the dimensions that load it; one whose interpreter does not run says so."""
    monkeypatch.setenv("RFC_VBENCH_ENV", str(tmp_path / "env"))
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "weights"))
    why, fix = vbench.missing()
    assert str(tmp_path / "env" / "bin" / "python") in why and fix == "python scripts/fetch_assets.py vbench"
    (tmp_path / "env" / "bin").mkdir(parents=True)
    (tmp_path / "env" / "bin" / "python").write_text("")
    for rel in vbench.ASSETS:
        if rel != "amt_model/amt-s.pth":
            (tmp_path / "weights" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "weights" / rel).write_bytes(b"")
    why, fix = vbench.missing()
    assert why.endswith("amt_model/amt-s.pth (needed by motion_smoothness)") and fix == vbench.FETCH
    (tmp_path / "weights" / "amt_model").mkdir()
    (tmp_path / "weights" / "amt_model" / "amt-s.pth").write_bytes(b"")
    why, fix = vbench.missing()  # the files are there; the interpreter is not one
    assert why.startswith(f"VBench's environment {tmp_path / 'env' / 'bin' / 'python'} does not run")
    assert fix == vbench.FETCH


def test_fetch_lets_the_package_download_its_weights(stand_in, tmp_path, monkeypatch):
    """``fetch_assets.py vbench`` with the environment in place: the worker calls the package's own
    download code (init_submodules for all 16 dimensions in local mode, the aesthetic head's loader,
    bert-base-uncased by name); a weight still missing afterwards is an error naming it."""
    make, log = stand_in
    make(["a cat"])
    weights = Path(vbench.cache_dir())
    for rel in vbench.ASSETS:
        (weights / rel).unlink()
    pkg = Path(os.environ["PYTHONPATH"])
    (pkg / "vbench" / "utils.py").write_text(textwrap.dedent('''
        import json, os
        CACHE_DIR = os.environ["VBENCH_CACHE_DIR"]
        def init_submodules(dimension_list, local=False, read_frame=False):
            json.dump({"dims": dimension_list, "local": local}, open(os.environ["STAND_IN_LOG"], "w"))
            for rel in os.environ["STAND_IN_FILES"].split(","):
                os.makedirs(os.path.dirname(os.path.join(CACHE_DIR, rel)), exist_ok=True)
                open(os.path.join(CACHE_DIR, rel), "w").close()
        '''))
    (pkg / "vbench" / "aesthetic_quality.py").write_text(textwrap.dedent('''
        import os
        def get_aesthetic_model(cache_folder):
            os.makedirs(cache_folder, exist_ok=True)
            open(os.path.join(cache_folder, "sa_0_4_vit_l_14_linear.pth"), "w").close()
        '''))
    (pkg / "transformers").mkdir()
    (pkg / "transformers" / "__init__.py").write_text(textwrap.dedent('''
        import os
        class BertTokenizer:
            @staticmethod
            def from_pretrained(name):
                open(os.environ["STAND_IN_LOG"] + "." + name, "w").close()
        BertModel = BertTokenizer
        '''))
    monkeypatch.setenv("RFC_VBENCH_ENV", str(tmp_path / "env"))
    others = [rel for rel in vbench.ASSETS if not rel.startswith("aesthetic_model/")]
    monkeypatch.setenv("STAND_IN_FILES", ",".join(others[1:]))  # the first one is not downloaded
    with pytest.raises(OSError, match=f"still missing from .*: {others[0]}"):
        vbench.prepare(quiet=True)
    assert json.loads(log.read_text()) == {"dims": list(vbench.DIMENSIONS), "local": True}
    assert Path(str(log) + ".bert-base-uncased").is_file()
    monkeypatch.setenv("STAND_IN_FILES", ",".join(others))
    vbench.prepare(quiet=True)
    assert vbench.missing() is None
