"""What a run's ``run.log`` says, so that the log alone tells the run's story: what was asked
(a config summary), how sampling went (milestones with throughput), where the time went (each
stage's seconds), what it found (the row's key metrics), and, from rfc.run.cli, how it ended.

Everything here logs at INFO on the ``rfc`` logger: rfc.run.cli sends INFO to the run folder's
``run.log`` only and WARNING and above to the terminal too, so the terminal keeps its few lines
(``samples:``, ``grid:``, ``row:``, errors) while the log keeps the detail. Torchrun ranks other
than 0 have no log file: what they log goes nowhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eval import registry
from rfc.utils.logs import timed

if TYPE_CHECKING:
    from rfc.run.build import RunPlan
    from rfc.run.row import RunRecord

LOG = logging.getLogger("rfc")
LOG_FILE = "run.log"  # in the run folder (rfc.run.cli attaches it)
__all__ = ["LOG_FILE", "timed", "wandb_mode"]
MILESTONES = 10  # progress lines per sampling session: every ~10 % of its batches (each batch if fewer)


# --------------------------------------------------------------------------------------------
# The config summary
# --------------------------------------------------------------------------------------------


def plan_summary(plan: RunPlan, sweep: str | None = None) -> list[str]:
    """The run's settings as a few aligned lines: what a reader of the log needs to know what ran
    without opening the resolved config (``.hydra/config.yaml`` holds every key)."""
    import torch

    cfg, s, method = plan.cfg, plan.setting, plan.method
    params = " ".join(f"{k}={v}" for k, v in method.params().items())
    lines = [f"model     {s['model']} ({s['arch']}, {s['image_size']} px, "
             f"{'VAE ' + str(s['vae']) if s.get('vae') else 'pixel space'}; weights {s['checkpoint']})"]
    fused = f" (fused={cfg.method.fused})" if not method.computes_everything and "fused" in cfg.method else ""
    lines.append(f"method    {method.name}{' ' + params if params else ''}{fused}")
    respacing = f" (respacing {s['respacing']})" if s.get("respacing") else ""
    sampler_params = "".join(f", {k}={v}" for k, v in json.loads(s["sampler_params"] or "{}").items())
    lines.append(f"sampler   {s['sampler']}, {s['num_steps']} steps{respacing}{sampler_params}")
    lines.append(f"guidance  {plan.family.guidance_line(s)}")
    batches = math.ceil(plan.num_samples / plan.batch_size)
    lines.append(f"samples   {plan.num_samples} in {batches} batch(es) of {plan.batch_size}, seed {s['seed']}, "
                 f"{int(cfg.eval.warmup_batches)} warm-up batch(es)")
    threads = torch.get_num_threads()
    where = f"{s['device']}, {threads} thread{'s' * (threads != 1)}" if plan.device.type == "cpu" else (
        f"{plan.device} ({s['device']})")
    invariant = f"; batch-invariant, tiles of {s['batch_invariant']} rows" if s.get("batch_invariant") else ""
    lines.append(f"device    {where}; precision {s['precision_mode']}; compile {str(s['compile']).lower()}{invariant}")
    if not plan.score:
        lines.append("scoring   off (eval.score=false)")
    elif plan.text_to_image:
        skipped = f"; skipped: {', '.join(plan.skipped_metrics)}" if plan.skipped_metrics else ""
        lines.append(f"scoring   text-to-image metrics, paired={cfg.eval.paired}{skipped}")
    else:
        lines.append(f"scoring   {plan.extractor} features against {cfg.eval.reference}; paired={cfg.eval.paired}")
    tags = [f"experiment {cfg.experiment_name}" if cfg.get("experiment_name") else "",
            f"variant {cfg.variant_name!r}" if cfg.get("variant_name") else "",
            f"sweep {sweep}" if sweep else "", f"resume of {cfg.resume}" if cfg.get("resume") else ""]
    if any(tags):
        lines.append("job       " + "; ".join(t for t in tags if t))
    sinks = [f"csv {cfg.paths.runs_csv}" if cfg.logger.get("csv") else "",
             f"wandb ({wandb_mode(dict(cfg.logger.wandb))})" if cfg.logger.get("wandb") else ""]
    lines.append(f"output    {plan.out_dir}; rows to {', '.join(x for x in sinks if x) or 'the run folder only'}")
    return lines


def log_plan(plan: RunPlan, sweep: str | None = None) -> None:
    LOG.info("config:")
    for line in plan_summary(plan, sweep):
        LOG.info("  %s", line)


# --------------------------------------------------------------------------------------------
# Sampling milestones
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchReport:
    """One batch of a sampling session, as it finished (rfc.run.generate.generate_batches makes one
    per batch kept, and one per untimed warm-up pass)."""

    desc: str  # the session: "sampling", "full compute (for pairing)"
    start: int  # first sample index of the batch
    size: int
    done: int  # samples this session has drawn, this batch included
    total: int  # samples this session draws
    batches_done: int
    batches_total: int
    sampling_s: float  # the sampling loop of this batch (the latency clock)
    vae_s: float | None  # decoding it
    elapsed_s: float  # wall seconds since the session's first kept batch began (warm-up excluded)
    warmup: bool = False  # an untimed warm-up pass: nothing kept

    @property
    def batch_images_per_s(self) -> float:
        """This batch's sampling-loop throughput."""
        return self.size / self.sampling_s if self.sampling_s > 0 else math.inf

    @property
    def images_per_s(self) -> float:
        """The session's wall throughput so far (storing shards included)."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else math.inf

    @property
    def stage(self) -> str:
        """A short key for the session: ``sampling`` or ``pairing``."""
        return "sampling" if self.desc == "sampling" else "pairing"


BatchListener = Callable[[BatchReport], None]


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (m:ss under an hour)."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Milestones:
    """Logs a sampling session's progress: every ~10 % of its batches (every batch when there are
    at most ten), then one line with the session's totals. A person tailing run.log of a
    ten-hour job sees it move; a two-batch job gets two lines. ``processes``: the torchrun group's
    size; rank 0 logs, and its counts are its own share of the batches, which the lines say."""

    def __init__(self, processes: int = 1) -> None:
        self.sampling_s = 0.0
        self.vae_s = 0.0
        self.share = f" [rank 0's share; {processes} processes]" if processes > 1 else ""

    def __call__(self, report: BatchReport) -> None:
        r = report
        if self.share:
            r = dataclasses.replace(report, desc=report.desc + self.share)
        if r.warmup:
            LOG.info("%s: warm-up pass of samples [%d, %d), untimed and discarded (%.2f s)", r.desc, r.start,
                     r.start + r.size, r.sampling_s)
            return
        self.sampling_s += r.sampling_s
        self.vae_s += r.vae_s or 0.0
        every = max(1, math.ceil(r.batches_total / MILESTONES))
        if r.batches_done % every == 0 or r.batches_done == r.batches_total:
            eta = r.elapsed_s / r.done * (r.total - r.done) if r.done else math.inf
            LOG.info("%s: %d/%d samples (%.0f %%), batch %d/%d, %.3g img/s (this batch %.3g img/s, %.2f s), "
                     "elapsed %s, ETA %s", r.desc, r.done, r.total, 100 * r.done / r.total, r.batches_done,
                     r.batches_total, r.images_per_s, r.batch_images_per_s, r.sampling_s, clock(r.elapsed_s),
                     clock(eta))
        if r.batches_done == r.batches_total:
            vae = f", VAE decode {self.vae_s:.2f} s" if self.vae_s else ""
            LOG.info("%s: done, %d samples in %.2f s (%.3g img/s; sampling loop %.2f s%s)", r.desc, r.total,
                     r.elapsed_s, r.images_per_s, self.sampling_s, vae)


# --------------------------------------------------------------------------------------------
# Timings and the result
# --------------------------------------------------------------------------------------------


# (column, label, format) of the row's cost columns, shown before its metrics (eval.registry's)
KEY_COSTS = (
    ("nfc", "NFC", "{:.4g}"), ("tflops", "TFLOPs/image", "{:.4g}"), ("latency_s", "latency", "{:.4g} s/batch"),
    ("images_per_s", "throughput", "{:.4g} img/s"),
)


def key_metrics() -> list[tuple[str, str, str]]:
    """(column, label, format) of the row's key numbers in the result line's order: the costs,
    then every registered metric in the row's order."""
    return [*KEY_COSTS, *((m.column, m.log_label or m.label, m.log_format) for m in registry.metrics())]


def result_line(record: RunRecord) -> str:
    """The row's key metrics that were measured, in one line (a missing one is left out; the
    row's notes say why)."""
    parts = []
    for column, name, fmt in key_metrics():
        value = getattr(record, column)
        if value is not None:
            parts.append(f"{name} {fmt.format(value)}")
    return f"result: {record.model}/{record.method}: " + (", ".join(parts) or "no metrics")


def log_result(record: RunRecord) -> None:
    LOG.info("%s", result_line(record))
    if record.notes:
        LOG.info("notes: %s", record.notes)


def wandb_mode(settings: dict) -> str:
    """The mode a W&B run opens in: WANDB_MODE when set (how W&B users switch it), else
    ``logger.wandb.mode``."""
    return os.environ.get("WANDB_MODE") or str(settings.get("mode") or "offline")
