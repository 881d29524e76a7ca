"""The metric registry: every quality metric a result row can carry, as one entry.

A metric is a :class:`Metric`: its name (what ``eval.t2i_metrics`` lists), its row column, what it
needs (the samples, their labels or prompts, the full-compute images of the same noise, features
and their statistics), how it is computed from those, whether higher or lower is better, its table
header and figure axis label, the kinds of rows it is computed for and the tables and plots it is a
column or axis of. The row (rfc.run.row), scoring (rfc.run.score, eval.t2i), the run log's result
line, the tables and the figures all read these entries instead of each spelling the metrics out,
so a metric is added in two places: the function that computes it and its registration.

The built-in metrics are registered by ``eval/builtin.py`` in the row's column order; it is loaded
on the first look-up (by name, so that the metric modules it imports may themselves read the
registry). A metric can also be registered from anywhere else, a test included, with
:func:`register` (or :func:`registered`, which undoes it).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfc.utils.errors import ConfigError
from rfc.utils.logs import timed

if TYPE_CHECKING:
    import numpy as np
    import torch

CLASS = "class"  # class-conditional rows (DiT): features against a reference, labels
T2I = "t2i"  # text-to-image rows (FLUX): a prompt per image
T2V = "t2v"  # text-to-video rows (HunyuanVideo): a prompt per video, images (N, F, H, W, C)
KINDS = (CLASS, T2I, T2V)
# what a metric may need: the MetricInputs fields a compute function reads
INPUTS = ("images", "labels", "prompts", "pair", "features", "stats", "reference", "pair_stats")
PAIR_INPUTS = ("pair", "pair_stats")  # a metric needing one of these is measured against full compute
MISSING_CHOICES = ("error", "skip")
BUILTIN_MODULE = "eval.builtin"


@dataclass
class MetricInputs:
    """What scoring hands every metric of a row. ``images``: uint8 (N, H, W, C) samples;
    ``labels``: class labels or prompt indices; ``prompts``: image i's prompt (text-to-image rows);
    ``pair``: the full-compute images of the same noise; ``features`` / ``stats``: the samples'
    features and their Gaussian statistics in the run's extractor space, ``reference`` the
    reference's (eval.stats.Reference), ``pair_stats`` the full-compute set's; ``extractor``: its
    name. Fields a row does not have stay None, and a metric needing one is not computed.

    ``shared`` lets metrics computed by one call (FID, sFID, IS, precision and recall; PSNR and
    SSIM) compute it once; ``notes`` collects what a metric has to say about a missing value."""

    kind: str
    images: np.ndarray
    labels: np.ndarray | None = None
    device: torch.device | str = "cpu"
    assets: Path | None = None
    prompts: Sequence[str] | None = None
    pair: np.ndarray | None = None
    features: dict[str, np.ndarray] | None = None
    stats: dict[str, np.ndarray] | None = None
    reference: Any = None
    pair_stats: dict[str, np.ndarray] | None = None
    extractor: str | None = None
    notes: list[str] = field(default_factory=list)
    _memo: dict[str, object] = field(default_factory=dict, repr=False)

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``'s value, computed once per row under ``key``."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def note(self, text: str | None) -> None:
        """Add a line to the row's notes (once)."""
        if text and text not in self.notes:
            self.notes.append(text)

    def has(self, needs: Iterable[str]) -> bool:
        """Whether every input of ``needs`` is present."""
        return all(getattr(self, n) is not None for n in needs)


@dataclass(frozen=True)
class Metric:
    """One metric of the result row (see the module docstring).

    ``rows``: the kinds of row (CLASS, T2I) whose scoring computes it; ``tables`` / ``figures``:
    the kinds of table it is a column of and of quality-vs-speed plot it is an axis of, placed by
    ``table_order`` / ``figure_order`` (ties: registration order); ``better``: +1 higher is
    better, -1 lower, 0 not ranked; ``label``: the table header (and the result line's, unless
    ``log_label``); ``axis``: the figure's axis label; ``min_samples``: the sample count under which
    a figure calls it not meaningful; ``check``: None when it can be scored on this machine, else
    (what is missing, the command that fixes it), a file check run before sampling."""

    name: str
    column: str
    compute: Callable[[MetricInputs], float | None]
    needs: tuple[str, ...]
    rows: tuple[str, ...]
    better: int
    label: str
    axis: str
    log_label: str | None = None
    log_format: str = "{:.4g}"
    tables: tuple[str, ...] = ()
    table_order: int = 100
    figures: tuple[str, ...] = ()
    figure_order: int = 100
    min_samples: int = 100
    check: Callable[[], tuple[str, str] | None] | None = None

    def __post_init__(self) -> None:
        unknown = [n for n in self.needs if n not in INPUTS]
        if unknown:
            raise ValueError(f"metric {self.name!r} needs unknown inputs {unknown}; known: {', '.join(INPUTS)}")
        for what in ("rows", "tables", "figures"):
            bad = [k for k in getattr(self, what) if k not in KINDS]
            if bad:
                raise ValueError(f"metric {self.name!r}: {what} {bad} are not kinds of row ({', '.join(KINDS)})")
        if self.better not in (-1, 0, 1):
            raise ValueError(f"metric {self.name!r}: better must be -1, 0 or 1, got {self.better!r}")
        if not self.column.isidentifier():
            raise ValueError(f"metric {self.name!r}: column {self.column!r} is not an identifier")

    @property
    def paired(self) -> bool:
        """Measured against the full-compute images of the same noise (its reference: full
        compute's own row has no value of it)."""
        return any(n in PAIR_INPUTS for n in self.needs)


_REGISTRY: dict[str, Metric] = {}
_loaded = False


def _load_builtin() -> None:
    """Register the built-in metrics once, before anything reads the registry."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module(BUILTIN_MODULE)


def register(metric: Metric) -> Metric:
    """Add ``metric`` after those registered so far (its column goes after theirs in the row).
    A name or column already taken is refused: two entries must never write one cell."""
    _load_builtin()
    for other in _REGISTRY.values():
        if other.name == metric.name or other.column == metric.column:
            raise ValueError(
                f"metric {metric.name!r} (column {metric.column!r}) clashes with the registered "
                f"{other.name!r} (column {other.column!r})"
            )
    _REGISTRY[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    """Remove the metric ``name`` (a KeyError when there is none)."""
    _load_builtin()
    del _REGISTRY[name]


@contextlib.contextmanager
def registered(metric: Metric) -> Iterator[Metric]:
    """``metric`` registered inside the block, removed after it however the block ends."""
    register(metric)
    try:
        yield metric
    finally:
        unregister(metric.name)


def metrics(kind: str | None = None) -> list[Metric]:
    """Every registered metric in registration order (the row's column order); with ``kind``,
    those computed for that kind of row."""
    _load_builtin()
    return [m for m in _REGISTRY.values() if kind is None or kind in m.rows]


def names(kind: str) -> list[str]:
    """The names of the metrics computed for ``kind`` of row: a text-to-image row's default
    ``eval.t2i_metrics``."""
    return [m.name for m in metrics(kind)]


def get(name: str) -> Metric:
    """The metric registered as ``name``."""
    _load_builtin()
    return _REGISTRY[name]


def columns() -> list[str]:
    """The row columns of every registered metric, in the row's order."""
    return [m.column for m in metrics()]


def by_column(column: str) -> Metric | None:
    """The metric writing ``column``, or None for a column that is not a metric's."""
    return next((m for m in metrics() if m.column == column), None)


def table_metrics(kind: str) -> list[Metric]:
    """The metric columns of a table of ``kind``, in their table order."""
    return sorted((m for m in metrics() if kind in m.tables), key=lambda m: m.table_order)


def figure_metrics(kind: str) -> list[Metric]:
    """The candidate y axes of a quality-vs-speed plot of ``kind``, the headline metric first."""
    return sorted((m for m in metrics() if kind in m.figures), key=lambda m: m.figure_order)


def check_names(names: object, kind: str, key: str) -> list[Metric]:
    """The metrics named in config key ``key`` (a list of names of ``kind``), or a ConfigError
    naming the key and the choices."""
    known = {m.name: m for m in metrics(kind)}
    choices = ", ".join(known)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"{key} must be a list of metric names (choices: {choices}), got {names!r}")
    out: list[Metric] = []
    for n in names:
        if not isinstance(n, str) or n not in known:
            raise ConfigError(f"{key}: unknown metric {n!r}; choices: {choices}")
        if known[n] in out:
            raise ConfigError(f"{key} lists {n!r} twice")
        out.append(known[n])
    return out


def check_metrics(names: object, missing: str, kind: str, key: str) -> dict[str, str]:
    """Before any sampling: validate the metric names of config key ``key`` (of ``kind``) and find
    those that cannot be scored on this machine (their ``check``, file checks only). ``missing`` is
    ``eval.missing_metrics``: "error" raises a one-line ConfigError naming the metric, what is
    missing and the fix; "skip" returns {name: reason} for the row's notes, the column left empty."""
    if not isinstance(missing, str) or missing not in MISSING_CHOICES:
        raise ConfigError(f"eval.missing_metrics must be one of {', '.join(MISSING_CHOICES)}, got {missing!r}")
    skipped: dict[str, str] = {}
    for metric in check_names(names, kind, key):
        problem = metric.check() if metric.check is not None else None
        if problem is None:
            continue
        why, fix = problem
        if missing == "error":
            raise ConfigError(
                f"{key}: cannot score {metric.name}: {why}; fix: `{fix}` "
                "(or eval.missing_metrics=skip to record the row without it)"
            )
        skipped[metric.name] = f"{metric.name} not scored: {why} (`{fix}`)"
    return skipped


def compute(
    chosen: Sequence[Metric], inputs: MetricInputs, skipped: Mapping[str, str] | None = None, say_unpaired: bool = True
) -> tuple[dict[str, float | None], list[str]]:
    """Score ``chosen`` on ``inputs``: {column: value} and the note lines for the row. A skipped
    metric (``unavailable``'s answer) and one whose inputs the row lacks is None, never a guess;
    ``say_unpaired``: name the paired metrics left empty for want of full-compute images."""
    skipped = skipped or {}
    values: dict[str, float | None] = {m.column: None for m in chosen}
    notes = [skipped[m.name] for m in chosen if m.name in skipped]
    todo = [m for m in chosen if m.name not in skipped]
    unpaired = [m for m in todo if m.paired and not inputs.has(n for n in m.needs if n in PAIR_INPUTS)]
    if unpaired and say_unpaired:
        notes.append(
            f"{', '.join(m.name for m in unpaired)} not scored: no full-compute images of the same noise "
            "to compare with"
        )
    for m in todo:
        if m in unpaired or not inputs.has(m.needs):
            continue
        with timed(f"{m.label} ({m.name})"):
            value = m.compute(inputs)
        values[m.column] = None if value is None else float(value)
    return values, notes + inputs.notes
