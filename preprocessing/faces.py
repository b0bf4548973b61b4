"""Face detection, 68-point landmarks and landmark-based alignment (dlib + OpenCV).

Locations are (top, right, bottom, left) pixel tuples like face_recognition;
landmarks are (68, 2) float arrays of (x, y) in iBUG 300-W order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import cv2
import numpy as np

from .models import model_path

logger = logging.getLogger(__name__)

Location = tuple[int, int, int, int]

DETECTOR_MODELS = ("hog", "cnn")
DEFAULT_MIN_SIZE = 40

# --- alignment template -------------------------------------------------------
# Points of dlib's mean face shape (dlib/image_transforms/interpolation.h,
# get_face_chip_details), in a unit square spanning the eyebrows (x) and the
# brows-to-lower-lip range (y). Landmark indices are iBUG 300-W (0-based).
TEMPLATE_VERSION = "v1"
_TEMPLATE_UNIT = np.array(
    [
        [0.121737, 0.216423],  # 36 outer corner of the eye on the image's left
        [0.858516, 0.216423],  # 45 outer corner of the eye on the image's right
        [0.225492, 0.215990],  # mean of 36-41: centre of the image-left eye
        [0.754761, 0.215990],  # mean of 42-47: centre of the image-right eye
        [0.490127, 0.515625],  # 30 nose tip
        [0.254149, 0.780233],  # 48 mouth corner, image left
        [0.726104, 0.780233],  # 54 mouth corner, image right
    ],
    dtype=np.float64,
)
# Default padding of align_face, as a fraction of the unit square on each side
# (same meaning as dlib.get_face_chip's padding). Chosen for FaceNet, which was
# trained on MTCNN boxes with a margin: with 0.3 the 1.6-unit crop covers about
# what an MTCNN box (~1.2 units, forehead to chin) plus ~15% margin per side
# covers. Measured LOO-1NN on every 3rd person of lfw-devtrain/people (960
# faces): padding 0.1 -> 0.991, 0.2 -> 0.993, 0.25 -> 0.993, 0.3 -> 0.995,
# 0.35 -> 0.995, 0.4 -> 0.995, 0.5 -> 0.993; shifting the template by
# +-0.08 vertically changed nothing.
FACENET_PADDING = 0.3


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One detected face: its box and its 68 landmarks."""

    location: Location  # (top, right, bottom, left), clipped to the image
    landmarks: np.ndarray  # (68, 2) float64 (x, y)

    @property
    def area(self) -> int:
        top, right, bottom, left = self.location
        return max(0, bottom - top) * max(0, right - left)

    @property
    def size(self) -> int:
        """Shorter side of the box in pixels."""
        top, right, bottom, left = self.location
        return max(0, min(bottom - top, right - left))


# --- dlib models (private, cached) ---------------------------------------------
@lru_cache(maxsize=None)
def _hog_detector() -> Any:
    import dlib

    return dlib.get_frontal_face_detector()


@lru_cache(maxsize=None)
def _cnn_detector() -> Any:
    import dlib

    return dlib.cnn_face_detection_model_v1(str(model_path("mmod_detector")))


@lru_cache(maxsize=None)
def _shape_predictor() -> Any:
    import dlib

    return dlib.shape_predictor(str(model_path("shape_predictor_68")))


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _raw_rects(image: np.ndarray, model: str, upsample: int) -> list[Any]:
    """dlib rectangles (unclipped) for the faces in image."""
    if model not in DETECTOR_MODELS:
        raise ValueError(f"unknown detector model {model!r}; allowed values: {', '.join(DETECTOR_MODELS)}")
    if int(upsample) != upsample or upsample < 0:
        raise ValueError(f"upsample must be an integer >= 0, got {upsample!r}")
    if model == "hog":
        return list(_hog_detector()(image, int(upsample)))
    return [d.rect for d in _cnn_detector()(image, int(upsample))]


def _to_location(rect: Any, height: int, width: int) -> Location:
    return (
        max(int(rect.top()), 0),
        min(int(rect.right()), width),
        min(int(rect.bottom()), height),
        max(int(rect.left()), 0),
    )


def _sorted_faces(image: np.ndarray, model: str, upsample: int) -> list[tuple[Location, Any]]:
    height, width = image.shape[:2]
    found = []
    for rect in _raw_rects(image, model, upsample):
        loc = _to_location(rect, height, width)
        top, right, bottom, left = loc
        if bottom > top and right > left:
            found.append((loc, rect))
    found.sort(key=lambda item: (item[0][2] - item[0][0]) * (item[0][1] - item[0][3]), reverse=True)
    return found


def face_locations(image: np.ndarray, model: str = "hog", upsample: int = 1) -> list[Location]:
    """Boxes (top, right, bottom, left) of the faces in an RGB image, largest first.

    model: "hog" (dlib frontal face detector) or "cnn" (dlib MMOD CNN detector).
    upsample: how many times to double the image before detecting (finds smaller faces).
    """
    image = _check_image(image)
    return [loc for loc, _ in _sorted_faces(image, model, upsample)]


def _landmarks_for_rect(image: np.ndarray, rect: Any) -> np.ndarray:
    shape = _shape_predictor()(image, rect)
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def face_landmarks(image: np.ndarray, locations: Sequence[Location]) -> list[np.ndarray]:
    """68-point landmarks, one (68, 2) float array of (x, y) per location."""
    import dlib

    image = _check_image(image)
    result = []
    for loc in locations:
        top, right, bottom, left = (int(v) for v in loc)
        result.append(_landmarks_for_rect(image, dlib.rectangle(left, top, right, bottom)))
    return result


def detect_faces(
    image: np.ndarray, model: str = "hog", upsample: int = 1, min_size: int = DEFAULT_MIN_SIZE
) -> list[DetectedFace]:
    """Faces with landmarks, largest first; faces whose box is smaller than min_size px are dropped.

    Landmarks are predicted from the detector's unclipped box, so faces at the
    image border keep their true shape.
    """
    image = _check_image(image)
    faces = []
    for loc, rect in _sorted_faces(image, model, upsample):
        top, right, bottom, left = loc
        if min(bottom - top, right - left) < min_size:
            logger.debug("dropping face %s: smaller than min_size=%d", loc, min_size)
            continue
        faces.append(DetectedFace(location=loc, landmarks=_landmarks_for_rect(image, rect)))
    return faces


# --- alignment -----------------------------------------------------------------
def _landmark_points(landmarks: np.ndarray) -> np.ndarray:
    """The 7 template points taken from a (68, 2) landmark array."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must be a (68, 2) array of (x, y), got shape {lm.shape}")
    return np.stack(
        [
            lm[36],
            lm[45],
            lm[36:42].mean(axis=0),
            lm[42:48].mean(axis=0),
            lm[30],
            lm[48],
            lm[54],
        ]
    )


def template_points(size: int = 160, padding: float = FACENET_PADDING) -> np.ndarray:
    """Where align_face puts the 7 template points in a size x size crop, (7, 2) (x, y).

    Order: outer eye corners (36, 45), eye centres (36-41, 42-47), nose tip (30),
    mouth corners (48, 54). A unit-square point p lands at
    size * (p + padding) / (1 + 2 * padding).
    """
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if padding <= -0.5:
        raise ValueError(f"padding must be > -0.5, got {padding}")
    return size * (_TEMPLATE_UNIT + padding) / (1.0 + 2.0 * padding)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) mapping src to dst, as a (2, 3) matrix."""
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_src = (src_c**2).sum() / len(src)
    if var_src <= 0:
        raise ValueError("landmarks are degenerate (all template points coincide)")
    scale = (s * d).sum() / var_src
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = dst_mean - scale * rot @ src_mean
    return matrix


def alignment_matrix(landmarks: np.ndarray, size: int = 160, padding: float = FACENET_PADDING) -> np.ndarray:
    """The (2, 3) similarity transform align_face applies: image (x, y) -> crop (x, y)."""
    return _similarity(_landmark_points(landmarks), template_points(size, padding))


def align_face(
    image: np.ndarray, landmarks: np.ndarray, size: int = 160, padding: float = FACENET_PADDING
) -> np.ndarray:
    """Aligned (size, size, 3) uint8 face crop.

    A similarity transform (rotation, uniform scale, translation; least squares
    over 7 points) maps the landmarks' outer eye corners, eye centres, nose tip
    and mouth corners onto template_points(size, padding). Pixels outside the
    image are filled by replicating the border.
    """
    image = _check_image(image)
    matrix = alignment_matrix(landmarks, size, padding)
    # Shrinking by more than 2x with bilinear sampling aliases: halve first.
    while np.sqrt(abs(np.linalg.det(matrix[:, :2]))) < 0.5 and min(image.shape[:2]) >= 2:
        image = cv2.pyrDown(image)
        matrix = matrix.copy()
        matrix[:, :2] *= 2.0
    return cv2.warpAffine(
        image, matrix, (int(size), int(size)), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the grayscale crop (higher = sharper)."""
    crop = np.asarray(crop)
    if crop.ndim == 3:
        gray = cv2.cvtColor(np.ascontiguousarray(crop, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    elif crop.ndim == 2:
        gray = crop
    else:
        raise ValueError(f"crop must be (H, W) or (H, W, 3), got shape {crop.shape}")
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())
