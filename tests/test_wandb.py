"""W&B as its users expect it, offline (no network, everything under tmp_path): one run per job,
opened when the job starts with the resolved config, a readable name, tags and the sweep as its
group; sampling progress while it samples; the metrics, the grid and the row at the end; a failed
job's run finishes with its exit code. With logger=csv, wandb is never imported.

Offline runs are read back from their ``run-<id>.wandb`` file: a LevelDB-style log of
``wandb_internal_pb2.Record`` protobufs (the format ``wandb sync`` uploads), decoded here with
wandb's own protobuf classes."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["eval=smoke", "eval.num_samples=4", "eval.batch_size=2", "sampler.num_steps=5"]

# -- reading an offline run ----------------------------------------------------------------------

BLOCK = 32768  # the log's block size; a record's 7-byte header never straddles two blocks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):  # noqa: ANN201 - yields wandb_internal_pb2.Record
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1 and data[6] == 0, "not a .wandb log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:  # noqa: ANN001 - a protobuf summary or history item
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    folder: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    exit_code: int | None = None

    @classmethod
    def read(cls, folder: Path) -> OfflineRun:
        run = cls(folder)
        for r in records(next(folder.glob("run-*.wandb"))):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.name, run.group, run.job_type = r.run.display_name, r.run.run_group, r.run.job_type
                run.tags = list(r.run.tags)
                run.config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
            elif kind == "summary":
                run.summary.update({_key(u): json.loads(u.value_json) for u in r.summary.update})
            elif kind == "history":
                run.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "exit":
                run.exit_code = r.exit.exit_code
        return run


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    return [OfflineRun.read(p) for p in sorted((wandb_dir / "wandb").glob("offline-run-*"))]


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict[str, str]:
    """W&B offline with every folder it writes under tmp_path and no credentials."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-env"), "WANDB_CACHE_DIR": str(tmp_path / "wc"),
           "WANDB_DATA_DIR": str(tmp_path / "wd"), "WANDB_CONFIG_DIR": str(tmp_path / "wcfg")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return env


# -- tests ---------------------------------------------------------------------------------------


def test_a_sweep_is_one_group_of_one_run_per_job(tmp_path, offline):
    """`python run.py -m method=none,fora logger=both` on dit-tiny: two offline runs in one group
    (the sweep folder), named by model and method with its key settings, tagged, each holding the
    resolved config, the sampling progress per batch, the row's metrics as its summary, the sample
    grid, the row as a table, its run.log, and exit code 0."""
    outputs = tmp_path / "outputs"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "method=none,fora", "logger=both", *FAST,
                           f"paths.outputs={outputs}", f"paths.runs_csv={tmp_path / 'runs.csv'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, **offline, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    runs = offline_runs(outputs / "wandb")
    assert len(runs) == 2 and len(rows) == 2
    assert sorted(r.name for r in runs) == ["dit-tiny/fora N=3", "dit-tiny/none"]
    sweep = rows[0]["sweep"]
    assert {r.group for r in runs} == {"sweep " + "/".join(Path(sweep).parts[-2:])}
    assert sorted(r.job_type for r in runs) == ["cached", "full-compute"]
    by_method = {r.summary["method"]: r for r in runs}
    for row in rows:
        run = by_method[row["method"]]
        assert run.tags == ["dit-tiny", row["method"], "ddim", "tf32", "cpu"]
        assert run.config["model"]["name"] == "dit-tiny" and run.config["method"].get("_target_")  # resolved config
        assert run.config["harness"]["sweep"] == sweep and run.config["harness"]["setting_id"] == row["setting_id"]
        assert run.summary["run_id"] == row["run_id"] and run.summary["nfc"] == float(row["nfc"])
        assert run.summary["fid"] == pytest.approx(float(row["fid"])) and run.summary["tflops"] > 0
        progress = [h for h in run.history if "sampling/samples_done" in h]
        assert [h["sampling/samples_done"] for h in progress] == [2, 4]
        assert all(h["sampling/images_per_s"] > 0 and "sampling/batch_s" in h for h in progress)
        assert run.summary["grid/_type"] == "image-file" and run.summary["row/_type"] == "table-file"
        files = run.folder / "files"
        assert list((files / "media" / "images").glob("grid_*.png"))
        table = json.loads(next((files / "media" / "table").glob("row_*.table.json")).read_text())
        assert table["columns"][:3] == ["run_id", "time", "git_sha"] and table["data"][0][0] == row["run_id"]
        assert "result: dit-tiny/" in (files / "run.log").read_text()
        assert run.exit_code == 0
    fora = by_method["fora"]  # paired with the set the none job published: nothing drawn for pairing
    assert "paired with full-compute set" in fora.summary["notes"] and "drawn by this run" not in fora.summary["notes"]
    assert not any("pairing/samples_done" in h for h in fora.history)
    assert proc.stdout.count("wandb:   offline run 'dit-tiny/") == 2


@pytest.mark.parametrize("fault, code, error", [("non-finite", 2, "came out non-finite"),
                                                ("ctrl-c", 130, "interrupted")])
def test_a_failed_job_finishes_its_run_with_the_exit_code(make_cfg, tmp_path, offline, monkeypatch, capsys, fault,
                                                          code, error):
    """A job that fails after its W&B run opened (samples that turn non-finite; Ctrl-C after the
    first batch) finishes the run with the job's exit code, the error in its summary, and the
    batches it finished in its history."""
    from rfc.run.cli import run_job
    from rfc.run.shards import ShardStore

    overrides = [*FAST, "logger=wandb", "eval.score=false"]
    if fault == "non-finite":
        overrides.append("cfg_scale=1e38")
    else:
        real = ShardStore.write

        def interrupted(self, batch):  # noqa: ANN001, ANN202 - ShardStore.write's signature
            if batch.start > 0:
                raise KeyboardInterrupt
            return real(self, batch)

        monkeypatch.setattr(ShardStore, "write", interrupted)
    assert run_job(make_cfg(*overrides), tmp_path / "out", overrides) == code
    assert capsys.readouterr().err.count("error: ") == 1
    [run] = offline_runs(tmp_path / "outputs" / "wandb")
    assert run.exit_code == code and run.summary["exit_code"] == code and error in run.summary["error"]
    assert run.name == "dit-tiny/none" and "run_id" not in run.summary  # no row was made
    done = [h["sampling/samples_done"] for h in run.history if "sampling/samples_done" in h]
    assert done == ([] if fault == "non-finite" else [2])
    assert "config:" in (run.folder / "files" / "run.log").read_text()


def test_logger_csv_never_imports_wandb(tmp_path):
    """W&B stays optional: a run with logger=csv (the default) imports no wandb module."""
    argv = ["run.py", *FAST, "eval.score=false", f"paths.outputs={tmp_path}/o", f"paths.runs_csv={tmp_path}/r.csv"]
    probe = ("import atexit, runpy, sys; "
             "atexit.register(lambda: print('wandb imported:', any(m.split('.')[0] == 'wandb' for m in sys.modules))); "
             f"sys.argv = {argv!r}; runpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "row:" in proc.stdout and proc.stdout.strip().endswith("wandb imported: False")


def test_a_video_row_logs_its_preview_as_a_video(make_cfg, tmp_path, offline):
    """model=hunyuan-video-tiny with logger=wandb: the run's preview.gif is a W&B video beside the
    grid of frame strips."""
    from rfc.run.cli import run_job

    overrides = ["model=hunyuan-video-tiny", "eval=smoke", "eval.num_samples=2", "eval.batch_size=2",
                 "sampler.num_steps=2", "logger=wandb", "eval.score=false"]
    assert run_job(make_cfg(*overrides), tmp_path / "out", overrides) == 0
    [run] = offline_runs(tmp_path / "outputs" / "wandb")
    assert run.summary["preview/_type"] == "video-file" and run.summary["grid/_type"] == "image-file"
    assert list((run.folder / "files" / "media" / "videos").glob("preview_*.gif"))
