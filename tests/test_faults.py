"""Bad input and faults. Every predictable failure ends as one line naming the key or file, exit
code 2 (130 for Ctrl-C), no new row, and nothing already written damaged; a fault (torn CSV
record, corrupt shard, full disk, a second process) never turns into a wrong result.

Most cases run in-process through rfc.run.cli.run_job, the function run.py calls; the few that need a
real process (Ctrl-C, a concurrent run, resume= of a missing folder) run run.py itself."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from rfc.run.cli import check_resume_argument, run_job
from rfc.run.loggers import append_csv, read_runs
from rfc.run.row import RunRecord, git_sha
from rfc.utils import files

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "dit-tiny-digits.pt"
FAST = ["eval.num_samples=4", "eval.batch_size=2", "sampler.num_steps=3", "eval.warmup_batches=0"]


@pytest.fixture
def earlier(tmp_path: Path) -> bytes:
    """runs.csv holding one earlier row; the test checks its bytes are untouched afterwards."""
    append_csv(tmp_path / "runs.csv", RunRecord(method="none", model="dit-tiny", fid=1.25, notes='a, "quoted" note'))
    return (tmp_path / "runs.csv").read_bytes()


def job(make_cfg, tmp_path: Path, *overrides: str, out: str = "out") -> int:
    return run_job(make_cfg(*FAST, *overrides), tmp_path / out, list(overrides))


def refused(code: int, err: str, name: str, tmp_path: Path, before: bytes) -> None:
    """Exit 2, a single ``error:`` line naming ``name``, no traceback, runs.csv unchanged."""
    lines = [line for line in err.splitlines() if line.strip() and "sampling:" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert name in lines[0], lines[0]
    assert "Traceback" not in err
    assert (tmp_path / "runs.csv").read_bytes() == before


# -- config values: refused before any work, naming the key ------------------------------------

BAD_VALUES = [
    ("seed=1.5", "seed must be an integer"),
    ("seed=abc", "seed must be an integer"),
    ("seed=-1", "seed must be >= 0"),
    ("seed=99999999999999999999", "seed must be <= 9223372036854775807"),
    ("eval.num_samples=8.7", "eval.num_samples must be an integer"),
    ("eval.num_samples=0", "eval.num_samples must be >= 1"),
    ("eval.num_samples=1", "eval.num_samples=1 is too few to score"),
    ("eval.batch_size=2.5", "eval.batch_size must be an integer"),
    ("eval.batch_size=-1", "eval.batch_size must be >= 1"),
    ("eval.grid_size=0", "eval.grid_size must be >= 1"),
    ("eval.warmup_batches=1.5", "eval.warmup_batches must be an integer"),
    ("eval.score=maybe", "eval.score must be true or false"),
    ("eval.paired=sometimes", "eval.paired"),
    ("eval.extractor=foo", "eval.extractor"),
    ("eval.reference=null", "eval.reference is not set"),
    ("model.checkpoint=null", "model.checkpoint"),
    ("cfg_scale=nan", "cfg_scale must be a finite number"),
    ("cfg_scale=inf", "cfg_scale must be a finite number"),
    ("cfg_scale=abc", "cfg_scale must be a number"),
    ("sampler.eta=nan", "sampler.eta must be a finite number"),
    ("sampler.eta=abc", "sampler.eta must be a number"),
    ("sampler.num_steps=0", "num_steps must be >= 1"),
    ("sampler.num_steps=2.5", "sampler.num_steps must be an integer"),
    ("+sampler.etaa=0.5", "sampler.etaa is not a setting"),
    ("method=rfc method.tau=nan", "method.tau must be a finite number"),
    ("method=toca method.fresh_ratio=nan", "method.fresh_ratio must be a finite number"),
    ("method=fora method.interval=0", "method.interval must be an integer >= 1"),
    ("device=tpu", "device=tpu"),
    ("device=cuda:7", "device=cuda:7"),
    ("precision=fp64", "precision must be one of"),
    ("compile=1", "compile must be true or false"),
    ("model.image_size=0", "model.image_size must be >= 1"),
    ("model.image_size=abc", "model.image_size must be an integer"),
    ("model.image_size=7", "model.image_size 7"),
    ("model.num_heads=3", "model.num_heads"),
    ("model.class_dropout_prob=nan", "model.class_dropout_prob must be a finite number"),
    ("model.guided_channels=2", "model.guided_channels must be in 1..1"),
    ("model.vae=xyz", "model.vae"),
]


@pytest.mark.parametrize("overrides, name", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_refused_naming_the_key(make_cfg, tmp_path, capsys, earlier, overrides, name):
    code = job(make_cfg, tmp_path, *overrides.split())
    refused(code, capsys.readouterr().err, name, tmp_path, earlier)
    assert not (tmp_path / "out" / "shards").exists()  # refused before any sample was drawn


# A method's keys are typed (its config dataclass, rfc.cache.registry): a value of the wrong type
# is refused while Hydra composes the config, before any of the harness's code runs.
TYPED_METHOD_VALUES = [
    ("method=rfc method.order=1.5", "method.order"),
    ("method=fora method.interval=1.5", "method.interval"),
    ("method=taylorseer method.fused=maybe", "method.fused"),
    ("method=toca method.layer_divisor=abc", "method.layer_divisor"),
]


@pytest.mark.parametrize("overrides, key", TYPED_METHOD_VALUES, ids=[b[0] for b in TYPED_METHOD_VALUES])
def test_mistyped_method_value_is_refused_at_compose_time(make_cfg, overrides, key):
    with pytest.raises(ConfigCompositionException, match=f"override {key}=") as err:
        make_cfg(*overrides.split())
    assert f"full_key: {key}" in str(err.value.__cause__)


# -- files: unreadable inputs and unwritable outputs, named before sampling --------------------


def _checkpoint(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(CHECKPOINT.read_bytes()[: CHECKPOINT.stat().st_size // 2])
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        return Path("/dev/zero")  # reads forever: hashing it must not start
    elif kind == "fifo":
        os.mkfifo(path)  # a read blocks until a writer comes
    elif kind == "nan":
        state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
        state["blocks.3.mlp.fc1.weight"][5, 7] = float("nan")
        torch.save(state, path)
    return path


@pytest.mark.parametrize("kind, name", [
    ("text", "cannot read checkpoint"), ("empty", "cannot read checkpoint"), ("truncated", "cannot read checkpoint"),
    ("folder", "is a folder"), ("missing", "does not exist"), ("nan", "blocks.3.mlp.fc1.weight holds 1 non-finite"),
    ("device", "not a regular file"), ("fifo", "not a regular file"),
])
def test_unusable_checkpoint_is_named(make_cfg, tmp_path, capsys, earlier, kind, name):
    path = _checkpoint(tmp_path, kind)
    code = job(make_cfg, tmp_path, f"model.checkpoint={path}")
    err = capsys.readouterr().err
    refused(code, err, name, tmp_path, earlier)
    assert str(path) in err
    assert not (tmp_path / "out" / "manifest.json").exists()  # weights are checked before the folder is set up


def _reference(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"ref-{kind}.npz"
    mu, sigma = np.zeros(64), np.eye(64)
    if kind == "text":
        path.write_text("not an npz")
    elif kind == "mu-only":
        np.savez(path, mu=mu)
    elif kind == "nan-sigma":
        sigma[3, 3] = np.nan
        np.savez(path, mu=mu, sigma=sigma)
    elif kind == "wrong-length":
        np.savez(path, mu=np.zeros(32), sigma=np.eye(32))
    elif kind == "other-extractor":
        np.savez(path, mu=mu, sigma=sigma, extractor=np.array("inception-v3-tf"))
    elif kind == "asymmetric-sigma":
        sigma[2, 5] = 0.5
        np.savez(path, mu=mu, sigma=sigma)
    elif kind == "non-psd-sigma":
        sigma[7, 7] = -1.0
        np.savez(path, mu=mu, sigma=sigma)
    elif kind == "float-images":
        np.savez(path, arr_0=np.zeros((4, 8, 8, 1), np.float32))
    elif kind == "empty-npz":
        np.savez(path, labels=np.zeros(3))
    return path


@pytest.mark.parametrize("kind, name", [
    ("text", "is not a readable .npz"), ("mu-only", "has mu but no sigma"), ("nan-sigma", "sigma holds NaN"),
    ("asymmetric-sigma", "sigma is not symmetric"), ("non-psd-sigma", "sigma is not positive semi-definite"),
    ("wrong-length", "mu has (32,) entries, the digits-classifier's features have 64"),
    ("other-extractor", "holds statistics of the inception-v3-tf extractor, not digits-classifier"),
    ("float-images", "arr_0 must hold uint8 images"), ("empty-npz", "neither statistics"),
])
def test_unusable_reference_is_named_before_sampling(make_cfg, tmp_path, capsys, earlier, kind, name):
    path = _reference(tmp_path, kind)
    code = job(make_cfg, tmp_path, f"eval.reference={path}")
    err = capsys.readouterr().err
    refused(code, err, name, tmp_path, earlier)
    assert str(path) in err and not (tmp_path / "out" / "shards").exists()


def test_damaged_vae_is_named(make_cfg, tmp_path, capsys, earlier, monkeypatch):
    import huggingface_hub.constants

    # an empty Hugging Face cache: a VAE the user fetched there would otherwise be found first
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    vae = tmp_path / "assets" / "sd-vae-ft-ema"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text("{")  # cut short
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    code = job(make_cfg, tmp_path, "model=dit-s", "model.pretrained=false", "model.vae_pretrained=true",
               "model.image_size=64", f"paths.assets={tmp_path / 'assets'}")
    err = capsys.readouterr().err
    refused(code, err, f"cannot load the VAE from {vae}", tmp_path, earlier)
    assert "fetch_assets.py vae-ema" in err and not (tmp_path / "out" / "shards").exists()


@pytest.mark.parametrize("kind", ["csv-is-folder", "csv-under-a-file", "run-folder-is-a-file"])
def test_unwritable_outputs_are_found_before_sampling(make_cfg, tmp_path, capsys, earlier, kind):
    blocker = tmp_path / "blocker"
    if kind == "csv-is-folder":
        (tmp_path / "csvdir").mkdir()
        overrides, out, name = [f"paths.runs_csv={tmp_path / 'csvdir'}"], "out", "paths.runs_csv"
    elif kind == "csv-under-a-file":
        blocker.write_text("x")
        overrides, out, name = [f"paths.runs_csv={blocker / 'runs.csv'}"], "out", "paths.runs_csv"
    else:
        blocker.write_text("x")
        overrides, out, name = [], "blocker/run", "blocker"
    code = job(make_cfg, tmp_path, *overrides, out=out)
    refused(code, capsys.readouterr().err, name, tmp_path, earlier)


def test_resume_of_a_missing_or_empty_folder_is_refused_before_hydra_creates_it(tmp_path):
    assert "no such run folder" in check_resume_argument([f"resume={tmp_path / 'typo'}"])
    (tmp_path / "failed").mkdir()
    assert "no manifest.json" in check_resume_argument([f"resume={tmp_path / 'failed'}"])
    assert check_resume_argument(["resume=null"]) is None and check_resume_argument(["seed=1"]) is None
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), f"resume={tmp_path / 'typo'}",
                           f"paths.runs_csv={tmp_path / 'runs.csv'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: resume={tmp_path / 'typo'}: no such run folder; check the path (run folders live under paths.outputs)"]
    assert not (tmp_path / "typo").exists() and not (tmp_path / "runs.csv").exists()


def test_unreadable_manifest_is_named(make_cfg, tmp_path, capsys, earlier):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text('{"config": ')
    code = job(make_cfg, tmp_path)
    refused(code, capsys.readouterr().err, "manifest.json is unreadable", tmp_path, earlier)


# -- non-finite samples never become a row -----------------------------------------------------


def test_samples_that_turn_non_finite_stop_the_run_naming_sample_and_step(make_cfg, tmp_path, capsys, earlier):
    """A finite but absurd guidance scale overflows in the first update: the run stops with the
    first bad sample and the step, stores no shard and writes no row."""
    code = job(make_cfg, tmp_path, "cfg_scale=1e38")
    err = capsys.readouterr().err
    refused(code, err, "sample 0 came out non-finite", tmp_path, earlier)
    assert "after step 0" in err
    assert not list((tmp_path / "out" / "shards").glob("*.npz"))
    assert "sample 0 came out non-finite" in (tmp_path / "out" / "run.log").read_text()


# -- faults --------------------------------------------------------------------------------------


def test_torn_csv_record_is_set_aside_and_the_new_row_stays_whole(make_cfg, tmp_path, capsys):
    csv_path = tmp_path / "runs.csv"
    for method in ("none", "fora"):
        append_csv(csv_path, RunRecord(method=method, model="dit-tiny", notes="x"))
    whole = csv_path.read_bytes()
    fragment = whole.splitlines(keepends=True)[-1][:60]  # a crash 60 bytes into a third row
    csv_path.write_bytes(whole + fragment)
    assert job(make_cfg, tmp_path, "eval.score=false") == 0
    err = capsys.readouterr().err
    assert "1 incomplete record(s)" in err and "runs.csv.torn" in err
    assert csv_path.read_bytes().startswith(whole)  # every complete row byte for byte
    rows = read_runs(csv_path)
    assert [r["method"] for r in rows] == ["none", "fora", "none"] and rows[-1]["num_samples"] == "4"
    assert (tmp_path / "runs.csv.torn").read_bytes() == fragment + b"\n"
    assert job(make_cfg, tmp_path, "eval.score=false", out="again") == 0  # reported once: the file is whole now
    assert "incomplete" not in capsys.readouterr().err and len(read_runs(csv_path)) == 4


def test_unclosed_quote_never_swallows_later_rows(tmp_path):
    csv_path = tmp_path / "runs.csv"
    append_csv(csv_path, RunRecord(method="none"))
    csv_path.write_bytes(csv_path.read_bytes() + b'x,"an open quote\r\n')
    append_csv(csv_path, RunRecord(method="fora"))
    append_csv(csv_path, RunRecord(method="rfc"))
    assert [r["method"] for r in read_runs(csv_path)] == ["none", "fora", "rfc"]


def test_failed_csv_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    import rfc.run.loggers as loggers

    csv_path = tmp_path / "runs.csv"
    append_csv(csv_path, RunRecord(method="none"))
    before = csv_path.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loggers.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        append_csv(csv_path, RunRecord(method="fora"))
    assert csv_path.read_bytes() == before


def _samples(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / "samples.npz") as z:
        return z["arr_0"], z["arr_1"]


UNSCORED = ["eval.num_samples=8", "eval.score=false"]


def test_corrupt_foreign_and_misnamed_shards_are_named_and_redrawn(make_cfg, tmp_path, capsys):
    folder = tmp_path / "out"
    assert job(make_cfg, tmp_path, *UNSCORED) == 0
    whole = _samples(folder)
    shards = sorted((folder / "shards").glob("*.npz"))
    assert len(shards) == 4
    shards[1].write_bytes(shards[1].read_bytes()[:200])  # truncated
    data = bytearray(shards[2].read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the pixels
    shards[2].write_bytes(bytes(data))
    shards[3].write_bytes(shards[0].read_bytes())  # a valid shard under another batch's name
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in (shards[1], shards[3]):  # as if written just before a crash: judged by content, not checksum
        del manifest["shards"][shard.name]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()

    assert job(make_cfg, tmp_path, *UNSCORED, f"resume={folder}") == 0
    err = capsys.readouterr().err
    for shard, why in zip(shards[1:], ("unreadable (BadZipFile", "checksum differs",
                                       "holds samples [0, 2), not [6, 8)"), strict=True):
        assert f"shard {shard} rejected: " in err and why in err, err
    assert sorted(p.name for p in (folder / "rejected").iterdir()) == [p.name for p in shards[1:]]
    again = _samples(folder)
    assert np.array_equal(again[0], whole[0]) and np.array_equal(again[1], whole[1])
    assert "resumed: 2 of 8" in read_runs(tmp_path / "runs.csv")[-1]["notes"]


def test_a_foreign_shard_with_the_right_name_is_refused_listed_or_not(make_cfg, tmp_path, capsys):
    """Another run's shard (seed 1) under the right name and range, not listed in the manifest, or
    listed with its checksum: its provenance (the configuration id inside it) differs, so the resume
    sets it aside and redraws the batch; the samples equal an untouched run's."""
    folder, other = tmp_path / "out", tmp_path / "other"
    assert job(make_cfg, tmp_path, *UNSCORED) == 0
    whole = _samples(folder)
    assert job(make_cfg, tmp_path, *UNSCORED, "seed=1", out="other") == 0
    shards = sorted((folder / "shards").glob("*.npz"))
    manifest = json.loads((folder / "manifest.json").read_text())
    for i, listed in ((1, False), (2, True)):
        shards[i].write_bytes((other / "shards" / shards[i].name).read_bytes())
        if listed:  # the manifest even vouches for its bytes
            manifest["shards"][shards[i].name]["sha256"] = files.file_digest(shards[i])
        else:
            del manifest["shards"][shards[i].name]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()

    assert job(make_cfg, tmp_path, *UNSCORED, f"resume={folder}") == 0
    err = capsys.readouterr().err
    for shard in shards[1:3]:
        assert f"shard {shard} rejected: it was drawn by another configuration" in err, err
    again = _samples(folder)
    assert np.array_equal(again[0], whole[0]) and np.array_equal(again[1], whole[1])


def test_full_disk_mid_run_is_one_line_leaves_no_partial_file_and_resumes(make_cfg, tmp_path, capsys,
                                                                           monkeypatch):
    """ENOSPC on the fourth file written (manifest, shard, manifest, then the second shard): half
    of it reached the disk."""
    folder = tmp_path / "out"
    real, calls = files._write_all, []

    def fills_up(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 4:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(files, "_write_all", fills_up)
    code = job(make_cfg, tmp_path, *UNSCORED)
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 1 and "disk full while writing" in err
    assert f"resume={folder}" in err and "Traceback" not in err
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in written if p.stat().st_size == 0 and not p.name.startswith(".")]  # locks are empty
    assert not [p for p in written if p.name.endswith(".tmp")] and not (tmp_path / "runs.csv").exists()
    assert "disk full" in (folder / "run.log").read_text()

    monkeypatch.setattr(files, "_write_all", real)
    assert job(make_cfg, tmp_path, *UNSCORED, f"resume={folder}") == 0
    assert job(make_cfg, tmp_path, *UNSCORED, out="whole") == 0
    a, b = _samples(folder), _samples(tmp_path / "whole")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _mount_tmpfs(path: Path, size: str) -> bool:
    """A real small file system, where this machine lets the tests mount one (root, no sandbox)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_real_full_disk_is_one_line_and_the_run_resumes_once_there_is_space(make_cfg, tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "32k"):
        pytest.skip("mounting a small tmpfs is not permitted here; the simulated ENOSPC test covers this")
    try:
        folder = disk / "run"
        overrides = ["eval.num_samples=16", "eval.score=false"]
        code = job(make_cfg, tmp_path, *overrides, out="disk/run")
        err = capsys.readouterr().err
        assert code == 2 and err.count("error: ") == 1 and f"disk full while writing {folder}" in err, err
        written = [p for p in folder.rglob("*") if p.is_file()]
        assert not [p for p in written if p.stat().st_size == 0 and not p.name.startswith(".")]
        assert not [p for p in written if p.name.endswith(".tmp")] and not (tmp_path / "runs.csv").exists()
        assert 0 < len(list((folder / "shards").glob("*.npz"))) < 8  # it filled up mid-run
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True, capture_output=True)
        assert job(make_cfg, tmp_path, *overrides, f"resume={folder}", out="disk/run") == 0
        assert job(make_cfg, tmp_path, *overrides, out="whole") == 0
        a, b = _samples(folder), _samples(tmp_path / "whole")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _slow_run(folder: Path, tmp_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run.py"), "sampler=ddpm", "sampler.num_steps=100", "eval.num_samples=48",
           "eval.batch_size=4", "eval.score=false", f"hydra.run.dir={folder}", f"paths.runs_csv={tmp_path}/runs.csv"]
    # SIGINT back to its default: a test run started in the background inherits it ignored
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, timeout: float = 120) -> None:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_second_process_on_a_folder_refuses_naming_the_holder_then_ctrl_c_exits_130(make_cfg, tmp_path,
                                                                                       capsys):
    """One real run holds the folder: a second run on it refuses at once, naming the holder's pid.
    Ctrl-C then stops the first with exit 130, its log says so, and it prints the resume command."""
    folder = tmp_path / "busy"
    first = _slow_run(folder, tmp_path)
    try:
        _wait_for(lambda: list((folder / "shards").glob("*.npz")))
        code = run_job(make_cfg("sampler=ddpm", "sampler.num_steps=100", "eval.num_samples=48", "eval.batch_size=4",
                                "eval.score=false"), folder, [])
        err = capsys.readouterr().err
        assert code == 2 and f"is in use by pid {first.pid}" in err and str(folder) in err
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130, err[-2000:]
    assert "error: interrupted" in err and f"resume={folder}" in err and "Traceback" not in err
    assert "interrupted" in (folder / "run.log").read_text()
    assert not list(folder.rglob("*.tmp")) and not (tmp_path / "runs.csv").exists()
    command = err.split("resume with: ", 1)[1].strip().split()  # (a resume's result: test_scaleout's kill test)
    assert command[:3] == ["python", "run.py", "sampler=ddpm"] and command[-1] == f"resume={folder}"
    assert f"paths.runs_csv={tmp_path}/runs.csv" in command and not [c for c in command if "hydra" in c]


def test_git_sha_ignores_the_results_the_harness_writes(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "runs.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    (tmp_path / "results" / "runs.csv").write_text("a\nb\n")
    assert not git_sha(tmp_path).endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_sha(tmp_path).endswith("-dirty")


# -- scripts/evaluate.py --------------------------------------------------------------------------


def _evaluate(*args: str) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from scripts.evaluate import main

    return main([*map(str, args), "--extractor", "digits"])


@pytest.fixture
def digit_samples(tmp_path: Path) -> Path:
    from eval.digits import load_digits_uint8

    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=load_digits_uint8()[0][:40])
    return path


@pytest.mark.parametrize("broken, name", [
    ("ref:mu-only", "has mu but no sigma"), ("ref:nan-sigma", "sigma holds NaN"), ("ref:text", "not a readable .npz"),
    ("samples:empty", "not a readable .npz"), ("samples:truncated", "not a readable .npz"),
    ("samples:no-arr_0", "has no arr_0"), ("samples:one", "holds 1 image"), ("stats:under-a-file", "--save-stats"),
])
def test_evaluate_script_names_the_bad_file(tmp_path, capsys, digit_samples, broken, name):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.load(digit_samples)["arr_0"][::-1])
    samples, stats = digit_samples, tmp_path / "stats.npz"
    role, kind = broken.split(":")
    if role == "ref":
        ref = _reference(tmp_path, kind)
    elif role == "stats":
        (tmp_path / "file").write_text("x")
        stats = tmp_path / "file" / "stats.npz"
    elif kind == "empty":
        samples.write_bytes(b"")
    elif kind == "truncated":
        samples.write_bytes(samples.read_bytes()[:300])
    elif kind == "no-arr_0":
        np.savez(samples, images=np.zeros((4, 8, 8, 1), np.uint8))
    else:
        np.savez(samples, arr_0=np.zeros((1, 8, 8, 1), np.uint8))
    assert _evaluate(ref, samples, "--save-stats", stats) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and name in err
    assert not stats.exists()


def test_evaluate_script_writes_stats_into_a_new_folder(tmp_path, capsys, digit_samples):
    stats = tmp_path / "new" / "stats.npz"
    assert _evaluate(digit_samples, digit_samples, "--save-stats", stats) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(0, abs=1e-3) and stats.exists()


@pytest.mark.parametrize("override, says", [("method=rfcc", "Could not find 'method/rfcc'"),
                                            ("method=none,fora", "Ambiguous value for argument 'method=none,fora'")])
def test_a_config_hydra_cannot_compose_is_a_bad_input(tmp_path, override, says):
    """Exit 2 (a bad input, as documented), not 1 (a bug); the list of methods Hydra prints shows
    methods only, not their typed schemas."""
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), override, f"paths.outputs={tmp_path}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and says in proc.stderr
    if "Could not find" in says:
        assert "\trfc\n" in proc.stderr and "_schema" not in proc.stderr


def test_an_unusable_device_registry_names_its_variable(make_cfg, tmp_path, capsys, earlier, monkeypatch):
    """RFC_DEVICE_REGISTRY pointing at a file: one line naming the variable, exit 2, and no resume
    command (nothing was drawn, and resume= would be refused)."""
    registry = tmp_path / "registry-file"
    registry.write_text("")
    monkeypatch.setenv("RFC_DEVICE_REGISTRY", str(registry))
    code = job(make_cfg, tmp_path)
    err = capsys.readouterr().err
    refused(code, err, "RFC_DEVICE_REGISTRY", tmp_path, earlier)
    assert "resume" not in err


def test_a_checkpoint_of_another_resolution_is_refused_or_noted(make_cfg, tmp_path, capsys, earlier):
    """The rule (docs/runs.md): a checkpoint's resolution is its pos_embed's (another one is a shape
    mismatch) or the NNNxNNN of its name (another one is refused before anything is built); with
    neither, the run goes on and the row says the resolution is unknown."""
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    named = tmp_path / "dit-tiny-16x16.pt"
    torch.save(state, named)
    code = job(make_cfg, tmp_path, f"model.checkpoint={named}")
    refused(code, capsys.readouterr().err, "is a 16 px checkpoint (its name says so)", tmp_path, earlier)
    code = job(make_cfg, tmp_path, f"model.checkpoint={named}", "model.image_size=16", out="other")
    err = capsys.readouterr().err
    assert code == 2 and "pos_embed: checkpoint" in err  # its pos_embed is of 8 px: a shape mismatch
    bare = tmp_path / "no-pos-embed.pt"
    torch.save({k: v for k, v in state.items() if k != "pos_embed"}, bare)
    assert job(make_cfg, tmp_path, f"model.checkpoint={bare}", "eval.score=false", out="bare") == 0
    row = read_runs(tmp_path / "runs.csv")[-1]
    assert "native resolution unknown: checkpoint no-pos-embed.pt has no pos_embed" in row["notes"]


def test_hydras_own_files_unwritable_is_one_line(tmp_path):
    """Hydra writes .hydra/config.yaml before the job starts: a folder where it cannot (here
    .hydra is a file; a full disk takes the same path) is one line naming the file, exit 2, no
    traceback, no 0-byte file."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".hydra").write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *FAST, f"hydra.run.dir={run_dir}",
                           f"paths.runs_csv={tmp_path}/runs.csv"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: cannot write {run_dir / '.hydra' / 'config.yaml'}" in proc.stderr
    assert not (tmp_path / "runs.csv").exists()


def test_a_csv_write_cut_short_by_a_full_disk_leaves_no_partial_record(tmp_path, monkeypatch):
    """The disk fills after part of the row reached it: the file is truncated back, byte for byte,
    and the error names the CSV."""
    from rfc.run import loggers

    csv_path = tmp_path / "runs.csv"
    append_csv(csv_path, RunRecord(method="none", fid=1.0))
    before = csv_path.read_bytes()
    real = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 8:
            return real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loggers.os, "write", half_then_full)
    with pytest.raises(OSError, match="No space") as err:
        append_csv(csv_path, RunRecord(method="fora", fid=2.0))
    assert err.value.filename == str(csv_path)
    monkeypatch.setattr(loggers.os, "write", real)
    assert csv_path.read_bytes() == before
