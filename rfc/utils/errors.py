"""The failures a run can predict, each reported as one line naming the key or file at fault.

The command line (run.py, via rfc.run.cli) turns these into ``error: ...`` with exit code 2; anything
else is a bug and keeps its traceback (exit code 1)."""

from __future__ import annotations


class RunError(RuntimeError):
    """A predictable failure that is not a bad config value: an unreadable or non-finite input,
    a folder in use, a sample set that came out non-finite."""


class ConfigError(ValueError):
    """A config value that cannot be used; the message names its key (``eval.num_samples``)."""


class NonFiniteError(RunError):
    """NaN or infinity where a number is needed: weights, drawn samples, statistics."""


class FolderLockedError(RunError):
    """Another process holds the run folder."""


class MissingAssetError(FileNotFoundError):
    """A file the run needs is not on disk. The runner never downloads: the message names the
    file and the command that fetches it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (what SLURM and a scheduler send on preemption or a time limit, and what
    ``kill`` sends): handled like Ctrl-C, the batches stored so far kept, ending with exit code 143."""


EXIT_OK, EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
EXPECTED = (ValueError, RunError, MissingAssetError)  # ConfigError and ResumeError are ValueErrors


def one_line(err: BaseException) -> str:
    """A failure's message on one line (the terminal's ``error: ...`` and W&B's summary)."""
    return " ".join(str(err).split()) or type(err).__name__


def exit_code(err: BaseException) -> int:
    """The exit code a failure ends the command with: 130 interrupted (Ctrl-C), 143 terminated
    (SIGTERM, 128 + 15 as a shell reports it), 2 a predictable failure (these classes, or a file
    that cannot be read or written), 1 a bug. The command line (rfc.run.cli) ends with it, and a
    W&B run of the job finishes with it, so both say the same."""
    if isinstance(err, Terminated):
        return EXIT_TERMINATED
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, (*EXPECTED, OSError)):
        return EXIT_ERROR
    return EXIT_BUG


def reason(err: BaseException, limit: int = 200) -> str:
    """Why a loader failed, in one line: ``Type: first line of its message``."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__
