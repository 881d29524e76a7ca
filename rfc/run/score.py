"""Score: a run's metrics, those eval.registry lists for its kind of row. Class-conditional rows:
quality against the reference (FID, sFID, IS, precision, recall, class agreement) and paired
metrics against full compute with the same noise (FID and sFID to full compute, PSNR, SSIM).
Feature statistics are computed once per sample set and extractor: the run's go to its
stats.npz, a full-compute set's are cached in the store entry beside its samples. This module
gathers what the metrics need (features, reference, the full-compute pair); the registry's
entries compute them, so a registered metric is scored without a change here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from eval import registry
from eval.extractors import extractor_id, get_extractor, resolve_reference
from eval.registry import CLASS, MetricInputs
from eval.stats import check_features, save_stats, stats_of
from rfc.run.build import RunPlan
from rfc.run.generate import SampleSet
from rfc.run.row import RunRecord
from rfc.run.runlog import timed
from rfc.run.store import FullComputeEntry, link_or_copy
from rfc.utils.errors import RunError
from rfc.utils.progress import task

LOG = logging.getLogger("rfc")


def score(record: RunRecord, samples: SampleSet, plan: RunPlan, pair: FullComputeEntry | None = None,
          notes: list[str] | None = None, publish: FullComputeEntry | None = None) -> RunRecord:
    """Quality metrics against the reference, and paired metrics against full compute: the run
    itself for method=none, else the full-compute set of the run's setting from the store
    (``pair``; its statistics are cached there per extractor). ``publish``: the store entry this
    full-compute run just published, which keeps the statistics computed here."""
    if plan.text_to_image:
        return score_text_to_image(record, samples, plan, pair, notes)
    spec = get_extractor(plan.extractor)
    extract = spec.build(plan.paths, str(plan.device))
    with timed(f"features of the samples ({spec.name}, {len(samples.images)} images)"), \
            task("features of the samples"):
        feats = extract(samples.images)
    check_features(feats, spec.name, "the samples")
    with timed("reference") as info, task("features of the reference"):
        ref = resolve_reference(str(plan.cfg.eval.reference), spec, extract, plan.paths)
        info["detail"] = ref.name
    own = stats_of(feats)  # computed once: metrics, stats.npz and the paired distances share it
    record.extractor, record.reference = spec.name, ref.name
    save_stats(plan.out_dir / "stats.npz", feats, spec.name, own)
    eid = extractor_id(spec, plan.paths)
    if publish is not None:  # the set's statistics are this run's: the same file, linked
        link_or_copy(plan.out_dir / "stats.npz", publish.stats_path(eid))

    pair_images = pair_stats = None
    reference_note = []
    if plan.method.computes_everything:  # the reference of the paired metrics: not scored against itself
        reference_note = [self_pair_note(CLASS)]
    elif pair is not None:
        pair_images = load_pair(pair, samples, "class labels")
        pair_stats = pair.load_stats(eid)
        if pair_stats is None:
            with timed(f"features of the full-compute set {pair.id} ({len(pair_images)} images), kept in the store"), \
                    task("features of the full-compute set"):
                pair_feats = extract(pair_images)
                check_features(pair_feats, spec.name, f"the full-compute set {pair.samples}")
                pair_stats = stats_of(pair_feats)
                save_stats(pair.stats_path(eid), pair_feats, spec.name, pair_stats)
        else:
            LOG.info("features of the full-compute set %s: statistics from the store", pair.id)
    inputs = MetricInputs(CLASS, samples.images, samples.labels, plan.device, Path(plan.paths["assets"]),
                          pair=pair_images, features=feats, stats=own, reference=ref, pair_stats=pair_stats,
                          extractor=spec.name)
    values, lines = registry.compute(registry.metrics(CLASS), inputs, say_unpaired=False)
    for column, value in values.items():
        setattr(record, column, value)
    record.notes = "; ".join(list(notes or []) + reference_note + lines) or None
    return record


def self_pair_note(kind: str, names: list[str] | None = None) -> str:
    """Why a full-compute row has no paired metrics: it is their reference (against itself they
    would read FID2FC 0 up to float noise and PSNR inf, numbers that measure nothing)."""
    paired = names if names is not None else [m.name for m in registry.metrics(kind) if m.paired]
    return f"{', '.join(paired)} not scored: this full-compute row is their reference"


def load_pair(pair: FullComputeEntry, samples: SampleSet, labels: str) -> np.ndarray:
    """The full-compute images of the store entry ``pair``, refused when their ``labels`` (class
    labels, prompt indices) differ from the run's: one setting id, two sample sets, a damaged store."""
    images, pair_labels = pair.load()
    if not np.array_equal(pair_labels, samples.labels):
        raise RunError(f"the full-compute set {pair.samples} has other {labels} than this run's samples "
                       f"although both claim setting {pair.id}; delete {pair.folder} and run again")
    return images


def score_text_to_image(record: RunRecord, samples: SampleSet, plan: RunPlan, pair: FullComputeEntry | None,
                        notes: list[str] | None) -> RunRecord:
    """A text-to-image run's metrics (eval.t2i): PSNR, SSIM and LPIPS against the full-compute
    images of the same prompts and noise (the run itself for method=none, else the store's set),
    ImageReward and CLIP score of each image with its prompt. A metric whose weights are missing
    was refused or marked skipped while planning; its reason goes to the row's notes."""
    from eval.t2i import score_t2i

    reference = None
    kind = plan.family.row_kind  # T2I, or T2V for videos
    names = list(plan.cfg.eval.get("t2i_metrics") or registry.names(kind))
    reference_note = []
    if plan.method.computes_everything:  # the reference of the paired metrics: not scored against itself
        paired = [n for n in names if registry.get(n).paired]
        names = [n for n in names if n not in paired]
        reference_note = [self_pair_note(kind, paired)] if paired else []
    elif pair is not None:
        reference = load_pair(pair, samples, "prompt indices")
    prompts = plan.prompts.prompts
    texts = [prompts[int(i) % len(prompts)] for i in samples.labels]
    values, lines = score_t2i(samples.images, texts, reference, names, plan.skipped_metrics, plan.device,
                              Path(plan.paths["assets"]))
    for column, value in values.items():
        setattr(record, column, value)
    record.notes = "; ".join(list(notes or []) + reference_note + lines) or None
    return record
