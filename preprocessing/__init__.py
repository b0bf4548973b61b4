"""Client-side face preprocessing: load images, find faces, align them, embed them.

Flat functions on numpy arrays, in the style of face_recognition's api.py.
TensorFlow is imported only when the FaceNet backend is first used.
"""
from __future__ import annotations

import logging

import numpy as np

from .embedders import BACKENDS, DlibEmbedder, Embedder, FaceNetEmbedder, get_embedder
from .errors import (
    FaceTooSmallError,
    ImageLoadError,
    InvalidNameError,
    ModelFileError,
    NoFaceError,
    PreprocessingError,
)
from .faces import (
    DetectedFace,
    align_face,
    alignment_matrix,
    detect_faces,
    face_landmarks,
    face_locations,
    sharpness,
    template_points,
)
from .images import load_image_file
from .models import model_path, models_dir

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "DetectedFace",
    "DlibEmbedder",
    "Embedder",
    "FaceNetEmbedder",
    "FaceTooSmallError",
    "ImageLoadError",
    "InvalidNameError",
    "ModelFileError",
    "NoFaceError",
    "PreprocessingError",
    "align_face",
    "alignment_matrix",
    "detect_faces",
    "face_encodings",
    "face_landmarks",
    "face_locations",
    "get_embedder",
    "load_image_file",
    "model_path",
    "models_dir",
    "sharpness",
    "template_points",
]


def face_encodings(
    image: np.ndarray, faces: list[DetectedFace] | None = None, backend: str = "facenet"
) -> list[np.ndarray]:
    """One L2-normalised float32 embedding per face; faces default to detect_faces(image)."""
    embedder = get_embedder(backend)
    if faces is None:
        faces = detect_faces(image)
    if not faces:
        return []
    return list(embedder.embed(image, faces))
