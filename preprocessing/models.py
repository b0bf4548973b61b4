"""Locating model files and verifying their sha256 checksums.

The registry is models/models.json in the repository. Entries with a
"package" key live in that installed package's models/ folder; the others
live in models_dir() (the repository's models/ folder, or $FACE_MODELS_DIR).
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

_verified: dict[Path, tuple[int, int, str]] = {}
_verified_lock = threading.Lock()


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
        raise ModelFileError(f"package {package!r} is not installed; to get it: {get}")
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
    if "package" in info:
        folder = _package_models_dir(info["package"], get)
    else:
        folder = models_dir()
    path = folder / info["file"]

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
