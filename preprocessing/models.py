"""Locating model files and verifying their sha256 checksums.

The registry is models/models.json in the repository. Every file lives in models_dir() (the
repository's models/ folder, or $FACE_MODELS_DIR), where ``invoke fetch-models`` puts it; an entry
with a "package" key is also found in that installed package's models/ folder. Each entry names its
licence and whether it allows commercial use; a licence-clean setup (``invoke setup --licence-clean``,
which leaves the file models/licence-clean, or face.licence_clean in invoke.yaml) refuses every file
that does not.

models/thresholds.json holds the open-set thresholds calibrated per embedder on public faces
(benchmarks/calibrate_threshold.py), read by open_set_threshold(): with several data owners nobody
holds the gallery in the clear to tune the threshold on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ModelFileError

logger = logging.getLogger(__name__)

REGISTRY_PATH = Path(__file__).resolve().parents[1] / "models" / "models.json"
ENV_MODELS_DIR = "FACE_MODELS_DIR"

LICENCE_CLEAN_MARK = "licence-clean"

_verified: dict[Path, tuple[int, int, str]] = {}
_verified_lock = threading.Lock()
_licence_clean: bool | None = None  # None: the mark file decides


def models_dir() -> Path:
    """Folder holding the project's own model files ($FACE_MODELS_DIR or <repo>/models)."""
    override = os.environ.get(ENV_MODELS_DIR)
    if override:
        return Path(override).expanduser().resolve()
    return REGISTRY_PATH.parent


@lru_cache(maxsize=1)
def _registry() -> dict[str, dict[str, Any]]:
    try:
        return json.loads(REGISTRY_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{REGISTRY_PATH}: cannot read model registry ({exc})") from exc


def set_licence_clean(flag: bool | None) -> None:
    """Refuse (True) or allow (False) model files whose licence forbids commercial use; None: the mark file
    models/licence-clean decides (``invoke setup --licence-clean`` writes it)."""
    global _licence_clean
    _licence_clean = None if flag is None else bool(flag)


def licence_clean() -> bool:
    """Whether this process refuses model files whose licence forbids commercial use."""
    if _licence_clean is not None:
        return _licence_clean
    return (models_dir() / LICENCE_CLEAN_MARK).exists()


def commercial_keys() -> list[str]:
    """Registry keys whose licence allows commercial use (what a licence-clean setup may hold), sorted."""
    return sorted(k for k, v in _registry().items() if v.get("commercial_use") is True)


def model_keys() -> list[str]:
    """Keys known to the registry, sorted."""
    return sorted(_registry())


def model_info(key: str) -> dict[str, Any]:
    """The registry entry for key (file, sha256, source, get, ...)."""
    registry = _registry()
    if key not in registry:
        raise ValueError(f"unknown model key {key!r}; allowed keys: {', '.join(sorted(registry))}")
    return dict(registry[key])


def _package_models_dir(package: str, get: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"model file not in {models_dir()} and package {package!r} is not installed; to get it: "
                             f"{get}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_path(key: str) -> Path:
    """Path of the model file for key, after checking its sha256.

    Verification is cached in-process per (path, mtime, size).
    Raises ModelFileError if the file is missing or its checksum differs.
    """
    info = model_info(key)
    get = info.get("get", "see models/models.json")
    expected = info["sha256"].lower()
    if licence_clean() and info.get("commercial_use") is not True:
        raise ModelFileError(
            f"model {key!r} ({info['file']}) is refused in this licence-clean setup: {info.get('licence', 'no licence recorded')}"
            f"; the licence-clean stack uses only {', '.join(commercial_keys())} (models/models.json)")
    path = models_dir() / info["file"]
    if "package" in info and not path.exists():
        path = _package_models_dir(info["package"], get) / info["file"]

    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ModelFileError(
            f"{path}: model file {key!r} not found (expected sha256 {expected}); to get it: {get}"
        ) from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read model file {key!r} ({exc}); to get it: {get}") from exc
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file (model {key!r}, expected sha256 {expected}); to get it: {get}")

    stamp = (stat.st_mtime_ns, stat.st_size, expected)
    with _verified_lock:
        if _verified.get(path) == stamp:
            return path
    try:
        actual = _sha256(path)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read model file {key!r} ({exc}); to get it: {get}") from exc
    if actual != expected:
        raise ModelFileError(
            f"{path}: wrong sha256 for model {key!r}: got {actual}, expected {expected}; "
            f"the file is corrupt or a different version; to get it: {get}"
        )
    logger.debug("verified %s (%s)", path, expected[:12])
    with _verified_lock:
        _verified[path] = stamp
    return path


# --- open-set thresholds ---------------------------------------------------------------------------
THRESHOLDS_PATH = REGISTRY_PATH.parent / "thresholds.json"
#: the score the thresholds are on (orchestration.shared.reference.SCORE): the top logit z_max
OPEN_SET_SCORE = "zmax"


@lru_cache(maxsize=1)
def _thresholds() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(THRESHOLDS_PATH.read_text(encoding="utf-8"))
        return dict(data["embedders"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{THRESHOLDS_PATH}: cannot read the open-set thresholds ({exc!r}); "
                             "to make it: python benchmarks/calibrate_threshold.py --write") from exc


def calibrated_embedders() -> list[str]:
    """Embedders with an open-set threshold in models/thresholds.json, sorted."""
    return sorted(_thresholds())


def open_set_calibration(embedder: str) -> dict[str, Any]:
    """The whole models/thresholds.json entry of ``embedder`` (thresholds, train settings, source, rates)."""
    table = _thresholds()
    if embedder not in table:
        raise ValueError(f"no calibrated open-set threshold for embedder {embedder!r}; calibrated embedders: "
                         f"{', '.join(sorted(table)) or 'none'} (see {THRESHOLDS_PATH.name}; to add one: "
                         "python benchmarks/calibrate_threshold.py --backend <embedder> --write)")
    return dict(table[embedder])


def open_set_threshold(embedder: str, classes: int, *, alpha: float | None = None) -> float:
    """Logit threshold on the top logit z_max for a gallery of ``classes`` persons, calibrated on public faces (LFW).

    Accept a query iff its top logit z_max >= the threshold (compared on shares by face_predict's names mode),
    z_max of the model trained with the calibration's train settings. The value is the entry of the smallest
    calibrated gallery size >= ``classes`` (the largest size's above it): strangers' top logit rises as the
    gallery grows, so this keeps FPIR at about the calibration's bound (1 %).
    ``alpha``: the warm-start scale the model is trained with; a ValueError if it is not the calibrated one
    (z_max = alpha/2 (1 - d^2) scales with it). A ValueError too for an entry on another score (an old table
    on the confidence 1/S).
    """
    entry = open_set_calibration(embedder)
    score = entry.get("score", "confidence")
    if score != OPEN_SET_SCORE:
        raise ValueError(f"{THRESHOLDS_PATH}: the open-set thresholds of {embedder!r} are on the score {score!r}; the "
                         f"servers compare the top logit, allowed: {OPEN_SET_SCORE!r}: recalibrate "
                         f"(python benchmarks/calibrate_threshold.py --backend {embedder} --write)")
    if alpha is not None and float(alpha) != float(entry["alpha"]):
        raise ValueError(f"the open-set threshold of {embedder!r} is calibrated for alpha {entry['alpha']:g}, "
                         f"the model is trained with alpha {float(alpha):g}: recalibrate "
                         f"(python benchmarks/calibrate_threshold.py --backend {embedder} --write)")
    if int(classes) < 1:
        raise ValueError(f"classes must be >= 1 (persons in the gallery), got {classes}")
    by_size = {int(n): float(t) for n, t in entry["threshold_by_gallery_size"].items()}
    above = [n for n in sorted(by_size) if n >= int(classes)]
    return by_size[above[0] if above else max(by_size)]
