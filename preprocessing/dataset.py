"""Gallery scanning and incremental, cached gallery embedding (client side).

A gallery is a folder ``<root>/<person>/<image>``: the person folder's name is
the label, images are ``.jpg``, ``.jpeg`` or ``.png`` (any case). Hidden files
and folders (leading dot) are ignored; files lying in ``<root>`` itself are
ignored with a warning.

``embed_gallery`` turns a gallery into a :class:`GalleryEmbeddings` (one row per
usable image). Per-image policy:

* no face at all -> skipped, reason ``"no face found"``;
* only faces smaller than ``min_size`` -> skipped, ``"face too small (<N px)"``;
* several faces -> the largest is used and a warning names the file;
* unreadable / corrupt / not an image -> skipped with the ImageLoadError message.

Results are cached per image in ``cache_dir``: the key is the sha256 of the
image bytes plus the embedder's ``model_id`` and the detector settings, so a
second run only embeds new or changed images, and switching backend or
detector never reuses a stale vector. Negative results (no face, face too
small) are cached too. Load errors are not cached (they are cheap to find
again and may depend on the installed decoders).

Everything here is plaintext and holds names: it stays on the client.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .fileio import atomic_write_bytes, private_dir

from .errors import ImageLoadError, PreprocessingError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
DEFAULT_MIN_SIZE = 40
DEFAULT_BATCH_SIZE = 32
# Bump when the meaning of a cache shard changes (policy, layout, fields).
CACHE_VERSION = "gallery-cache-v1"
SAVE_FORMAT = "gallery-embeddings-v1"

REASON_NO_FACE = "no face found"


class GalleryError(PreprocessingError):
    """The gallery folder is missing or malformed, or it yields no usable image."""


def reason_too_small(min_size: int) -> str:
    return f"face too small (<{min_size} px)"


# --- files ---------------------------------------------------------------------
def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def is_image_file(path: str | Path) -> bool:
    """True for a visible file whose name ends in .jpg, .jpeg or .png (any case)."""
    path = Path(path)
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- scanning --------------------------------------------------------------------
def scan_gallery(root: str | Path) -> list[tuple[str, Path]]:
    """(person, image path) for every image of the gallery, sorted by person then file name.

    Raises GalleryError if root does not exist, is not a folder or has no person folders.
    """
    root = Path(root)
    layout = "expected a folder laid out as <root>/<person>/<image>.jpg|.jpeg|.png"
    if not root.exists():
        raise GalleryError(f"{root}: gallery folder does not exist ({layout})")
    if not root.is_dir():
        raise GalleryError(f"{root}: gallery is not a folder ({layout})")

    persons: list[Path] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            persons.append(entry)
        else:
            logger.warning("%s: file in the gallery root is ignored (%s)", entry, layout)
    if not persons:
        raise GalleryError(f"{root}: gallery has no person folders ({layout})")

    items: list[tuple[str, Path]] = []
    for person in persons:
        found = 0
        for entry in sorted(person.iterdir(), key=lambda p: p.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                logger.warning("%s: sub-folder inside a person folder is ignored", entry)
                continue
            if entry.suffix.lower() not in IMAGE_EXTENSIONS:
                logger.warning(
                    "%s: not an image file name (expected %s), ignored",
                    entry,
                    ", ".join(sorted(IMAGE_EXTENSIONS)),
                )
                continue
            items.append((person.name, entry))
            found += 1
        if not found:
            logger.warning("%s: person folder has no images, person %r is left out", person, person.name)
    return items


# --- result --------------------------------------------------------------------
@dataclass
class GalleryEmbeddings:
    """Embeddings of a gallery, one row per usable image (client-side plaintext, holds names)."""

    embeddings: np.ndarray  # (n, dim) float32
    labels: list[str]  # person name per row
    paths: list[Path]  # image file per row
    model_id: str
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    n_cached: int = 0
    n_embedded: int = 0
    digests: list[str] = field(default_factory=list)  # sha256 of each row's image file
    detector: str = ""
    root: Path | None = None

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2:
            raise ValueError(f"embeddings must be an (n, dim) array, got shape {self.embeddings.shape}")
        n = len(self.embeddings)
        self.labels = [str(label) for label in self.labels]
        self.paths = [Path(p) for p in self.paths]
        self.skipped = [(Path(p), str(reason)) for p, reason in self.skipped]
        if len(self.labels) != n or len(self.paths) != n:
            raise ValueError(
                f"embeddings has {n} rows but there are {len(self.labels)} labels and {len(self.paths)} paths"
            )
        if self.digests and len(self.digests) != n:
            raise ValueError(f"embeddings has {n} rows but there are {len(self.digests)} digests")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def classes(self) -> list[str]:
        """Sorted unique person names; label_indices() indexes into this list."""
        return sorted(set(self.labels))

    def label_indices(self) -> np.ndarray:
        """(n,) int64 index of each row's person in self.classes."""
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[label] for label in self.labels], dtype=np.int64)

    def keys(self) -> list[str]:
        """'<person>/<file name>' per row: identifies an image independently of where the gallery lives."""
        return [f"{label}/{path.name}" for label, path in zip(self.labels, self.paths)]

    def skipped_summary(self, limit: int = 10) -> str:
        return summarize_skipped(self.skipped, limit)

    def diff_against(self, previous: "GalleryEmbeddings | None") -> "GalleryDiff":
        """What changed from previous (e.g. the last training run) to self."""
        return diff_galleries(previous, self)

    # -- persistence (client only: names and plaintext embeddings) --
    def save(self, path: str | Path) -> Path:
        """Write an .npz atomically. Client-side only: it holds names and plaintext embeddings."""
        meta = {
            "format": SAVE_FORMAT,
            "model_id": self.model_id,
            "detector": self.detector,
            "root": str(self.root) if self.root is not None else None,
            "n_cached": int(self.n_cached),
            "n_embedded": int(self.n_embedded),
            "skipped": [[str(p), reason] for p, reason in self.skipped],
        }
        data = _npz_bytes(
            embeddings=self.embeddings.astype(np.float32),
            labels=np.array(self.labels, dtype=np.str_).reshape(-1),
            paths=np.array([str(p) for p in self.paths], dtype=np.str_).reshape(-1),
            digests=np.array(self.digests, dtype=np.str_).reshape(-1),
            meta=np.array(json.dumps(meta)),
        )
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "GalleryEmbeddings":
        path = Path(path)
        if not path.is_file():
            raise GalleryError(f"{path}: no such gallery embeddings file (expected an .npz written by save())")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except Exception as exc:  # zipfile / numpy raise many types for corrupt files
            raise GalleryError(f"{path}: not a readable gallery embeddings file ({exc})") from exc
        missing = {"embeddings", "labels", "paths", "digests", "meta"} - set(arrays)
        if missing:
            raise GalleryError(f"{path}: not a gallery embeddings file (missing {', '.join(sorted(missing))})")
        try:
            meta = json.loads(str(arrays["meta"]))
        except ValueError as exc:
            raise GalleryError(f"{path}: corrupt metadata ({exc})") from exc
        if meta.get("format") != SAVE_FORMAT:
            raise GalleryError(f"{path}: format {meta.get('format')!r}, expected {SAVE_FORMAT!r}")
        try:
            return cls(
                embeddings=arrays["embeddings"],
                labels=arrays["labels"].tolist(),
                paths=arrays["paths"].tolist(),
                digests=arrays["digests"].tolist(),
                model_id=meta["model_id"],
                detector=meta.get("detector", ""),
                root=Path(meta["root"]) if meta.get("root") else None,
                skipped=[(Path(p), r) for p, r in meta.get("skipped", [])],
                n_cached=meta.get("n_cached", 0),
                n_embedded=meta.get("n_embedded", 0),
            )
        except (KeyError, ValueError) as exc:
            raise GalleryError(f"{path}: inconsistent gallery embeddings file ({exc})") from exc


def summarize_skipped(skipped: Sequence[tuple[Path, str]], limit: int = 10) -> str:
    """Human-readable summary: counts per reason, then the first `limit` files with their reason."""
    if not skipped:
        return "no files skipped"
    counts = Counter(_reason_kind(reason) for _, reason in skipped)
    lines = [f"{len(skipped)} file(s) skipped: " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common())]
    for path, reason in list(skipped)[:limit]:
        # ImageLoadError messages already start with the path
        lines.append(f"  {reason}" if reason.startswith(f"{path}: ") else f"  {path}: {reason}")
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    if reason == REASON_NO_FACE or reason.startswith("face too small"):
        return reason
    return "unreadable"


# --- diff ------------------------------------------------------------------------
@dataclass
class GalleryDiff:
    """Changes between two gallery embeddings (previous -> current)."""

    persons_added: list[str] = field(default_factory=list)
    persons_removed: list[str] = field(default_factory=list)
    images_added: list[str] = field(default_factory=list)  # '<person>/<file>'
    images_removed: list[str] = field(default_factory=list)
    images_changed: list[str] = field(default_factory=list)  # same name, different bytes
    model_changed: bool = False
    first_run: bool = False

    @property
    def changed(self) -> bool:
        return bool(
            self.first_run
            or self.model_changed
            or self.persons_added
            or self.persons_removed
            or self.images_added
            or self.images_removed
            or self.images_changed
        )

    def __bool__(self) -> bool:
        return self.changed

    def __str__(self) -> str:
        return self.summary()

    def summary(self, limit: int = 10) -> str:
        if self.first_run:
            return "first run: no previous gallery embeddings"
        if not self.changed:
            return "no changes since the previous gallery embeddings"
        lines = []
        if self.model_changed:
            lines.append("embedding model or detector changed: all images were re-embedded")
        for title, items in (
            ("persons added", self.persons_added),
            ("persons removed", self.persons_removed),
            ("images added", self.images_added),
            ("images removed", self.images_removed),
            ("images changed", self.images_changed),
        ):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")
                lines.append(f"{title} ({len(items)}): {shown}")
        return "\n".join(lines)


def diff_galleries(previous: GalleryEmbeddings | None, current: GalleryEmbeddings) -> GalleryDiff:
    """Persons and images added / removed / changed from previous to current (usable images only)."""
    if previous is None:
        return GalleryDiff(
            persons_added=current.classes, images_added=sorted(current.keys()), first_run=True
        )
    old_persons, new_persons = set(previous.labels), set(current.labels)
    old = _digest_map(previous)
    new = _digest_map(current)
    changed = sorted(k for k in old.keys() & new.keys() if old[k] and new[k] and old[k] != new[k])
    return GalleryDiff(
        persons_added=sorted(new_persons - old_persons),
        persons_removed=sorted(old_persons - new_persons),
        images_added=sorted(new.keys() - old.keys()),
        images_removed=sorted(old.keys() - new.keys()),
        images_changed=changed,
        model_changed=(previous.model_id, previous.detector) != (current.model_id, current.detector),
    )


def _digest_map(gallery: GalleryEmbeddings) -> dict[str, str]:
    digests = gallery.digests or [""] * len(gallery)
    return dict(zip(gallery.keys(), digests))


# --- cache -----------------------------------------------------------------------
def _settings_key(model_id: str, detector: str, upsample: int, min_size: int) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION,
        "model_id": model_id,
        "detector": detector,
        "upsample": int(upsample),
        "min_size": int(min_size),
    }


class _Cache:
    """One .npz shard per image digest under <cache_dir>/gallery/<settings hash>/<aa>/<digest>.npz."""

    def __init__(self, cache_dir: Path | None, settings: dict[str, Any]):
        self.folder: Path | None = None
        if cache_dir is None:
            return
        blob = json.dumps(settings, sort_keys=True).encode()
        self.folder = Path(cache_dir) / "gallery" / hashlib.sha256(blob).hexdigest()[:16]
        private_dir(self.folder)  # plaintext embeddings: owner-only
        info = self.folder / "settings.json"
        if not info.exists():
            atomic_write_bytes(info, json.dumps(settings, indent=2, sort_keys=True).encode())

    def _path(self, digest: str) -> Path:
        assert self.folder is not None
        return self.folder / digest[:2] / f"{digest}.npz"

    def get(self, digest: str, dim: int) -> dict[str, Any] | None:
        if self.folder is None:
            return None
        path = self._path(digest)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                status = str(npz["status"])
                entry = {
                    "status": status,
                    "embedding": np.asarray(npz["embedding"], dtype=np.float32),
                    "n_faces": int(npz["n_faces"]),
                }
            if status == "ok" and entry["embedding"].shape != (dim,):
                raise ValueError(f"embedding shape {entry['embedding'].shape}, expected ({dim},)")
            if status not in ("ok", "no_face", "too_small"):
                raise ValueError(f"unknown status {status!r}")
            return entry
        except Exception as exc:  # a damaged shard is only a cache miss
            logger.warning("%s: damaged cache entry ignored, image will be re-embedded (%s)", path, exc)
            return None

    def put(self, digest: str, status: str, embedding: np.ndarray | None, n_faces: int) -> None:
        if self.folder is None:
            return
        vector = np.zeros((0,), np.float32) if embedding is None else np.asarray(embedding, np.float32)
        data = _npz_bytes(status=np.array(status), embedding=vector, n_faces=np.array(n_faces))
        try:
            private_dir(self._path(digest).parent)  # the <aa>/ shard folder: plaintext embeddings, owner-only
            atomic_write_bytes(self._path(digest), data)
        except OSError as exc:
            logger.warning("%s: cannot write cache entry (%s)", self._path(digest), exc)


# --- embedding -------------------------------------------------------------------
def embed_gallery(
    root: str | Path,
    backend: str = "facenet",
    detector: str = "hog",
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    upsample: int = 1,
    min_size: int = DEFAULT_MIN_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    embedder: Any = None,
) -> GalleryEmbeddings:
    """Embed every usable image of the gallery at root, reusing cached results.

    backend: "facenet" or "dlib" (ignored if an `embedder` object is given).
    detector / upsample / min_size: face detection settings (see faces.detect_faces).
    cache_dir: folder for the per-image cache; None disables caching.
    Raises GalleryError if the gallery is malformed or no image is usable.
    """
    from .faces import detect_faces

    if embedder is None:
        from .embedders import get_embedder

        embedder = get_embedder(backend)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = Path(root)
    items = scan_gallery(root)
    cache = _Cache(Path(cache_dir) if cache_dir is not None else None,
                   _settings_key(embedder.model_id, detector, upsample, min_size))
    too_small = reason_too_small(min_size)

    rows: list[np.ndarray | None] = [None] * len(items)
    digests: list[str | None] = [None] * len(items)
    reasons: dict[int, str] = {}
    n_cached = 0
    n_embedded = 0
    pending: list[tuple[int, np.ndarray, int]] = []  # (item index, crop, n_faces)
    # The embedder runs on a worker thread while this one goes on loading and detecting: TensorFlow
    # and dlib's ResNet release the GIL while they compute, so detection (one core) overlaps the
    # network (benchmarks/embed_speed.py). At most one batch waits behind the running one.
    in_flight: list[tuple[Future[np.ndarray], list[tuple[int, np.ndarray, int]]]] = []

    def collect(wait_all: bool) -> None:
        nonlocal n_embedded
        while in_flight and (wait_all or len(in_flight) > 1):
            future, batch = in_flight.pop(0)
            vectors = np.asarray(future.result(), dtype=np.float32)
            if vectors.shape != (len(batch), embedder.dim):
                raise RuntimeError(
                    f"embedder {embedder.name!r} returned shape {vectors.shape} for {len(batch)} crops, "
                    f"expected ({len(batch)}, {embedder.dim})"
                )
            for (index, _, n_faces), vector in zip(batch, vectors):
                rows[index] = vector
                cache.put(digests[index], "ok", vector, n_faces)  # type: ignore[arg-type]
                n_embedded += 1

    def flush() -> None:
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        in_flight.append((worker.submit(embedder.embed_crops, [crop for _, crop, _ in batch]), batch))
        collect(wait_all=False)

    bar = _progress_bar(len(items), progress, f"embedding gallery ({embedder.name})")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
    try:
        for index, (_, path) in enumerate(items):
            bar.update(1)
            try:
                digest = file_sha256(path)
            except OSError as exc:
                reasons[index] = f"{path}: cannot read file ({exc.strerror or exc})"
                continue
            digests[index] = digest

            entry = cache.get(digest, embedder.dim)
            if entry is not None:
                n_cached += 1
                _warn_several(path, entry["n_faces"], entry["status"])
                if entry["status"] == "ok":
                    rows[index] = entry["embedding"]
                else:
                    reasons[index] = REASON_NO_FACE if entry["status"] == "no_face" else too_small
                continue

            try:
                from .images import load_image_file

                image = load_image_file(path)
            except ImageLoadError as exc:
                reasons[index] = str(exc)
                continue
            faces = detect_faces(image, model=detector, upsample=upsample, min_size=0)
            usable = [face for face in faces if face.size >= min_size]
            if not faces:
                reasons[index] = REASON_NO_FACE
                cache.put(digest, "no_face", None, 0)
                continue
            if not usable:
                reasons[index] = too_small
                cache.put(digest, "too_small", None, len(faces))
                continue
            _warn_several(path, len(usable), "ok")
            crop = embedder.crops(image, usable[:1])[0]
            pending.append((index, crop, len(usable)))
            if len(pending) >= batch_size:
                flush()
        flush()
        collect(wait_all=True)
    finally:
        worker.shutdown(wait=True, cancel_futures=True)
        bar.close()

    skipped = [(items[i][1], reasons[i]) for i in sorted(reasons)]
    for path, reason in skipped:
        logger.info("skipped %s: %s", path, reason)
    keep = [i for i, row in enumerate(rows) if row is not None]
    if not keep:
        raise GalleryError(
            f"{root}: no usable face image in the gallery ({len(items)} image file(s) scanned)\n"
            + summarize_skipped(skipped)
        )
    persons_all = {label for label, _ in items}
    persons_kept = {items[i][0] for i in keep}
    for person in sorted(persons_all - persons_kept):
        logger.warning("person %r has no usable image and is left out of the gallery", person)
    if skipped:
        logger.warning("%s", summarize_skipped(skipped))
    logger.info(
        "gallery %s: %d usable image(s) of %d person(s); %d from cache, %d embedded, %d skipped",
        root, len(keep), len(persons_kept), n_cached, n_embedded, len(skipped),
    )
    return GalleryEmbeddings(
        embeddings=np.stack([rows[i] for i in keep]).astype(np.float32),  # type: ignore[misc]
        labels=[items[i][0] for i in keep],
        paths=[items[i][1] for i in keep],
        digests=[digests[i] for i in keep],  # type: ignore[misc]
        model_id=embedder.model_id,
        detector=f"{detector}/upsample={upsample}/min_size={min_size}",
        root=root,
        skipped=skipped,
        n_cached=n_cached,
        n_embedded=n_embedded,
    )


def _warn_several(path: Path, n_faces: int, status: str) -> None:
    if status == "ok" and n_faces > 1:
        logger.warning("%s: %d faces found, using the largest", path, n_faces)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img")
