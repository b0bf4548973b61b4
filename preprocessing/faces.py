"""Face detection, landmarks and landmark-based alignment (dlib + OpenCV).

Locations are (top, right, bottom, left) pixel tuples like face_recognition;
landmarks are (68, 2) float arrays of (x, y) in iBUG 300-W order (dlib's 68-point model, trained
on iBUG 300-W: not for commercial use) or (5, 2) arrays in the order of dlib's 5-point model
(public domain): image-right eye outer and inner corner, image-left eye outer and inner corner,
base of the nose.

Detectors: "hog" (dlib's frontal HOG detector), "cnn" (dlib's MMOD CNN) and "cascade": HOG, and
the CNN only on an image where HOG finds no face (benchmarks/detect_bench.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import threading
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from .models import model_path

logger = logging.getLogger(__name__)

Location = tuple[int, int, int, int]

DETECTOR_MODELS = ("hog", "cnn", "cascade")
LANDMARK_MODELS = ("68", "5")  # dlib's shape predictors: 68 points (iBUG 300-W) or 5 points (public domain)
DEFAULT_MIN_SIZE = 40
# 5 points by default: as accurate as 68 on lfw-devtrain (benchmarks/embed_accuracy.py) and public domain
_default_landmarks = "5"


def frame_detector(model: str) -> str:
    """The detector for video frames: "cascade" becomes "hog". In a video a frame without a face is common (an
    empty scene, a turned head), and the CNN on a 640x480 frame takes seconds on two cores (3.5 s at upsample
    0, 16 s at 1, measured here), so a live stream would stall on every such frame; photos keep the cascade."""
    if model not in DETECTOR_MODELS:
        raise ValueError(f"unknown detector model {model!r}; allowed values: {', '.join(DETECTOR_MODELS)}")
    return "hog" if model == "cascade" else model


def use_landmarks(name: str) -> None:
    """Set the landmark model detect_faces uses when none is given ("5", the default, or "68"; the CLI sets
    it from invoke.yaml face.landmarks). Embedders' model ids name it, so cached embeddings never mix the two."""
    global _default_landmarks
    _default_landmarks = check_landmarks(name)


def landmark_model() -> str:
    """The landmark model detect_faces uses by default: "68" or "5"."""
    return _default_landmarks


def check_landmarks(name: Any) -> str:
    name = str(name)
    if name not in LANDMARK_MODELS:
        raise ValueError(f"unknown landmark model {name!r}; allowed values: {', '.join(LANDMARK_MODELS)}")
    return name

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
# dlib's template for its 5-point model, in the same unit square (get_face_chip_details for 5-part
# shapes, dlib/image_transforms/interpolation.h), in the model's point order.
_TEMPLATE5_UNIT = np.array(
    [
        [0.8595674595992, 0.2134981538014],  # outer corner of the eye on the image's right
        [0.6460604764104, 0.2289674387677],  # its inner corner
        [0.1205750620789, 0.2137274526848],  # outer corner of the eye on the image's left
        [0.3340850613712, 0.2290642403242],  # its inner corner
        [0.4901123135679, 0.6277975316475],  # base of the nose
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
    """One detected face: its box and its landmarks (68 or 5 points)."""

    location: Location  # (top, right, bottom, left), clipped to the image
    landmarks: np.ndarray  # (68, 2) or (5, 2) float64 (x, y)

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
# One instance of each dlib model per thread: dlib's detectors and shape predictors keep scratch buffers,
# and two threads calling one instance at once crash the process (the video pipeline detects on two threads).
_per_thread = threading.local()


def _thread_cached(key: str, make: Callable[[], Any]) -> Any:
    cache = getattr(_per_thread, "models", None)
    if cache is None:
        cache = _per_thread.models = {}
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _hog_detector() -> Any:
    import dlib

    return _thread_cached("hog", dlib.get_frontal_face_detector)


def _cnn_detector() -> Any:
    import dlib

    return _thread_cached("cnn", lambda: dlib.cnn_face_detection_model_v1(str(model_path("mmod_detector"))))


def _shape_predictor(landmarks: str = "68") -> Any:
    import dlib

    which = check_landmarks(landmarks)
    return _thread_cached(f"shape{which}",
                          lambda: dlib.shape_predictor(str(model_path(f"shape_predictor_{which}"))))


def _clear_model_caches() -> None:
    """Forget this thread's dlib models (tests that change which files may be opened)."""
    _per_thread.models = {}



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
    if model in ("hog", "cascade"):
        found = list(_hog_detector()(image, int(upsample)))
        if found or model == "hog":
            return found
        logger.debug("cascade: HOG found no face in a %dx%d image, running the CNN", image.shape[1], image.shape[0])
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

    model: "hog" (dlib frontal face detector), "cnn" (dlib MMOD CNN detector) or "cascade" (HOG, and
    the CNN only when HOG finds nothing).
    upsample: how many times to double the image before detecting (finds smaller faces).
    """
    image = _check_image(image)
    return [loc for loc, _ in _sorted_faces(image, model, upsample)]


def _landmarks_for_rect(image: np.ndarray, rect: Any, landmarks: str) -> np.ndarray:
    shape = _shape_predictor(landmarks)(image, rect)
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def face_landmarks(image: np.ndarray, locations: Sequence[Location], landmarks: str | None = None) -> list[np.ndarray]:
    """Landmarks, one (68, 2) or (5, 2) float array of (x, y) per location.

    landmarks: "68" or "5" (None: landmark_model(), the process default)."""
    import dlib

    image = _check_image(image)
    which = check_landmarks(landmark_model() if landmarks is None else landmarks)
    result = []
    for loc in locations:
        top, right, bottom, left = (int(v) for v in loc)
        result.append(_landmarks_for_rect(image, dlib.rectangle(left, top, right, bottom), which))
    return result


def detect_faces(
    image: np.ndarray, model: str = "hog", upsample: int = 1, min_size: int = DEFAULT_MIN_SIZE,
    landmarks: str | None = None,
) -> list[DetectedFace]:
    """Faces with landmarks, largest first; faces whose box is smaller than min_size px are dropped.

    Landmarks are predicted from the detector's unclipped box, so faces at the
    image border keep their true shape. landmarks: "68" or "5" (None: landmark_model()).
    """
    image = _check_image(image)
    which = check_landmarks(landmark_model() if landmarks is None else landmarks)
    faces = []
    for loc, rect in _sorted_faces(image, model, upsample):
        top, right, bottom, left = loc
        if min(bottom - top, right - left) < min_size:
            logger.debug("dropping face %s: smaller than min_size=%d", loc, min_size)
            continue
        faces.append(DetectedFace(location=loc, landmarks=_landmarks_for_rect(image, rect, which)))
    return faces


# --- alignment -----------------------------------------------------------------
def _landmark_points(landmarks: np.ndarray) -> np.ndarray:
    """The template points of a landmark array: 7 taken from (68, 2), or the 5 of a (5, 2) array."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape == (5, 2):
        return lm
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must be a (68, 2) or (5, 2) array of (x, y), got shape {lm.shape}")
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


def template_points(size: int = 160, padding: float = FACENET_PADDING, points: int = 7) -> np.ndarray:
    """Where align_face puts the template points in a size x size crop, (points, 2) (x, y).

    points=7 (from 68 landmarks): outer eye corners (36, 45), eye centres (36-41, 42-47), nose tip
    (30), mouth corners (48, 54). points=5 (dlib's 5-point model): its eye corners and nose base.
    A unit-square point p lands at size * (p + padding) / (1 + 2 * padding).
    """
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if padding <= -0.5:
        raise ValueError(f"padding must be > -0.5, got {padding}")
    if points not in (5, 7):
        raise ValueError(f"points must be 7 (68-point landmarks) or 5 (5-point landmarks), got {points}")
    unit = _TEMPLATE_UNIT if points == 7 else _TEMPLATE5_UNIT
    return size * (unit + padding) / (1.0 + 2.0 * padding)


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
    src = _landmark_points(landmarks)
    return _similarity(src, template_points(size, padding, points=len(src)))


def align_face(
    image: np.ndarray, landmarks: np.ndarray, size: int = 160, padding: float = FACENET_PADDING
) -> np.ndarray:
    """Aligned (size, size, 3) uint8 face crop.

    A similarity transform (rotation, uniform scale, translation; least squares)
    maps 68 landmarks' outer eye corners, eye centres, nose tip and mouth corners
    (or the 5 points of dlib's 5-point model) onto template_points(size, padding). Pixels outside the
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
