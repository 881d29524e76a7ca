"""One result row. Every table, CSV file and log reads its columns from this class, so a column
means the same thing everywhere. Unknown values stay None (an empty cell), never a guess. The row
imports nothing of the harness but the metric registry (eval.registry), whose columns it carries:
the setting, the loggers and the reports read it."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval import registry

REPO_ROOT = Path(__file__).resolve().parents[2]


def cell(value: object) -> str:
    """A value as its CSV cell: "" for None (unknown), repr for floats (round-trips exactly)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


RESULT_PATHS = ("results",)  # what the harness itself writes into the tree: not code


def git_sha(repo: str | Path) -> str | None:
    """Commit of the code that produced a row, with "-dirty" when tracked code had local changes.
    Changes under results/ (rows, tables, figures the harness writes) do not count: they describe
    results, not the code that made them."""
    excludes = [f":(exclude){p}" for p in RESULT_PATHS]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excludes],
                               cwd=repo, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


@dataclass(init=False, eq=False)
class RunRecord:
    """Columns of results/runs.csv, in order: the fields below, with the metric columns of
    eval.registry after ``processes`` (the registry's order). A metric column is read and written
    as an attribute like any field (``record.fid``) and taken as a keyword; the record keeps the
    values of metric columns in ``metrics``, so that a metric registered after this class was
    made (by a test, a plug-in) is a column of its rows all the same."""

    run_id: str = field(default_factory=new_run_id)
    time: str = field(default_factory=_now)
    git_sha: str | None = None
    experiment: str | None = None  # experiment preset (configs/experiment) the run belongs to
    variant: str | None = None  # the row's label in that experiment's tables ("TaylorSeer N=4 m=2")
    sweep: str | None = None  # Hydra multirun folder: rows of one sweep share it
    setting_id: str | None = None  # rfc.run.setting.setting_id of the sample setting (= its full-compute store entry)
    model: str | None = None
    arch: str | None = None
    image_size: int | None = None
    checkpoint: str | None = None  # weights: "sha256:<16 hex>" of the checkpoint, or "random:<init>:<config>"
    method: str | None = None
    method_params: str | None = None  # JSON of the method's hyperparameters
    sampler: str | None = None
    sampler_params: str | None = None  # JSON of the sampler's own parameters (DDIM's eta)
    respacing: str | None = None
    num_steps: int | None = None
    cfg_scale: float | None = None
    guided_channels: int | None = None
    prompts: str | None = None  # text-to-image rows: the prompt set (name:digest); sample i uses prompt i
    frames: int | None = None  # text-to-video rows: frames per video (a row with frames holds videos)
    seed: int | None = None
    num_samples: int | None = None
    batch_size: int | None = None
    nfc: float | None = None  # full computations per sample as the papers count them (ToCa: block 0 full), mean
    nfc_min: int | None = None  # the fewest and the most of any sample (they differ in schedule_scope=sample)
    nfc_max: int | None = None
    tflops: float | None = None  # analytic, per image, of what ran (B = 2 rows with guidance)
    full_sites: float | None = None  # branch computations on all tokens, per sample
    cached_sites: float | None = None  # branches predicted or reused, per sample
    partial_sites: float | None = None  # branches recomputed on a token subset, per sample
    full_blocks: float | None = None  # block evaluations with both branches on all tokens, per sample
    partial_blocks: float | None = None  # block evaluations that recomputed a token subset (ToCa), per sample
    cache_bytes: int | None = None  # peak bytes held by the method (whole batch)
    latency_s: float | None = None  # median seconds of the sampling loop per batch
    latency_spread_s: float | None = None  # max - min over timed batches
    timed_batches: int | None = None  # batches behind the latency figures (warm-up excluded)
    images_per_s: float | None = None  # over the timed batches, sampling loop only
    vae_latency_s: float | None = None  # median seconds decoding one batch (not in latency_s)
    peak_memory_gb: float | None = None  # peak GPU memory allocated while sampling (rank 0)
    processes: int | None = None  # processes that drew the samples (torchrun world size)
    # here: one column per registered metric (eval.registry), in registration order
    extractor: str | None = None  # feature space of fid / sfid
    reference: str | None = None  # what fid is measured against
    vae: str | None = None
    device: str | None = None  # GPU name, or "cpu (<machine>)"
    cpu_threads: int | None = None  # torch's intra-op threads on a CPU (they set its speed); empty on a GPU
    precision_mode: str | None = None  # fp32 | tf32 | bf16 (bf16 weights) | bf16-autocast
    batch_invariant: int | None = None  # rows per tile of the batch-invariant numerics; empty: off
    compile: bool | None = None  # torch.compile'd model / cached steps
    fused: bool | None = None  # cached steps through the fused path (it ran, not only configured); empty: none
    torch_version: str | None = None
    output_dir: str | None = None
    notes: str | None = None  # why a metric is missing, what the paired metrics compare with

    def __init__(self, **values: Any) -> None:
        object.__setattr__(self, "metrics", {})
        for f in dataclasses.fields(self):
            if f.name in values:
                setattr(self, f.name, values.pop(f.name))
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
            else:
                setattr(self, f.name, f.default)
        metric_columns = set(registry.columns())
        unknown = [k for k in values if k not in metric_columns]
        if unknown:
            raise TypeError(f"RunRecord has no column {', '.join(map(repr, unknown))}")
        for key, value in values.items():
            setattr(self, key, value)

    def __getattr__(self, name: str) -> Any:
        """A metric column's value (None until scored); called only for names that are not fields."""
        if name != "metrics" and name in registry.columns():
            return self.metrics.get(name)
        raise AttributeError(f"RunRecord has no column {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in FIELD_NAMES:
            object.__setattr__(self, name, value)
        elif name in registry.columns():
            self.metrics[name] = value
        else:
            raise AttributeError(f"RunRecord has no column {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunRecord) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items() if v is not None)
        return f"RunRecord({shown})"

    @classmethod
    def columns(cls) -> list[str]:
        """Every column in order: the fields up to ``processes``, the registered metrics, the rest."""
        names = [f.name for f in dataclasses.fields(cls)]
        cut = names.index(METRICS_AFTER) + 1
        return [*names[:cut], *registry.columns(), *names[cut:]]

    def as_dict(self) -> dict[str, object]:
        """{column: value} in column order (what the CSV, record.json and W&B get)."""
        return {c: getattr(self, c) for c in self.columns()}


METRICS_AFTER = "processes"  # the metric columns follow this field
FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(RunRecord))
