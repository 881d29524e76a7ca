"""Reference statistics in ADM's .npz layout, and the metric bundle computed against them.

A reference file holds any of: ``arr_0`` (uint8 NHWC images), ``mu`` / ``sigma`` (pool features),
``mu_s`` / ``sigma_s`` (spatial features). OpenAI's reference batches are used as they are. Files
this harness writes (``save_stats``) add ``features`` (the pool features, for precision / recall
without re-extracting) and ``extractor`` (the feature space, so statistics from different
extractors are never compared).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.fid import feature_statistics, frechet_distance
from eval.metrics import inception_score, precision_recall
from rfc.utils.errors import NonFiniteError, reason

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
    from rfc.utils.files import atomic_savez

    path = Path(path)
    atomic_savez(path, **(stats or stats_of(feats)), features=feats["features"], extractor=np.array(extractor))
    return path


class NpzError(ValueError):
    """An .npz input that cannot be used; the message names the file and what is wrong."""


def read_npz(path: str | Path, what: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz (all, or those of ``keys`` it has), loaded now, so that a damaged
    file fails here with its name. With ``keys``, the other members' headers are still read:
    ``{name: (shape, dtype)}`` under the key ``"__headers__"``."""
    path = Path(path)
    if not path.is_file():
        raise NpzError(f"{what} {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a bare .npy array, not an .npz archive")
            wanted = data.files if keys is None else [k for k in data.files if k in keys]
            out = {k: data[k] for k in wanted}
        if keys is not None:
            with zipfile.ZipFile(path) as zf:
                out["__headers__"] = {n[:-4]: _npy_header(zf, n) for n in zf.namelist() if n.endswith(".npy")}
        return out
    except Exception as err:  # zipfile, EOF, pickle and format errors differ by damage
        raise NpzError(f"{what} {path} is not a readable .npz ({reason(err)})") from err


def _npy_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one .npy member, without reading its data."""
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def check_statistics(arrays: dict[str, np.ndarray], path: str | Path) -> None:
    """mu / sigma (and mu_s / sigma_s) come in pairs, with matching shapes and finite values, and
    each sigma is a covariance: symmetric and positive semi-definite (up to float rounding). A
    matrix that is not would give a Frechet distance that is a number, and wrong."""
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        has_mu, has_sigma = mu_key in arrays, sigma_key in arrays
        if has_mu != has_sigma:
            raise NpzError(f"{path} has {mu_key if has_mu else sigma_key} but no {sigma_key if has_mu else mu_key}: "
                           "statistics need both")
        if not has_mu:
            continue
        mu, sigma = np.asarray(arrays[mu_key]), np.asarray(arrays[sigma_key])
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise NpzError(f"{path}: {mu_key} {mu.shape} and {sigma_key} {sigma.shape} are not a mean and its "
                           "covariance")
        for key, value in ((mu_key, mu), (sigma_key, sigma)):
            if not np.isfinite(value).all():
                raise NonFiniteError(f"{path}: {key} holds NaN or inf; the statistics are damaged, compute them again")
        check_covariance(sigma.astype(np.float64), f"{path}: {sigma_key}")


def check_covariance(sigma: np.ndarray, what: str) -> None:
    """Refuse a matrix that is not a covariance: asymmetric beyond 1e-6 of its largest entry, or
    with an eigenvalue below -1e-6 of its largest (a sample covariance is PSD; rounding leaves
    eigenvalues of about 1e-12 of the largest below zero)."""
    scale = float(np.abs(sigma).max()) or 1.0
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        raise NpzError(f"{what} is not symmetric (max |sigma - sigma^T| = {asym:.3g}, largest entry {scale:.3g}): "
                       "not a covariance; compute the statistics again")
    eig = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if eig[0] < -1e-6 * max(abs(eig[-1]), abs(eig[0])):
        raise NpzError(f"{what} is not positive semi-definite (smallest eigenvalue {eig[0]:.3g}, largest "
                       f"{eig[-1]:.3g}): not a covariance; compute the statistics again")


def check_features(feats: dict[str, np.ndarray], extractor: str, what: str) -> None:
    """Refuse non-finite features: the extractor's weights are damaged, and any metric from them
    would be garbage."""
    if not np.isfinite(feats["features"]).all():
        raise NonFiniteError(f"the {extractor} features of {what} hold NaN or inf: the extractor's weights are "
                             "damaged (fetch them again)")


def check_images(shape: tuple[int, ...], dtype: np.dtype, path: str | Path, videos: bool = False) -> None:
    """ADM's sample layout: uint8 (N, H, W, C) with N >= 1; with ``videos``, also uint8 videos
    (N, F, H, W, C) (a text-to-video family's samples, as the full-compute store keeps them)."""
    ranks = (4, 5) if videos else (4,)
    if dtype != np.uint8 or len(shape) not in ranks or shape[0] == 0:
        layout = "images (N, H, W, C) or videos (N, F, H, W, C)" if videos else "images (N, H, W, C)"
        raise NpzError(f"{path}: arr_0 must hold uint8 {layout} with N >= 1, got {dtype} {shape}")


STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "extractor")


def check_reference_file(path: str | Path, extractor: str | None = None, dim: int | None = None) -> None:
    """What can be checked of a reference before any sampling, without reading its images: it
    opens, it holds statistics or images, its statistics are whole, finite and covariances, its
    images are uint8 NHWC; with the run's ``extractor`` and its feature length ``dim``, statistics
    of that feature space (the extractor they name, mu of that length)."""
    arrays = read_npz(path, "reference", keys=STAT_KEYS)
    headers = arrays.pop("__headers__")
    if "mu" not in arrays and "sigma" not in arrays and "arr_0" not in headers:
        raise NpzError(f"reference {path} has neither statistics (mu, sigma) nor images (arr_0)")
    if extractor is not None and "extractor" in arrays and str(arrays["extractor"]) != extractor:
        raise NpzError(f"{path} holds statistics of the {arrays['extractor']} extractor, not {extractor}")
    if dim is not None and "mu" in arrays and np.asarray(arrays["mu"]).shape != (dim,):
        raise NpzError(f"{path}: mu has {np.asarray(arrays['mu']).shape} entries, the {extractor or 'run'}'s "
                       f"features have {dim}: statistics of another feature space")
    check_statistics(arrays, path)
    if "arr_0" in headers:
        check_images(*headers["arr_0"], path)


def load_reference(path: str | Path, extractor_name: str, extract) -> Reference:  # noqa: ANN001 - extractor
    """A reference from an .npz: precomputed statistics where present (checked against the
    extractor), features from ``arr_0`` where needed (precision / recall, or no statistics)."""
    path = Path(path)
    arrays = read_npz(path, "reference")
    if "extractor" in arrays and str(arrays["extractor"]) != extractor_name:
        raise NpzError(f"{path} holds statistics of the {arrays['extractor']} extractor, not {extractor_name}")
    arrays.pop("extractor", None)
    check_statistics(arrays, path)
    feats = None
    if "features" in arrays:
        feats = {"features": arrays["features"]}
    elif "arr_0" in arrays:
        check_images(arrays["arr_0"].shape, arrays["arr_0"].dtype, path)
        feats = extract(arrays["arr_0"])
    if "mu" in arrays:
        mu, sigma = arrays["mu"], arrays["sigma"]
        mu_s, sigma_s = arrays.get("mu_s"), arrays.get("sigma_s")
    elif feats is not None:
        st = stats_of(feats)
        mu, sigma, mu_s, sigma_s = st["mu"], st["sigma"], st.get("mu_s"), st.get("sigma_s")
    else:
        raise NpzError(f"{path} has neither statistics (mu, sigma) nor images (arr_0)")
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
    if "logits" in feats:
        out["inception_score"] = inception_score(feats["logits"])  # ADM's parts of 5,000: one part when N < 5,000
    elif has_logits_reason:
        notes.append(f"inception_score missing: {has_logits_reason}")
    if ref.features is not None and min(n, len(ref.features)) > PR_K:
        out["precision"], out["recall"] = precision_recall(ref.features, feats["features"], PR_K)
    elif ref.features is not None:
        notes.append(f"precision/recall missing: need more than {PR_K} samples")
    out["notes"] = "; ".join(notes) or None
    return out
