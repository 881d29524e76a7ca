"""Numbers that cannot mislead: one definition of a comparable setting, latency only when the
device was the job's alone, one shared full-compute set per setting, cached reference features."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rfc.run.loggers import append_csv
from rfc.run.row import RunRecord
from rfc.run.setting import SAMPLE_KEYS, TIMING_KEYS, setting_id
from rfc.utils.devices import DeviceUse, concurrency
from rfc.utils.errors import RunError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["eval.num_samples=8", "eval.batch_size=4", "sampler.num_steps=6"]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def _sweep(tmp_path: Path, *args: str, wandb: str = "disabled") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *args, "eval=smoke",
                           f"paths.outputs={tmp_path}/out", f"paths.runs_csv={tmp_path}/runs.csv"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": wandb, "WANDB_API_KEY": ""})


def _assert_one_wandb_run_per_row(wandb_dir: Path, rows: list[dict]) -> None:
    """W&B offline: one run per job, holding the resolved config, the row and the sample grid."""
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == len(rows)
    logged = set()
    for run_dir in runs:  # offline runs keep config, summary and history in the run's .wandb log
        data = next(run_dir.glob("run-*.wandb")).read_bytes()
        assert b"_target_" in data and b"cfg_scale" in data  # the resolved config
        assert b"nfc" in data and b"fid" in data  # the row's metrics
        logged |= {r["run_id"] for r in rows if r["run_id"].encode() in data}
        assert list((run_dir / "files" / "media").rglob("*.png"))  # the sample grid
    assert logged == {r["run_id"] for r in rows}


# --------------------------------------------------------------------------------------------
# Latency only when the device was ours; the full-compute set drawn once per setting
# --------------------------------------------------------------------------------------------


def test_concurrent_sweep_records_no_latency_and_draws_full_compute_once(tmp_path):
    """Three jobs at once (joblib, 3 workers): no row claims a latency, each says why, and the
    full-compute set they all pair with is drawn once, by one of them, into the store. The same
    sweep run serially afterwards records latencies and draws nothing."""
    proc = _sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=3", "method=fora,taylorseer,rfc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "runs.csv")
    assert sorted(r["method"] for r in rows) == ["fora", "rfc", "taylorseer"]
    assert all(len(r) == len(RunRecord.columns()) and r["fid"] for r in rows)  # whole rows from parallel appends
    for r in rows:
        assert r["latency_s"] == "" and r["timed_batches"] == "0" and float(r["images_per_s"]) > 0
        assert "latency not measured: launcher=joblib runs up to 3 jobs at once" in r["notes"]
    entries = [p for p in (tmp_path / "out" / "store" / "full_compute").iterdir() if p.is_dir()]
    assert [e.name for e in entries] == [rows[0]["setting_id"]] and len({r["setting_id"] for r in rows}) == 1
    assert sum("drawn by this run" in r["notes"] for r in rows) == 1  # one job drew, the others reused
    assert all(f"paired with full-compute set {entries[0].name}" in r["notes"] for r in rows)
    assert not (entries[0] / "shards").exists() and len(list(entries[0].glob("samples.npz"))) == 1
    published = json.loads((entries[0] / "setting.json").read_text())
    assert published["source"] == "drawn for pairing"

    # Hydra's basic launcher: one job at a time (logged to W&B offline too, one run per job)
    proc = _sweep(tmp_path, "method=fora,taylorseer,rfc", "logger=both", f"logger.wandb.dir={tmp_path}/wb",
                  wandb="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    serial = _rows(tmp_path / "runs.csv")[3:]
    assert len(serial) == 3
    _assert_one_wandb_run_per_row(tmp_path / "wb", serial)
    for r in serial:
        assert float(r["latency_s"]) > 0 and r["timed_batches"] == "1", r["notes"]
        assert "drawn by this run" not in r["notes"] and entries[0].name in r["notes"]
    assert json.loads((entries[0] / "setting.json").read_text())["token"] == published["token"]  # not redrawn
    assert [p.name for p in (tmp_path / "out" / "store" / "full_compute").iterdir()] == [entries[0].name]
    for old, new in zip(rows, sorted(serial, key=lambda r: [x["method"] for x in rows].index(r["method"])),
                        strict=True):
        assert old["psnr"] == new["psnr"]  # the same pair: bit-identical samples, one thread or two
        assert float(old["fid2fc"]) == pytest.approx(float(new["fid2fc"]), rel=1e-5)  # sqrtm rounds by BLAS threads


def test_a_job_sharing_the_device_records_no_latency(make_cfg, tmp_path):
    """Another job registered on the device while the batches are timed: the row leaves latency
    empty and names that job; alone again, the next run records it."""
    from rfc.run.runner import run

    cfg = make_cfg(*TINY, "eval.score=false")
    with DeviceUse(torch.device("cpu")):
        shared = run(cfg, tmp_path / "shared", progress=False)
    assert shared.latency_s is None and shared.timed_batches == 0
    assert f"{shared.device} was shared" in shared.notes and "another job of this harness" in shared.notes
    assert "pid" in shared.notes
    alone = run(cfg, tmp_path / "alone", progress=False)
    assert alone.latency_s > 0 and alone.timed_batches == 1 and alone.notes.startswith("timed on a quiet cpu")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="other processes' CPU time is read from /proc (Linux)")
def test_a_cpu_burning_process_beside_a_timed_run_leaves_its_latency_empty(make_cfg, tmp_path, real_quiet_limit):
    """Another program (not the harness) burning a core during the timed batches: the row has no
    latency and says which load it saw; the same run alone records its latency and how quiet the
    CPU was."""
    from rfc.run.runner import run
    from rfc.utils.devices import QUIET_CORES

    cfg = make_cfg("eval.num_samples=16", "eval.batch_size=8", "sampler.num_steps=50", "eval.warmup_batches=0",
                   "eval.score=false")
    burn = "import time\nend = time.time() + 120\nwhile time.time() < end: pass"
    burner = subprocess.Popen([sys.executable, "-c", burn])
    try:
        deadline = time.monotonic() + 30
        while _cpu_seconds(burner.pid) < 0.3 and time.monotonic() < deadline:  # burning before the first batch
            time.sleep(0.05)
        busy = run(cfg, tmp_path / "busy", progress=False)
    finally:
        burner.kill()
        burner.wait()
    assert busy.latency_s is None and busy.timed_batches == 0
    # each batch long enough for the per-batch test, or all of them together for the row's
    assert "(other processes used" in busy.notes or "over the timed batches" in busy.notes, busy.notes
    for attempt in range(3):  # a shared build machine's own load comes and goes: the same run, alone, again
        alone = run(cfg, tmp_path / f"alone{attempt}", progress=False)
        if alone.latency_s is not None:
            break
    if alone.latency_s is None:  # the machine itself stayed busy: leaving latency empty was right; say so
        assert "(other processes used" in alone.notes or "over the timed batches" in alone.notes, alone.notes
        pytest.skip(f"other processes kept this machine busy through 3 runs, so the quiet half could not be shown: "
                    f"{alone.notes}")
    assert alone.latency_s > 0 and alone.timed_batches == 2, alone.notes
    quiet = float(alone.notes.split("other processes used ")[1].split()[0])
    assert quiet <= QUIET_CORES + max(0, (os.cpu_count() or 1) - torch.get_num_threads())


def test_device_registry_sees_jobs_that_come_go_or_die(tmp_path):
    root = tmp_path / "registry"
    with DeviceUse("cpu", root) as me:
        before = me.snapshot()
        assert before.others == [] and DeviceUse.shared(before, me.snapshot()) is None
        with DeviceUse("cpu", root):
            during = me.snapshot()
        assert len(during.others) == 1 and "pid" in DeviceUse.shared(before, during)
        after = me.snapshot()
        assert after.others == [] and DeviceUse.shared(before, after) == ("another job of this harness, which started "
                                                                     "and ended meanwhile")
        with DeviceUse("cuda-other", root):
            assert DeviceUse.shared(after, me.snapshot()) is None  # another device is not this one
        code = ("import os; from rfc.utils.devices import DeviceUse\n"
                f"u = DeviceUse('cpu', {str(root)!r}).__enter__(); os.kill(os.getpid(), 9)")
        subprocess.run([sys.executable, "-c", code], timeout=60)
        dead = me.snapshot()
        assert dead.others == [] and len(list((root / "cpu").glob("*.job"))) == 1  # the killed job's file is gone


@pytest.mark.parametrize("launcher, n_jobs, processes, alone", [
    ("basic", None, 1, True), ("joblib", 1, 1, True), ("joblib", 3, 1, False), ("joblib", -1, 1, False),
    ("submitit_local", None, 1, False), ("submitit_slurm", None, 1, False), ("basic", None, 2, False)])
def test_launchers_that_run_jobs_at_once_never_time(launcher, n_jobs, processes, alone):
    assert (concurrency(launcher, n_jobs, processes) is None) == alone


# --------------------------------------------------------------------------------------------
# One definition of a setting: pairing and tables never cross it
# --------------------------------------------------------------------------------------------


def test_pairing_never_crosses_precision_or_batch_size(make_cfg, tmp_path):
    """Full compute at fp32 and batches of 4 is in the store; a cached run at another batch size
    or precision does not pair with it (eval.paired=find: the store has nothing for its setting),
    the same setting does."""
    from rfc.run.runner import run

    full = run(make_cfg(*TINY, "precision=fp32"), tmp_path / "full", progress=False)
    assert full.psnr is None and "this full-compute row is their reference" in full.notes  # published to the store
    same = run(make_cfg(*TINY, "precision=fp32", "method=fora", "eval.paired=find"), tmp_path / "same",
               progress=False)
    assert same.setting_id == full.setting_id and same.fid2fc > 0 and full.setting_id in same.notes
    for change in ("eval.batch_size=8", "precision=bf16"):
        other = run(make_cfg(*TINY, "precision=fp32", "method=fora", "eval.paired=find", change),
                    tmp_path / change.replace("=", "_"), progress=False)
        assert other.setting_id != full.setting_id
        assert other.fid2fc is None and other.psnr is None and "paired metrics missing" in other.notes


def test_a_replaced_or_edited_full_compute_set_is_refused(make_cfg, tmp_path, capsys):
    """The store's set carries the sha256 it was published with: replaced by another setting's set
    with the same labels (another step count), or edited in place through the run folder it is
    hard-linked from, a cached run refuses it naming the entry, instead of pairing with it."""
    from rfc.run.cli import run_job
    from rfc.run.store import store_root

    cfg = make_cfg(*TINY, "eval.score=false")
    assert run_job(cfg, tmp_path / "full", []) == 0
    entry = next(p for p in store_root(cfg.paths).iterdir() if p.is_dir())
    other = make_cfg("eval.num_samples=8", "eval.batch_size=4", "sampler.num_steps=5", "eval.score=false")
    assert run_job(other, tmp_path / "other", []) == 0
    original = (entry / "samples.npz").read_bytes()
    (entry / "samples.npz").unlink()  # replaced: same labels, other images
    (entry / "samples.npz").write_bytes((tmp_path / "other" / "samples.npz").read_bytes())
    capsys.readouterr()
    cached = make_cfg(*TINY, "method=fora", "eval.paired=find")
    assert run_job(cached, tmp_path / "cached", []) == 2
    err = capsys.readouterr().err
    assert f"is not the set published for setting {entry.name}" in err and f"delete {entry}" in err

    (entry / "samples.npz").unlink()
    (entry / "samples.npz").write_bytes(original)  # the published bytes again: accepted
    assert run_job(cached, tmp_path / "cached2", []) == 0


def test_setting_ids_follow_their_keys():
    row = {k: f"v-{k}" for k in SAMPLE_KEYS}
    assert setting_id(row) == setting_id(dict(row))
    for k in SAMPLE_KEYS:
        assert setting_id({**row, k: "other"}) != setting_id(row), k
    assert setting_id({**row, "cpu_threads": 1}) == setting_id({**row, "cpu_threads": 2})  # speed, not samples
    assert setting_id({**row, "cpu_threads": 1}, TIMING_KEYS) != setting_id({**row, "cpu_threads": 2}, TIMING_KEYS)


def _table(path: Path) -> dict[str, dict[str, str]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells, strict=True))
            for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])}


def test_tables_group_settings_and_divide_latencies_only_within_one(tmp_path):
    """Two settings in one CSV give two tables; a cached row's speedup is against full compute of
    its own timing setting or absent; a serial latency-only run fills the latency of parallel
    quality rows of the same method and timing setting (marked), never of another batch size."""
    path = tmp_path / "runs.csv"
    base = dict(experiment="exp", model="m", arch="custom", image_size=8, sampler="ddim", sampler_params="{}",
                respacing="50", num_steps=50, cfg_scale=1.5, guided_channels=1, checkpoint="sha256:ab", seed=0,
                device="cpu (x86_64)", cpu_threads=2, compile=False, extractor="digits-classifier",
                reference="digits", nfc=50.0)
    fp32 = dict(base, precision_mode="fp32", batch_size=8, num_samples=16)
    bf16 = dict(base, precision_mode="bf16", batch_size=4, num_samples=16, cpu_threads=1)  # a parallel worker's
    t = iter(f"2026-01-01T00:{m:02d}:00" for m in range(60))

    def add(method: str, latency: float | None, setting: dict, **extra: object) -> None:
        append_csv(path, RunRecord(time=next(t), method=method, variant="Full" if method == "none" else "FORA",
                                   fused=None if method == "none" else True, latency_s=latency, **setting, **extra))

    add("none", 10.0, fp32, fid=5.0)
    add("fora", 4.0, fp32, fid=6.0)
    add("none", None, bf16, fid=5.1)
    add("fora", None, bf16, fid=6.1)
    tables = _make_tables(path, tmp_path / "a")
    assert len(tables) == 2
    fp32_table, bf16_table = (next(t for n, t in tables.items() if f"_{p}_" in n) for p in ("fp32", "bf16"))
    assert fp32_table["FORA"]["Speedup"] == "**2.5x**"  # 10 / 4: its own full compute
    assert bf16_table["Full"]["Latency (s)"] == "-" and bf16_table["FORA"]["Speedup"] == "-"  # never 10 / x

    # a serial latency-only run (other seed and sample count, 2 threads) of the bf16 timing setting
    timing = dict(bf16, seed=1, num_samples=12, cpu_threads=2, extractor=None, reference=None)
    add("none", 8.0, timing)
    add("fora", 2.0, timing)
    add("none", 99.0, dict(timing, batch_size=8))  # another batch size: another timing setting
    bf16_table = next(t for n, t in _make_tables(path, tmp_path / "b").items() if "_bf16_" in n and "_n16_" in n)
    assert bf16_table["Full"]["Latency (s)"] == "8\u2020" and bf16_table["FORA"]["Latency (s)"] == "**2**\u2020"
    assert bf16_table["FORA"]["Speedup"] == "**4x**"  # 8 / 2, both timed with 2 threads, batches of 4
    text = next((tmp_path / "b").glob("*_n16_bf16_*.md")).read_text()
    assert "bf16 eager, batches of 4, 2 CPU threads" in text and "Speedup = full-compute latency / the row's" in text


def _make_tables(path: Path, out: Path) -> dict[str, dict[str, dict[str, str]]]:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tables.py"), "--csv", str(path), "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {p.name: _table(p) for p in out.glob("*.md")}


def test_second_scored_run_reuses_the_reference_features(make_cfg, tmp_path, monkeypatch):
    """The reference's features are computed by the first scored run and cached in the store by
    the reference's digest and the extractor; the second run extracts only its own samples."""
    from eval import extractors
    from rfc.run.runner import run

    sizes: list[int] = []
    spec = extractors.EXTRACTORS["digits"]
    build = spec.build

    def counting(paths: dict, device: str):  # noqa: ANN202 - an extractor
        extract = build(paths, device)
        return lambda images: (sizes.append(len(images)), extract(images))[1]

    monkeypatch.setattr(spec, "build", counting)
    run(make_cfg(*TINY, "eval.paired=off"), tmp_path / "first", progress=False)
    assert 1797 in sizes  # the bundled digits, once
    sizes.clear()
    run(make_cfg(*TINY, "eval.paired=off", "seed=1"), tmp_path / "second", progress=False)
    assert sizes == [8]  # its own samples only
    assert len(list((tmp_path / "outputs" / "store" / "references").glob("*.npz"))) == 1


def test_a_killed_full_compute_draw_resumes_from_its_shards(make_cfg, tmp_path, monkeypatch):
    """The first cached job dies while drawing the full-compute set: its shards stay in the store
    entry and the lock is free; the next job draws only the missing batches and the set equals a
    full-compute run's."""
    import rfc.run.generate as generation
    import rfc.run.runner as runner

    drawn: list[int] = []
    real = generation.generate_batches

    def dying(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - generate_batches' signature
        for batch in real(*args, **kwargs):
            if kwargs.get("desc", "").startswith("full compute"):
                drawn.append(batch.start)
                if len(drawn) == 1 and die:
                    yield batch
                    raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(generation, "generate_batches", dying)
    die = True
    with pytest.raises(KeyboardInterrupt):
        runner.run(make_cfg(*TINY, "method=fora"), tmp_path / "killed", progress=False)
    entry = next((tmp_path / "outputs" / "store" / "full_compute").iterdir())
    assert len(list((entry / "shards").glob("*.npz"))) == 1 and not (entry / "samples.npz").exists()
    die, drawn[:] = False, []
    rec = runner.run(make_cfg(*TINY, "method=taylorseer"), tmp_path / "next", progress=False)
    assert drawn == [4] and rec.psnr > 0  # batch [0, 4) came from the killed job's shard
    full = runner.run(make_cfg(*TINY, "eval.score=false"), tmp_path / "full", progress=False)
    with np.load(entry / "samples.npz") as a, np.load(tmp_path / "full" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert full.setting_id == entry.name

    # scripts/store.py: list it, refuse to delete it while a job holds it, then delete it
    sys.path.insert(0, str(ROOT / "scripts"))
    import store as store_cli

    from rfc.utils.files import FolderLock

    root = str(tmp_path / "outputs" / "store")
    assert store_cli.main(["--store", root, "list"]) == 0
    holder = FolderLock(entry)
    holder.acquire()
    try:
        assert store_cli.main(["--store", root, "clear", entry.name]) == 1 and (entry / "samples.npz").exists()
    finally:
        holder.release()
    assert store_cli.main(["--store", root, "clear", "--all"]) == 0 and not entry.exists()
    assert not (tmp_path / "outputs" / "store" / "references").exists()


def test_the_quiet_limit_can_be_set_by_name(monkeypatch, tmp_path):
    from rfc.utils.devices import QUIET_CORES, quiet_cores

    monkeypatch.delenv("RFC_QUIET_CORES")
    assert quiet_cores() == QUIET_CORES == 0.25
    monkeypatch.setenv("RFC_QUIET_CORES", "0.5")
    assert quiet_cores() == 0.5
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("RFC_QUIET_CORES", bad)
        with pytest.raises(RunError, match=rf"^RFC_QUIET_CORES='{bad}' is not a number of CPU cores >= 0"):
            quiet_cores()
    with pytest.raises(RunError, match="^RFC_QUIET_CORES='nan'"), DeviceUse("cpu", tmp_path / "registry"):
        pass  # refused when the job registers on its device, before it samples anything


def test_the_mean_load_needs_more_than_a_stray_tick(real_quiet_limit):
    """One clock tick of another process in a 20 ms batch reads as half a core: not enough to call
    the run shared; a core's worth over the timed batches is."""
    from rfc.utils.devices import _TICKS_PER_S, mean_load, quiet_limit

    cores = quiet_limit() + 0.5
    assert mean_load([]) == (None, False)
    stray, loaded = mean_load([(cores, 1 / _TICKS_PER_S / cores)])  # one tick in a very short batch
    assert stray > quiet_limit() and not loaded
    busy, loaded = mean_load([(quiet_limit() + 1.0, 0.5), (quiet_limit() + 1.0, 0.5)])
    assert loaded and busy == pytest.approx(quiet_limit() + 1.0)
