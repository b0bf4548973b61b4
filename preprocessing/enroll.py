"""Enrollment ("FaceImageGenerator"): collect face images of one person into the gallery.

``enroll(name, source, gallery)`` reads frames from a camera, a video file or a
folder of images and saves up to ``count`` good faces as PNG files
``<gallery>/<name>/<name>_<NNNN>.png`` (numbering continues after the files
already there; every file is written atomically and never overwrites one).

Sources (``source`` argument):

* ``"camera"`` or ``"camera:N"`` -- live capture from ``cv2.VideoCapture(N)``
  (N defaults to 0, e.g. /dev/video0 on Linux). Look at the camera with your
  face alone in view; capture stops after ``count`` kept faces, or after
  ``max_frames`` frames if given (Ctrl-C also stops; files already saved stay).
  If the camera cannot be opened, EnrollSourceError says so. The
  opencv-python-headless build has no preview window.
* a video file path (anything OpenCV/FFmpeg can decode: .mp4, .avi, ...);
* a folder of images (.jpg/.jpeg/.png, hidden files ignored), read in name order.

``every=K`` looks at every K-th frame of a video or camera (frames in between
are only grabbed, not decoded), so the kept faces are spread over time.

A frame is kept only if it shows exactly one face of at least ``min_size`` px
(frames with several faces are rejected with reason "several faces": an
enrollment image must show the enrolled person and nobody else; this is
stricter than ``dataset.embed_gallery``, which takes the largest face), and
the face is sharp enough: ``faces.sharpness`` of the reference aligned crop
(160 px, ``faces.FACENET_PADDING``, the geometry the FaceNet embedder eats)
must be >= ``min_sharpness``.

What is saved is an ALIGNED crop, not the original frame: aligned crops are
what the embedders consume, and the originals are larger and hold background
(other people, the room) that the gallery does not need. The saved crop is
aligned with the same landmark template but with a wider margin
(``SAVE_SIZE`` = 250 px, ``SAVE_PADDING`` = 0.5) rather than the tight 160 px
embedder crop, because the gallery is re-embedded from these files by
``dataset.embed_gallery``, which must detect the face again: measured on 99
LFW faces, HOG (upsample 0 or 1) re-detects 99/99 faces in 250 px / 0.5 crops
(face box 150-186 px) but misses one in the tight 160 px / 0.3 crops, and the
embedding of a re-detected saved crop matches that of the original image
(50 lfw10 images: cosine >= 0.996 with dlib, >= 0.969 with FaceNet; nearest
other image is always the same person). The saved crop is therefore
backend-neutral: the same gallery serves "facenet" and "dlib". Each
crop is also re-detected before it is saved; a crop the detector cannot find
again is rejected ("face not re-detectable in crop").

Default ``min_sharpness`` (``DEFAULT_MIN_SHARPNESS`` = 10), measured on the
reference crop of every LFW image we have (lfw10: 100 images at 250 px;
lfw-devtrain: 2828 detected faces at 150 px plus 299 "unknown") and of copies
blurred with cv2.GaussianBlur(sigma):

==============  =========================  ==============================
images          sharp originals            blurred: fraction < 10
==============  =========================  ==============================
lfw10           min 11.7, median 60        sigma 1.5: 52%, 2: 96%, 3: 100%
lfw-devtrain    min 4.7, 1st pct 13.4      sigma 1.5: 99%, 2: 99.9%, 3: 100%
unknown         min 10.3, median 45        sigma 1.5: 99%, 2: 100%, 3: 100%
==============  =========================  ==============================

So 10 keeps all lfw10 and unknown originals and 99.6% of the low-resolution
devtrain ones, and rejects every face blurred with sigma >= 3 (many of those
are not even detected) and nearly all blurred with sigma 2. Webcams that give
soft images may need a lower value (e.g. 6).
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from .dataset import IMAGE_EXTENSIONS, REASON_NO_FACE, reason_too_small
from .errors import ImageLoadError, InvalidNameError, PreprocessingError
from .fileio import owner_only
from .video import read_frames

logger = logging.getLogger(__name__)

DEFAULT_MIN_SHARPNESS = 10.0
DEFAULT_MIN_SIZE = 40
MAX_NAME_LENGTH = 100
SAVE_SIZE = 250
SAVE_PADDING = 0.5
# Reference crop on which sharpness is measured (FaceNet's input geometry).
SHARPNESS_SIZE = 160
# Camera reads that may fail in a row before capture gives up.

REASON_SEVERAL = "several faces"
REASON_BLURRY = "too blurry"
REASON_NOT_REDETECTED = "face not re-detectable in crop"
REASON_UNREADABLE = "unreadable image"

SOURCE_FORMS = (
    '"camera" (default camera, index 0), "camera:N" (camera index N >= 0), '
    "a path to a video file, or a path to a folder of .jpg/.jpeg/.png images"
)


class EnrollSourceError(PreprocessingError):
    """The enrollment source is not one of the allowed forms, or cannot be opened."""


@dataclass
class EnrollResult:
    """What an enrollment run did."""

    name: str
    source: str
    folder: Path
    saved: list[Path] = field(default_factory=list)
    frames_read: int = 0  # frames / images taken from the source
    frames_checked: int = 0  # of those, frames looked at (every K-th)
    rejected: Counter = field(default_factory=Counter)  # reason -> number of frames

    @property
    def n_kept(self) -> int:
        return len(self.saved)

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.rejected.most_common()) or "none"
        return (
            f"{self.name}: {self.n_kept} face(s) saved to {self.folder} from {self.source} "
            f"({self.frames_read} frame(s) read, {self.frames_checked} checked; rejected: {reasons})"
        )


# --- names -------------------------------------------------------------------------
def validate_name(name: Any) -> str:
    """Return name if it is usable as a person (folder) name, else raise InvalidNameError."""
    if not isinstance(name, str):
        raise InvalidNameError(f"person name must be a string, got {type(name).__name__} {name!r}")
    if not name or not name.strip():
        raise InvalidNameError(f"person name {name!r} is empty; expected a non-empty name such as 'Ada_Lovelace'")
    if name != name.strip():
        raise InvalidNameError(f"person name {name!r} starts or ends with whitespace")
    if "/" in name or "\\" in name:
        raise InvalidNameError(f"person name {name!r} contains a path separator ('/' or '\\'), which is not allowed")
    if name in (".", ".."):
        raise InvalidNameError(f"person name {name!r} is reserved ('.' and '..' are not allowed)")
    if name.startswith("."):
        raise InvalidNameError(f"person name {name!r} starts with a dot (hidden folders are ignored by the gallery)")
    bad = [ch for ch in name if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        raise InvalidNameError(
            f"person name {name!r} contains control characters ({', '.join(repr(c) for c in bad)}), "
            "which are not allowed"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"person name {name[:20]!r}... is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed"
        )
    return name


# --- sources -----------------------------------------------------------------------
_CAMERA = re.compile(r"camera(?::(\d+))?")


@dataclass(frozen=True)
class _Source:
    kind: str  # "camera" | "video" | "folder"
    camera_index: int = 0
    path: Path | None = None


def parse_source(source: str | Path) -> _Source:
    """Classify the source argument; raises EnrollSourceError for anything else."""
    text = str(source)
    match = _CAMERA.fullmatch(text.strip())
    if match:
        return _Source("camera", camera_index=int(match.group(1) or 0))
    if text.strip().startswith("camera"):
        raise EnrollSourceError(f"bad camera source {text!r}; allowed forms: {SOURCE_FORMS}")
    path = Path(text).expanduser()
    if not text or not path.exists():
        raise EnrollSourceError(f"source {text!r} does not exist; allowed forms: {SOURCE_FORMS}")
    if path.is_dir():
        return _Source("folder", path=path)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise EnrollSourceError(
                f"source {text!r} is a single image; put the images in a folder and pass the folder. "
                f"Allowed forms: {SOURCE_FORMS}"
            )
        return _Source("video", path=path)
    raise EnrollSourceError(f"source {text!r} is neither a file nor a folder; allowed forms: {SOURCE_FORMS}")


def _folder_frames(folder: Path, result: EnrollResult) -> Iterator[tuple[str, np.ndarray]]:
    from .images import load_image_file

    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
         and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not files:
        raise EnrollSourceError(f"{folder}: folder has no .jpg/.jpeg/.png images; allowed forms: {SOURCE_FORMS}")
    for path in files:
        result.frames_read += 1
        try:
            image = load_image_file(path)
        except ImageLoadError as exc:
            logger.warning("%s", exc)
            result.frames_checked += 1
            result.rejected[REASON_UNREADABLE] += 1
            continue
        yield str(path), image


def _capture_frames(
    capture: Any, label: str, every: int, result: EnrollResult, live: bool
) -> Iterator[tuple[str, np.ndarray]]:
    for position, frame in read_frames(capture, live=live, label=label, decode=lambda i: i % every == 0):
        result.frames_read += 1
        if position % every:
            continue
        if frame is None or frame.ndim != 3 or frame.shape[2] != 3:
            result.frames_checked += 1
            result.rejected["unreadable frame"] += 1
            continue
        yield f"{label} frame {position}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def _open_capture(src: _Source) -> tuple[Any, str]:
    if src.kind == "camera":
        capture = cv2.VideoCapture(src.camera_index)
        label = f"camera {src.camera_index}"
        if not capture.isOpened():
            capture.release()
            raise EnrollSourceError(
                f"camera {src.camera_index} could not be opened (cv2.VideoCapture({src.camera_index})): "
                "check that a camera is connected, not used by another program, and that you may "
                f"access it (e.g. /dev/video{src.camera_index} on Linux); allowed forms: {SOURCE_FORMS}"
            )
        return capture, label
    assert src.path is not None
    capture = cv2.VideoCapture(str(src.path))
    if not capture.isOpened():
        capture.release()
        raise EnrollSourceError(
            f"{src.path}: cannot open as a video (OpenCV/FFmpeg could not decode it); "
            f"allowed forms: {SOURCE_FORMS}"
        )
    return capture, str(src.path)


# --- saving ------------------------------------------------------------------------
def _next_number(folder: Path, name: str) -> int:
    pattern = re.compile(re.escape(name) + r"_(\d+)\.[A-Za-z]+")
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return max(numbers, default=0) + 1


def _save_png(folder: Path, name: str, number: int, crop: np.ndarray) -> Path:
    """Write crop as <folder>/<name>_<NNNN>.png atomically, never overwriting; returns the path."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {name} crop {number}")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".png.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(encoded.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        while True:
            target = folder / f"{name}_{number:04d}.png"
            try:
                os.link(tmp, target)  # atomic and fails if target exists
                break
            except FileExistsError:
                number += 1
            except OSError:  # file system without hard links
                if target.exists():
                    number += 1
                    continue
                os.replace(tmp, target)
                break
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return target


# --- enrollment --------------------------------------------------------------------
def enroll(
    name: str,
    source: str | Path,
    gallery: str | Path,
    count: int = 10,
    every: int = 1,
    min_sharpness: float = DEFAULT_MIN_SHARPNESS,
    detector: str = "hog",
    backend: str = "facenet",
    *,
    upsample: int = 1,
    min_size: int = DEFAULT_MIN_SIZE,
    max_frames: int | None = None,
) -> EnrollResult:
    """Save up to `count` aligned face crops of `name` from `source` into `<gallery>/<name>/`.

    source: "camera", "camera:N", a video file or a folder of images (see the module docstring).
    every: look at every K-th frame of a video / camera.
    min_sharpness: variance-of-Laplacian threshold on the 160 px reference crop.
    detector / upsample / min_size: face detection settings (faces.detect_faces).
    backend: the embedder the gallery is meant for ("facenet" or "dlib"); it is
        checked for validity, but the saved crop is backend-neutral (see module docstring).
    max_frames: stop after this many frames read from the source (None: no limit).
    Raises InvalidNameError, EnrollSourceError or ValueError for bad arguments.
    """
    from .faces import FACENET_PADDING, align_face, detect_faces, frame_detector, sharpness

    validate_name(name)
    if backend not in ("facenet", "dlib"):
        raise ValueError(f"unknown backend {backend!r}; allowed values: facenet, dlib")
    for label, value in (("count", count), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames!r}")
    src = parse_source(source)

    folder = Path(gallery) / name
    result = EnrollResult(name=name, source=str(source), folder=folder)
    capture = None
    if src.kind == "folder":
        assert src.path is not None
        frames = _folder_frames(src.path, result)
    else:
        capture, label = _open_capture(src)
        frames = _capture_frames(capture, label, every, result, live=src.kind == "camera")

    with owner_only():  # face crops: a folder made here is owner-only (an existing one keeps its mode)
        folder.mkdir(parents=True, exist_ok=True)
    number = _next_number(folder, name)
    too_small = reason_too_small(min_size)
    logger.info("enrolling %r from %s into %s (want %d faces)", name, source, folder, count)
    try:
        for where, frame in frames:
            result.frames_checked += 1
            faces = detect_faces(frame, model=frame_detector(detector), upsample=upsample, min_size=0)
            usable = [face for face in faces if face.size >= min_size]
            reason = None
            if not faces:
                reason = REASON_NO_FACE
            elif not usable:
                reason = too_small
            elif len(usable) > 1:
                reason = REASON_SEVERAL
            else:
                landmarks = usable[0].landmarks
                score = sharpness(align_face(frame, landmarks, SHARPNESS_SIZE, FACENET_PADDING))
                if score < min_sharpness:
                    reason = REASON_BLURRY
                    logger.debug("%s: sharpness %.1f < %.1f", where, score, min_sharpness)
                else:
                    crop = align_face(frame, landmarks, SAVE_SIZE, SAVE_PADDING)
                    if not detect_faces(crop, model=detector, upsample=upsample, min_size=min_size):
                        reason = REASON_NOT_REDETECTED
                    else:
                        path = _save_png(folder, name, number, crop)
                        number = int(path.stem.rsplit("_", 1)[1]) + 1
                        result.saved.append(path)
                        logger.info("%s: saved %s (sharpness %.1f)", where, path.name, score)
            if reason is not None:
                result.rejected[reason] += 1
                logger.debug("%s: rejected (%s)", where, reason)
            if result.n_kept >= count:
                break
            if max_frames is not None and result.frames_read >= max_frames:
                break
    finally:
        if capture is not None:
            capture.release()
    if result.n_kept < count:
        logger.warning(
            "%s: only %d of %d wanted faces were saved", name, result.n_kept, count
        )
    logger.info("%s", result.summary())
    return result
