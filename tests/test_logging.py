"""What a researcher sees: run.log tells each run's story (config, milestones, timings, result,
or the error and how to resume) while the terminal keeps its few lines; progress bars appear only
on a terminal that one process owns, on stderr, never in the results."""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rfc.run.cli import run_job
from rfc.run.runlog import BatchReport, Milestones
from rfc.utils import progress

FAST = ["eval.num_samples=8", "eval.batch_size=2", "sampler.num_steps=5", "eval.warmup_batches=0"]


def job(make_cfg, tmp_path: Path, *overrides: str, out: str = "out") -> tuple[int, str]:
    """run.py's job in-process (rfc.run.cli.run_job); returns the exit code and the run.log text."""
    code = run_job(make_cfg(*overrides), tmp_path / out, list(overrides))
    return code, (tmp_path / out / "run.log").read_text()


def messages(log: str) -> list[str]:
    """run.log's messages without the time stamp ("2026-01-01 12:00:00,123 INFO ")."""
    return [re.sub(r"^\S+ \S+ [A-Z]+ ", "", line) for line in log.splitlines()]


def index_of(lines: list[str], prefix: str) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith(prefix))


def test_run_log_tells_a_tiny_runs_story_and_the_terminal_keeps_its_lines(make_cfg, tmp_path, capsys):
    """dit-tiny, FORA, 8 samples in 4 batches: run.log holds the config summary, a milestone per
    batch (4 batches <= 10) for the run and for the full-compute set it draws for pairing, the
    stages' timings, the result line with the row's key metrics, and 'done'. The terminal shows
    only the samples:/grid:/row: lines; stderr stays empty (not a terminal: no bars)."""
    code, log = job(make_cfg, tmp_path, *FAST, "method=fora")
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert [line.split()[0] for line in out.splitlines()] == ["samples:", "grid:", "row:"]
    lines = messages(log)
    assert lines[0].startswith("start: python run.py eval.num_samples=8")
    summary = lines[index_of(lines, "config:") + 1:index_of(lines, "config:") + 10]
    expected = ["model     dit-tiny (custom, 8 px, pixel space; weights sha256:", "method    fora interval=3",
                "sampler   ddim, 5 steps", "guidance  cfg_scale 1.5 on 1 channel(s)",
                "samples   8 in 4 batch(es) of 2, seed 0, 0 warm-up batch(es)", "device    cpu (",
                "scoring   digits features against digits; paired=auto",
                f"output    {tmp_path / 'out'}; rows to csv {tmp_path / 'runs.csv'}"]
    for prefix in expected:
        assert any(s.strip().startswith(prefix) for s in summary), (prefix, summary)
    for stage in ("sampling", "full compute (for pairing)"):
        milestones = [line for line in lines if line.startswith(f"{stage}: ") and "/8 samples" in line]
        assert len(milestones) == 4, lines
        assert [re.search(r"(\d)/8 samples", m).group(1) for m in milestones] == ["2", "4", "6", "8"]
        assert all(re.search(r"img/s .* elapsed \d+:\d\d, ETA \d+:\d\d$", m) for m in milestones)
        assert any(line.startswith(f"{stage}: done, 8 samples in ") for line in lines)
    for timing in ("model built: ", "merged the shards", "pairing: ", "features of the samples", "scoring: "):
        assert any(line.startswith(timing) and re.search(r"\d+\.\d\d s", line) for line in lines), timing
    result = lines[index_of(lines, "result: ")]
    assert result.startswith("result: dit-tiny/fora: NFC ")
    for metric in ("TFLOPs/image", "FID ", "class_acc", "FID2FC", "PSNR", "SSIM"):
        assert metric in result, result
    assert re.fullmatch(r"done in \d+\.\d s", lines[-1])
    order = [index_of(lines, p) for p in ("config:", "sampling: 2/8", "pairing: ", "scoring: ", "result: ", "row: ")]
    assert order == sorted(order)


def test_flux_run_log_names_guidance_prompts_and_text_to_image_metrics(make_cfg, tmp_path, capsys):
    """flux-tiny (random weights): the summary says distilled guidance and the prompt set; the
    result line carries the text-to-image metrics that were scored (PSNR, SSIM; LPIPS, ImageReward
    and CLIP where their weights are on the machine, else the notes line says why not)."""
    code, log = job(make_cfg, tmp_path, "model=flux-tiny", "method=fora", "eval.num_samples=2", "eval.batch_size=2",
                    "sampler.num_steps=6")
    assert code == 0, capsys.readouterr().err
    lines = messages(log)
    assert any(line.strip().startswith("guidance  distilled guidance 3.5") and "prompts drawbench:" in line
               for line in lines)
    assert any(line.strip().startswith("sampler   flow_euler, 6 steps") for line in lines)
    assert any(line.startswith("sampling: 2/2 samples (100 %)") for line in lines)
    result = lines[index_of(lines, "result: ")]
    assert result.startswith("result: flux-tiny/fora: NFC ") and "PSNR" in result and "SSIM" in result
    for column, name in (("lpips", "LPIPS"), ("image_reward", "ImageReward"), ("clip", "CLIP")):
        assert name in result or f"{column} not scored" in log, column
    assert "FID " not in result  # no FID for text-to-image rows
    assert re.fullmatch(r"done in \d+\.\d s", lines[-1])


def test_failed_run_logs_the_error_after_the_config_summary(make_cfg, tmp_path, capsys):
    """Samples that turn non-finite (a planned run that fails while sampling): run.log holds the
    config summary, the error line (the terminal's, with its level) and the exit code."""
    code, log = job(make_cfg, tmp_path, *FAST, "cfg_scale=1e38")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: sample 0 came out non-finite")
    lines = log.splitlines()
    assert any(" ERROR sample 0 came out non-finite" in line for line in lines)
    assert re.search(r"INFO failed after \d+\.\d s: exit code 2$", lines[-1])
    assert index_of(messages(log), "config:") < next(i for i, line in enumerate(lines) if " ERROR " in line)


def test_python_warnings_reach_run_log_as_well_as_stderr(make_cfg, tmp_path, monkeypatch, recwarn):
    """A library's warning during the job (here from building the model) is written to run.log,
    and still shown as Python shows it (pytest records it here instead of stderr)."""
    import warnings

    import rfc.run.runner as runner

    real = runner.build_vae

    def warns(plan):  # noqa: ANN001, ANN202 - build_vae's signature
        warnings.warn("a library has something to say", UserWarning, stacklevel=1)
        return real(plan)

    monkeypatch.setattr(runner, "build_vae", warns)
    code, log = job(make_cfg, tmp_path, *FAST, "eval.score=false")
    assert code == 0
    assert any("WARNING UserWarning: a library has something to say (" in line for line in log.splitlines())
    assert "a library has something to say" in [str(w.message) for w in recwarn]


def test_interrupted_run_logs_milestones_then_the_resume_command(make_cfg, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the second batch was stored: run.log holds the milestones so far, then the
    error line with the command that resumes, then exit code 130."""
    from rfc.run.shards import ShardStore

    real, stored = ShardStore.write, []

    def interrupted(self, batch):  # noqa: ANN001, ANN202 - ShardStore.write's signature
        if len(stored) == 2:
            raise KeyboardInterrupt
        stored.append(batch.start)
        return real(self, batch)

    monkeypatch.setattr(ShardStore, "write", interrupted)
    code, log = job(make_cfg, tmp_path, *FAST, "eval.score=false")
    assert code == 130 and "resume with" in capsys.readouterr().err
    lines = messages(log)
    assert [line.split(" samples")[0] for line in lines if "/8 samples" in line] == ["sampling: 2/8", "sampling: 4/8"]
    error = lines[index_of(lines, "interrupted: ")]
    assert error.endswith(f"resume with: python run.py {' '.join(FAST)} eval.score=false resume={tmp_path / 'out'}")
    assert lines[-1].startswith("failed after ") and lines[-1].endswith("exit code 130")


def test_sigterm_is_handled_like_ctrl_c_and_the_run_resumes(tmp_path):
    """SIGTERM (a scheduler's preemption, ``kill``) mid-run: the terminal and run.log say so with
    the command that resumes, the exit code is 143, the shards already written stay, and that
    command completes the run."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    args = ["eval.num_samples=48", "eval.batch_size=2", "sampler.num_steps=20", "eval.warmup_batches=0",
            "eval.score=false", "logger=none", f"paths.runs_csv={tmp_path}/runs.csv", f"hydra.run.dir={out}"]
    proc = subprocess.Popen([sys.executable, str(root / "run.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "error: terminated (SIGTERM)" in err and "Traceback" not in err
    lines = messages((out / "run.log").read_text())
    assert lines[index_of(lines, "terminated (SIGTERM): ")].count("resume with: ") == 1
    assert lines[-1].endswith("exit code 143")
    command = err.split("resume with: ")[1].splitlines()[0]
    assert command.endswith(f"resume={out}")
    kept = len(list((out / "shards").glob("*.npz")))
    assert kept >= 1
    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], capture_output=True, text=True,
                             timeout=300, cwd=root, env={**os.environ})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: " in (out / "run.log").read_text()


def test_milestones_every_tenth_of_the_batches_then_the_totals():
    """25 batches: a line every 3 batches (ceil(25 / 10)) and at the last, then the totals; a
    warm-up pass is logged as such."""
    logger, records = logging.getLogger("rfc"), []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        note = Milestones()
        note(BatchReport("sampling", 0, 4, 0, 100, 0, 25, 0.5, None, 0.0, warmup=True))
        for b in range(1, 26):
            note(BatchReport("sampling", 4 * (b - 1), 4, 4 * b, 100, b, 25, 0.5, 0.1, 0.6 * b))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert records[0].startswith("sampling: warm-up pass of samples [0, 4), untimed")
    done = [int(re.search(r"batch (\d+)/25", r).group(1)) for r in records if "batch " in r]
    assert done == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert "6.67 img/s (this batch 8 img/s, 0.50 s), elapsed 0:02, ETA 0:13" in records[1]
    assert records[-1] == ("sampling: done, 100 samples in 15.00 s (6.67 img/s; sampling loop 12.50 s, "
                           "VAE decode 2.50 s)")


# -- progress bars ---------------------------------------------------------------------------------


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)


def test_bars_only_on_a_terminal_owned_by_one_process(clean_env, monkeypatch):
    """The one decision (rfc.utils.progress.show_bars): a terminal, rank 0, no submitit, a launcher
    that runs one job at a time, and the caller not opting out."""
    tty = Terminal()
    assert progress.show_bars(tty) and not progress.show_bars(io.StringIO())
    with progress.job_progress(wanted=False):
        assert not progress.show_bars(tty)
    with progress.job_progress(launcher="joblib", n_jobs=3):
        assert not progress.show_bars(tty)
    with progress.job_progress(launcher="joblib", n_jobs=1):
        assert progress.show_bars(tty)
    with progress.job_progress(launcher="submitit_slurm"):
        assert not progress.show_bars(tty)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert not progress.show_bars(tty)
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    monkeypatch.setenv("RANK", "1")
    assert not progress.show_bars(tty)
    monkeypatch.setenv("RANK", "0")
    assert progress.show_bars(tty)


def test_a_terminal_sees_a_bar_for_every_long_loop_and_the_results_none(make_cfg, tmp_path, capsys, monkeypatch,
                                                                          clean_env):
    """On a terminal (and with the bars' delay set to 0, so that the tiny run's short loops show
    theirs): sampling, the full-compute set drawn for pairing, the features of the samples, of the
    reference and of the full-compute set, and PSNR/SSIM each draw a bar on stderr. stdout keeps
    its three lines; runs.csv and record.json hold no bar."""
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = run_job(make_cfg(*FAST, "method=fora"), tmp_path / "out", [])
    shown = terminal.getvalue()
    assert code == 0, shown
    for desc in ("sampling:", "full compute (for pairing):", "features of the samples:", "features of the reference:",
                 "features of the full-compute set:", "PSNR/SSIM:"):
        assert f"\r{desc}" in shown, (desc, shown)
    assert "8/8" in shown and "1797/1797" in shown
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["samples:", "grid:", "row:"]
    for path in (tmp_path / "runs.csv", tmp_path / "out" / "record.json"):
        text = path.read_text()
        assert "\r" not in text and "img/s]" not in text and "%|" not in text


def test_calibration_shows_a_bar_over_its_trials_and_logs_each(make_cfg, tmp_path, monkeypatch, clean_env):
    """Calibrating tau on a terminal: a bar counting the trials (how many is not known ahead),
    each trial's own sampling bar, and a log line per trial."""
    from rfc.tools import calibration

    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    logger, records = logging.getLogger("rfc"), []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = calibration.calibrate(make_cfg("method=rfc", "sampler.num_steps=10"), 5, num_samples=2, batch_size=2,
                                       seed=1000, tolerance=1.0, out_dir=tmp_path / "cal")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    trials = [r for r in records if r.startswith("calibration trial ")]
    assert len(trials) == len(result.trials) >= 1
    assert trials[0].startswith("calibration trial 1: tau 0.01 -> mean NFC ")
    assert "\rcalibrating tau for NFC 5: " in terminal.getvalue()
    assert f"{len(result.trials)}trial" in terminal.getvalue().replace(" ", "")
    assert "trial 1: tau 0.01" in terminal.getvalue()  # the trial's own sampling bar
