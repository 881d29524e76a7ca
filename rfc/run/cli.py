"""What the command line promises: a run ends with a result, or with one line saying what went wrong
and what to do, under a fixed exit code, and that line is also in the run folder's log.

Exit codes: 0 done; 2 a predictable failure (a bad key, a missing or damaged file, non-finite
samples, a folder in use, a full disk), the message naming the key or file; 130 interrupted
(Ctrl-C) and 143 terminated (SIGTERM: a scheduler's preemption or time limit, ``kill``), each with
the command that resumes; 1 an unexpected failure (a bug), with its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from rfc.run.runlog import LOG_FILE
from rfc.run.runner import run
from rfc.utils.errors import (
    EXIT_BUG,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXPECTED,
    Terminated,
    exit_code,
    one_line,
)

LOG = logging.getLogger("rfc")
__all__ = ["EXIT_BUG", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "LOG_FILE", "exit_code",
           "one_line", "run_job"]


class _LineFormatter(logging.Formatter):
    """``error: ...`` on the terminal; a traceback only for unexpected failures."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _ConsoleHandler(logging.StreamHandler):
    """stderr through tqdm.write: a warning that arrives while a progress bar is drawn gets its own
    line, with the bar redrawn below it, instead of being spliced into the bar. (With no bar
    drawn, tqdm.write is a plain write.)"""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


class _QuietFileHandler(logging.FileHandler):
    """The run log; a log write that fails (the disk is full) must not hide the real error, and
    neither may its flush or close at the end of the job."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            super().flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


class _WarningsIntoLog(logging.Handler):
    """Python warnings raised during the job (torch's, a library's deprecation) are shown on stderr
    exactly as before and also written to run.log, so the log has every warning the terminal
    showed. Not a handler of the ``rfc`` logger: it only hooks ``warnings.showwarning`` until
    closed."""

    def __init__(self, file: logging.Handler) -> None:
        super().__init__()
        self.file, self.original = file, warnings.showwarning
        warnings.showwarning = self.show

    def show(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        self.original(message, category, filename, lineno, file, line)
        text = f"{category.__name__}: {message} ({filename}:{lineno})"
        self.file.handle(LOG.makeRecord(LOG.name, logging.WARNING, filename, lineno, text, None, None))

    def emit(self, record: logging.LogRecord) -> None:
        pass

    def close(self) -> None:
        if warnings.showwarning == self.show:
            warnings.showwarning = self.original
        super().close()


def attach_log(out_dir: str | Path | None, main: bool = True) -> list[logging.Handler]:
    """Send the ``rfc`` logger to stderr (warnings and errors) and, on the main process, to
    ``<out_dir>/run.log`` (everything, time-stamped, Python warnings included). Returns the
    handlers, for :func:`detach_log`."""
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    console = _ConsoleHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(_LineFormatter())
    handlers: list[logging.Handler] = [console]
    if out_dir is not None and main:
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            file = _QuietFileHandler(Path(out_dir) / LOG_FILE, encoding="utf-8", delay=True)
            file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            handlers.append(file)
        except OSError:
            pass  # an unwritable folder is reported by the run itself, on stderr
    for handler in handlers:
        LOG.addHandler(handler)
    if len(handlers) > 1:
        handlers.append(_WarningsIntoLog(handlers[1]))
    return handlers


def detach_log(handlers: list[logging.Handler]) -> None:
    for handler in reversed(handlers):  # the warnings hook before the file it writes to
        LOG.removeHandler(handler)
        handler.close()


def resume_command(out_dir: str | Path, overrides: Sequence[str]) -> str:
    """The command that continues this run in its folder: the same overrides, resume=<folder>."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir="))]
    return " ".join(["python run.py", *map(shlex.quote, keep), shlex.quote(f"resume={out_dir}")])


def describe_os_error(err: OSError, out_dir: str | Path, overrides: Sequence[str]) -> str:
    """One line for a failed read or write: which file, why, and what to do."""
    where = err.filename or "a file"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full while writing {where}: nothing partial was kept; free space, then resume with: "
                f"{resume_command(out_dir, overrides)}")
    return f"cannot use {where}: {err.strerror or err}; fix it, then resume with: {resume_command(out_dir, overrides)}"


def run_job(cfg: DictConfig, out_dir: str | Path, overrides: Sequence[str] = (), sweep: str | None = None,
            launcher: str = "basic", main: bool = True, n_jobs: int | None = None) -> int:
    """One job of the command line (a run, or one job of a multirun) with its failures mapped to
    the exit codes above; returns the exit code. ``launcher``: Hydra's launcher in effect (its
    hydra/launcher choice) and ``n_jobs`` its joblib workers: they decide whether jobs run at once."""
    handlers = attach_log(out_dir, main)
    previous = _raise_on_sigterm()
    t0 = time.perf_counter()
    code = EXIT_BUG
    try:
        LOG.info("start: %s", " ".join(["python run.py", *overrides]))
        run(cfg, out_dir, sweep=sweep, launcher=launcher, n_jobs=n_jobs)
        code = EXIT_OK
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        LOG.error("%s: the batches finished so far are kept in %s; resume with: %s", what, out_dir,
                  resume_command(out_dir, overrides))
        code = exit_code(err)
    except EXPECTED as err:
        LOG.error("%s", one_line(err))
        code = exit_code(err)
    except OSError as err:
        LOG.error("%s", describe_os_error(err, out_dir, overrides))
        code = exit_code(err)
    except Exception as err:
        LOG.exception("unexpected failure; the traceback below is also in %s", Path(out_dir) / LOG_FILE)
        code = exit_code(err)
    finally:
        seconds = time.perf_counter() - t0
        if code == EXIT_OK:
            LOG.info("done in %.1f s", seconds)
        else:
            LOG.info("failed after %.1f s: exit code %d", seconds, code)
        detach_log(handlers)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signum}")


def _raise_on_sigterm() -> object | None:
    """SIGTERM raises ``Terminated`` in the job (like Ctrl-C's KeyboardInterrupt), so a preempted
    run ends with its line, the resume command and exit code 143 instead of dying silently.
    Returns the handler it replaced (None where it installed none: not the main thread, or a
    handler that is not Python's default, such as submitit's, which requeues the job itself)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return None
    signal.signal(signal.SIGTERM, _on_sigterm)
    return previous


def check_resume_argument(argv: Sequence[str]) -> str | None:
    """Before Hydra makes the folder: ``resume=`` must name an existing run folder. Returns the
    error line, or None. (A mistyped folder would otherwise start a fresh run there.)"""
    values = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not values or values[-1] in ("", "null", "None"):
        return None
    folder = Path(values[-1])
    if not folder.is_dir():
        return f"resume={folder}: no such run folder; check the path (run folders live under paths.outputs)"
    if not (folder / "manifest.json").exists():
        return (f"resume={folder}: the folder holds no samples (no manifest.json), so there is nothing to resume; "
                "start a new run without resume=")
    return None
