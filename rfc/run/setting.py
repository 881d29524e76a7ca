"""What makes two runs comparable, defined once.

A paired metric (FID2FC, PSNR, SSIM against full compute), a speedup, a resumed sample set and a
table row all compare one run with another. Each comparison is only meaningful when the two runs
agree on everything that shaped the numbers compared, so the harness names those things here and
nowhere else: the runner builds its row's setting columns from :func:`sample_setting`, the
full-compute store files its sets under :func:`setting_id`, the shard manifest refuses a resume
whose setting changed, and ``scripts/make_tables.py`` groups rows and divides latencies with the
same key tuples. Every key is its own column of the result row (``rfc/run/record.py``).

- ``SAMPLE_KEYS``: what fixes every sample's numbers (for text-to-image models, also the prompt
  set). Two runs with equal sample keys draw sample *i* from the same noise through the same
  weights, sampler, guidance and numerics, so their images can be compared one by one (paired
  metrics) and a method=none run of these keys is *the* full-compute set of every cached run
  with them. Device, precision mode, compile, batch size and the batch-invariant numerics
  (``batch_invariant``, rfc.utils.invariance) belong here: they change the rounding, and a bf16
  cached run measured against a tf32 full-compute set would charge the precision's error to the
  method.
- ``QUALITY_KEYS``: the sample keys plus what the quality columns are measured with (extractor,
  reference): rows compared in one table of FID/sFID/IS.
- ``TIMING_KEYS``: what a latency depends on besides the method: the model's shapes, the number of
  steps, guidance, batch size, the device (and its CPU threads), precision mode, compile and the
  batch-invariant numerics. Seed, sample count and weight values do not change the time, so a
  latency-only run (``eval=latency``) joins the quality rows of its timing setting. A speedup
  divides two latencies of one timing setting, never of two.
- ``METHOD_KEYS``: which method ran, with what hyperparameters, through which code path (fused or
  per-site cached steps); not part of any setting: it is what a table compares within one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from rfc.run.row import cell

MODEL_KEYS = ("model", "arch", "image_size", "frames", "vae", "sampler", "sampler_params", "respacing", "num_steps",
              "cfg_scale", "guided_channels")
SAMPLE_KEYS = (*MODEL_KEYS, "checkpoint", "seed", "num_samples", "batch_size", "device", "precision_mode",
               "compile", "prompts", "batch_invariant")
QUALITY_KEYS = (*SAMPLE_KEYS, "extractor", "reference")
TIMING_KEYS = (*MODEL_KEYS, "batch_size", "device", "cpu_threads", "precision_mode", "compile", "batch_invariant")
METHOD_KEYS = ("method", "method_params", "fused")


def key(row: Mapping[str, object], keys: Sequence[str]) -> tuple[str, ...]:
    """The row's values of ``keys`` as their CSV text (an empty string for a missing value), so a
    row read back from the CSV and the record that wrote it give the same tuple."""
    return tuple(cell(row.get(k)) for k in keys)


OPTIONAL_KEYS = ("prompts", "frames", "batch_invariant")
"""Keys added after setting ids were first issued: part of an id only when set, so the ids of rows
without them (every DiT row) stay what they were."""


def setting_id(row: Mapping[str, object], keys: Sequence[str] = SAMPLE_KEYS) -> str:
    """A short, stable name of a setting: 16 hex digits of the sha256 of its key values."""
    values = dict(zip(keys, key(row, keys), strict=True))
    body = json.dumps({k: v for k, v in values.items() if v or k not in OPTIONAL_KEYS}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def describe_sampling(row: Mapping[str, object]) -> str:
    """One line for captions: how the samples were drawn (device, numerics, batch size)."""
    compiled = "compiled" if cell(row.get("compile")) == "True" else "eager"
    rows = cell(row.get("batch_invariant"))
    invariant = f" (batch-invariant: tiles of {rows} rows)" if rows else ""
    return (f"{cell(row.get('device')) or 'unknown device'}, {cell(row.get('precision_mode')) or '?'} {compiled}, "
            f"batches of {cell(row.get('batch_size')) or '?'}{invariant}")


def describe_timing(row: Mapping[str, object]) -> str:
    """One line for captions: what a latency was measured on."""
    threads = cell(row.get("cpu_threads"))
    return describe_sampling(row) + (f", {threads} CPU threads" if threads else "")
