"""Scale-out: torchrun sharding, shards + resume after SIGKILL, and the submitit launcher.

The multi-process tests run the real entry point (run.py) in subprocesses on CPU (gloo)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rfc.run.runner import run
from rfc.run.shards import ResumeError, batch_starts, config_differences, rank_starts

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def _arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / "samples.npz") as z:
        return z["arr_0"], z["arr_1"]


@pytest.mark.parametrize("n, bs, k", [(20, 4, 2), (21, 4, 3), (3, 4, 2), (64, 8, 8)])
def test_rank_batches_partition_the_single_process_batches(n, bs, k):
    shares = [rank_starts(n, bs, r, k) for r in range(k)]
    merged = sorted(s for share in shares for s in share)
    assert merged == batch_starts(n, bs)  # every batch exactly once, cut as a single process cuts it


def test_config_differences_name_the_changed_key():
    old = {"method": {"_target_": "FORA", "interval": 3}, "seed": 0}
    assert config_differences(old, old) == []
    diffs = config_differences(old, {"method": {"_target_": "FORA", "interval": 4}, "seed": 0})
    assert diffs == ["method.interval: 3 -> 4"]


def test_two_process_gloo_run_equals_the_single_process_run(make_cfg, tmp_path):
    """torchrun with 2 CPU ranks: merged samples (and the on-demand full-compute pair) are
    bit-identical to one process with the same batch size; exactly one CSV row, no latency."""
    overrides = ["method=fora", "eval.num_samples=20", "eval.batch_size=4", "sampler.num_steps=10", "seed=5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           str(ROOT / "run.py"), *overrides, f"paths.outputs={tmp_path}/dist", f"paths.runs_csv={tmp_path}/dist.csv"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "dist.csv")
    assert len(rows) == 1 and rows[0]["processes"] == "2"
    assert rows[0]["latency_s"] == "" and float(rows[0]["images_per_s"]) > 0
    assert "latency not measured: 2 processes drew the samples" in rows[0]["notes"]
    dist_dir, entry = Path(rows[0]["output_dir"]), Path("store", "full_compute", rows[0]["setting_id"])
    assert len([p for p in (tmp_path / "dist").rglob("samples.npz") if "store" not in p.parts]) == 1

    single = run(make_cfg(*overrides), tmp_path / "single", progress=False)
    assert single.setting_id == rows[0]["setting_id"]  # ranks and threads do not change the setting
    for a_dir, b_dir in ((dist_dir, tmp_path / "single"), (tmp_path / "dist" / entry, tmp_path / "outputs" / entry)):
        a, b = _arrays(a_dir), _arrays(b_dir)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), a_dir
    assert float(rows[0]["nfc"]) == single.nfc and float(rows[0]["psnr"]) == pytest.approx(single.psnr, abs=1e-9)


def test_sigkill_then_resume_ends_with_the_uninterrupted_sample_set(make_cfg, tmp_path):
    """Kill -9 after a few shards, resume into the same folder: the set is bit-identical to an
    uninterrupted run's, every index exactly once, and only the missing batches were drawn."""
    overrides = ["sampler=ddpm", "sampler.num_steps=100", "eval.num_samples=24", "eval.batch_size=4", "seed=2",
                 "eval.score=false"]
    folder = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={folder}",
           f"paths.runs_csv={tmp_path}/runs.csv"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = folder / "shards"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(shards.glob("*.npz"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npz")}
    assert 2 <= len(before) < 6, f"the kill should land mid-run, found {len(before)} of 6 shards"
    assert not (folder / "samples.npz").exists() and not _rows(tmp_path / "runs.csv")

    rec = run(make_cfg(*overrides, f"resume={folder}"), folder, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npz")}
    assert all(after[name] == t for name, t in before.items())  # earlier shards kept, not redrawn
    assert len(after) == 6 and not list(shards.glob(".*.tmp"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["completed"] == [[0, 24]]
    assert rec.notes and f"resumed: {4 * len(before)} of 24" in rec.notes

    run(make_cfg(*overrides), tmp_path / "whole", progress=False)
    a, b = _arrays(folder), _arrays(tmp_path / "whole")
    assert a[0].shape[0] == 24 and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_resume_with_a_changed_method_parameter_is_refused_before_work(make_cfg, tmp_path):
    base = ["method=fora", "eval.num_samples=8", "eval.batch_size=4", "sampler.num_steps=6", "eval.score=false"]
    run(make_cfg(*base), tmp_path / "run", progress=False)
    shards = sorted((tmp_path / "run" / "shards").glob("*.npz"))
    stamp = [p.stat().st_mtime_ns for p in shards]
    with pytest.raises(ResumeError, match=r"method\.interval: 3 -> 4"):
        run(make_cfg(*base, "method.interval=4"), tmp_path / "run", progress=False)
    assert [p.stat().st_mtime_ns for p in shards] == stamp  # nothing already written is touched
    assert len(_rows(tmp_path / "runs.csv")) == 1
    # scoring settings are not part of the sample set: changing them resumes (and draws nothing)
    rec = run(make_cfg(*base, "eval.paired=off", "logger=none"), tmp_path / "run", progress=False)
    assert [p.stat().st_mtime_ns for p in shards] == stamp and "resumed: 8 of 8" in rec.notes


def test_cli_resume_refusal_exits_with_a_clear_message(make_cfg, tmp_path):
    overrides = ["eval.num_samples=4", "eval.batch_size=4", "sampler.num_steps=3", "eval.score=false"]
    run(make_cfg(*overrides), tmp_path / "r", progress=False)
    second = subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides, f"paths.runs_csv={tmp_path}/runs.csv",
                             "seed=1", f"resume={tmp_path}/r"], capture_output=True, text=True, timeout=120,
                            env=_env())
    assert second.returncode == 2 and "refusing to resume" in second.stderr and "seed: 0 -> 1" in second.stderr


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "launcher=local", "method=none,fora", "model=dit-tiny",
           "eval=smoke", "sampler.num_steps=10", "eval.score=false", f"paths.outputs={tmp_path}/outputs",
           f"paths.runs_csv={tmp_path}/runs.csv"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "runs.csv")
    assert sorted(r["method"] for r in rows) == ["fora", "none"]
    assert all(r["latency_s"] == "" and "launcher=submitit_local" in r["notes"] for r in rows)
    assert len({r["sweep"] for r in rows}) == 1 and list((tmp_path / "outputs").rglob(".submitit"))


def _submitit_tasks() -> list[int]:
    """Pids of running submitit task processes (``python -m submitit.core._submit <folder>``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"submitit.core._submit" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the submitit task through /proc (Linux)")
def test_a_preempted_submitit_job_is_requeued_and_resumes_from_its_shards(tmp_path):
    """launcher=local (submitit's local executor): the job gets the preemption signal (SIGUSR2, as
    SLURM sends it before a preemption or time limit) after its first shards; submitit requeues it
    (Hydra's launcher checkpoints the job as submitted), and the requeued job resumes in the same
    folder from the shards already written, recording one row that says so."""
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "launcher=local", "method=none", "model=dit-tiny",
           "eval.num_samples=40", "eval.batch_size=2", "sampler.num_steps=20", "eval.warmup_batches=0",
           "eval.score=false", f"paths.outputs={tmp_path}/outputs", f"paths.runs_csv={tmp_path}/runs.csv"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((tmp_path / "outputs").rglob("shards/*.npz"))) >= 2:
            break
        time.sleep(0.05)
    tasks = _submitit_tasks()
    assert proc.poll() is None and len(tasks) == 1, "the job ended before it could be preempted"
    os.kill(tasks[0], signal.SIGUSR2)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    rows = _rows(tmp_path / "runs.csv")
    assert len(rows) == 1 and "resumed: " in rows[0]["notes"] and "of 40 samples" in rows[0]["notes"]
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "outputs").rglob(".submitit/*/*.out"))
    assert "Requeued job" in logs or "requeue" in logs.lower()
