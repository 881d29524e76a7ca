"""Reference statistics in ADM's .npz layout, and the metric bundle computed against them.

A reference file holds any of: ``arr_0`` (uint8 NHWC images), ``mu`` / ``sigma`` (pool features),
``mu_s`` / ``sigma_s`` (spatial features). OpenAI's reference batches are used as they are. Files
this harness writes (``save_stats``) add ``features`` (the pool features, for precision / recall
without re-extracting) and ``extractor`` (the feature space, so statistics from different
extractors are never compared).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.fid import feature_statistics, frechet_distance
from eval.metrics import inception_score, precision_recall

IS_SPLITS = 10  # ADM: 10 splits
PR_K = 3  # ADM: k = 3 nearest neighbours


@dataclass
class Reference:
    name: str
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    features: np.ndarray | None  # pool features for precision / recall


def stats_of(feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    out["mu"], out["sigma"] = feature_statistics(feats["features"])
    if "spatial" in feats:
        out["mu_s"], out["sigma_s"] = feature_statistics(feats["spatial"])
    return out


def save_stats(path: str | Path, feats: dict[str, np.ndarray], extractor: str,
               stats: dict[str, np.ndarray] | None = None) -> Path:
    """Write ADM-layout statistics of a feature set (atomically), reusable as a reference;
    ``stats`` = stats_of(feats) when the caller already has them."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **(stats or stats_of(feats)), features=feats["features"], extractor=np.array(extractor))
    os.replace(tmp, path)
    return path


def load_reference(path: str | Path, extractor_name: str, extract) -> Reference:  # noqa: ANN001 - extractor
    """A reference from an .npz: precomputed statistics where present (checked against the
    extractor), features from ``arr_0`` where needed (precision / recall, or no statistics)."""
    path = Path(path)
    with np.load(path) as data:
        keys = set(data.files)
        if "extractor" in keys and str(data["extractor"]) != extractor_name:
            raise ValueError(f"{path} holds statistics of the {data['extractor']} extractor, not {extractor_name}")
        arrays = {k: data[k] for k in keys - {"extractor"}}
    feats = None
    if "features" in arrays:
        feats = {"features": arrays["features"]}
    elif "arr_0" in arrays:
        feats = extract(arrays["arr_0"])
    if "mu" in arrays:
        mu, sigma = arrays["mu"], arrays["sigma"]
        mu_s, sigma_s = arrays.get("mu_s"), arrays.get("sigma_s")
    elif feats is not None:
        st = stats_of(feats)
        mu, sigma, mu_s, sigma_s = st["mu"], st["sigma"], st.get("mu_s"), st.get("sigma_s")
    else:
        raise ValueError(f"{path} has neither statistics (mu, sigma) nor images (arr_0)")
    return Reference(path.name, mu, sigma, mu_s, sigma_s, None if feats is None else feats["features"])


def reference_from_features(name: str, feats: dict[str, np.ndarray]) -> Reference:
    st = stats_of(feats)
    return Reference(name, st["mu"], st["sigma"], st.get("mu_s"), st.get("sigma_s"), feats["features"])


def distances(st: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> tuple[float, float | None]:
    """(FID, sFID) between two statistics dicts; sFID None unless both have spatial statistics."""
    if st["mu"].shape != other["mu"].shape:
        raise ValueError(f"feature sizes differ: {st['mu'].shape} vs {other['mu'].shape}")
    fid = frechet_distance(st["mu"], st["sigma"], other["mu"], other["sigma"])
    if st.get("mu_s") is None or other.get("mu_s") is None:
        return fid, None
    return fid, frechet_distance(st["mu_s"], st["sigma_s"], other["mu_s"], other["sigma_s"])


def quality_metrics(feats: dict[str, np.ndarray], ref: Reference, has_logits_reason: str | None = None,
                    stats: dict[str, np.ndarray] | None = None) -> dict[str, object]:
    """fid, sfid, inception_score, precision, recall (None where not computable) and notes;
    ``stats`` = stats_of(feats) when the caller already has them."""
    st = stats or stats_of(feats)
    fid, sfid = distances(st, {"mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s, "sigma_s": ref.sigma_s})
    out: dict[str, object] = {"fid": fid, "sfid": sfid, "inception_score": None, "precision": None,
                              "recall": None}
    notes = []
    n = len(feats["features"])
    if "logits" in feats and n >= IS_SPLITS:
        out["inception_score"] = inception_score(feats["logits"], IS_SPLITS)
    elif "logits" in feats:
        notes.append(f"inception_score missing: needs at least {IS_SPLITS} samples")
    elif has_logits_reason:
        notes.append(f"inception_score missing: {has_logits_reason}")
    if ref.features is not None and min(n, len(ref.features)) > PR_K:
        out["precision"], out["recall"] = precision_recall(ref.features, feats["features"], PR_K)
    elif ref.features is not None:
        notes.append(f"precision/recall missing: need more than {PR_K} samples")
    out["notes"] = "; ".join(notes) or None
    return out
