"""Face embedding backends: FaceNet (Keras) and dlib's ResNet, behind one protocol.

Every backend returns float32 (n, dim) embeddings with unit L2 norm, so
cosine similarity is a dot product and squared euclidean distance is 2 - 2 cos.
"""
from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from .faces import FACENET_PADDING, TEMPLATE_VERSION, DetectedFace, align_face, landmark_model
from .models import model_info, model_path

logger = logging.getLogger(__name__)

BACKENDS = ("facenet", "dlib")


@runtime_checkable
class Embedder(Protocol):
    """A face embedding model."""

    name: str  # backend name: "facenet" or "dlib"
    model_id: str  # cache key: backend, weights' sha256 prefix, crop recipe version, landmark model
    dim: int  # embedding length

    def crops(self, image: np.ndarray, faces: Sequence[DetectedFace]) -> list[np.ndarray]:
        """Aligned crops the model eats, one per face."""
        ...

    def embed(self, image: np.ndarray, faces: Sequence[DetectedFace]) -> np.ndarray:
        """(len(faces), dim) float32 L2-normalised embeddings."""
        ...

    def embed_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(len(crops), dim) float32 L2-normalised embeddings of crops from crops()."""
        ...


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class FaceNetEmbedder:
    """Inception-ResNet-v1 FaceNet (facenet_keras.h5), 160x160 landmark-aligned crops, 128-d."""

    name = "facenet"
    dim = 128
    crop_size = 160
    padding = FACENET_PADDING

    def __init__(self, padding: float = FACENET_PADDING) -> None:
        self.padding = float(padding)
        self._sha = model_info("facenet_keras")["sha256"]

    @property
    def model_id(self) -> str:
        """Names the weights, the crop recipe and the landmark model the crops are aligned on (68 points
        keeps the id it had before there was a choice, so existing caches stay valid)."""
        points = "" if landmark_model() == "68" else f"-lm{landmark_model()}"
        return f"facenet:{self._sha[:12]}:align-{TEMPLATE_VERSION}-p{self.padding:g}{points}"

    def crops(self, image: np.ndarray, faces: Sequence[DetectedFace]) -> list[np.ndarray]:
        return [align_face(image, f.landmarks, size=self.crop_size, padding=self.padding) for f in faces]

    def embed_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        from . import facenet  # imports TensorFlow on first use

        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        return facenet.embed_crops(np.stack([np.asarray(c, dtype=np.uint8) for c in crops]))

    def embed(self, image: np.ndarray, faces: Sequence[DetectedFace]) -> np.ndarray:
        return self.embed_crops(self.crops(image, faces))

    def __repr__(self) -> str:
        return f"FaceNetEmbedder(model_id={self.model_id!r})"


class DlibEmbedder:
    """dlib ResNet-34 face descriptor: dlib.get_face_chip (150 px, padding 0.25) from the landmarks (68 or 5), 128-d."""

    name = "dlib"
    dim = 128
    crop_size = 150
    padding = 0.25

    def __init__(self) -> None:
        self._sha = model_info("dlib_resnet")["sha256"]
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        points = "" if landmark_model() == "68" else f"-lm{landmark_model()}"
        return f"dlib:{self._sha[:12]}:chip{self.crop_size}-p{self.padding:g}{points}"

    @staticmethod
    @lru_cache(maxsize=None)
    def _model() -> Any:
        import dlib

        return dlib.face_recognition_model_v1(str(model_path("dlib_resnet")))

    def crops(self, image: np.ndarray, faces: Sequence[DetectedFace]) -> list[np.ndarray]:
        import dlib

        image = np.ascontiguousarray(image, dtype=np.uint8)
        chips = []
        for face in faces:
            top, right, bottom, left = face.location
            points = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in face.landmarks])
            shape = dlib.full_object_detection(dlib.rectangle(left, top, right, bottom), points)
            chips.append(np.asarray(dlib.get_face_chip(image, shape, size=self.crop_size, padding=self.padding)))
        return chips

    def embed_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        chips = []
        for chip in crops:
            chip = np.ascontiguousarray(chip, dtype=np.uint8)
            if chip.shape != (self.crop_size, self.crop_size, 3):
                raise ValueError(
                    f"dlib crops must be ({self.crop_size}, {self.crop_size}, 3) uint8, got {chip.shape}"
                )
            chips.append(chip)
        with self._lock:
            descriptors = self._model().compute_face_descriptor(chips)
        return _l2_normalise(np.array([np.asarray(d) for d in descriptors]))

    def embed(self, image: np.ndarray, faces: Sequence[DetectedFace]) -> np.ndarray:
        return self.embed_crops(self.crops(image, faces))

    def __repr__(self) -> str:
        return f"DlibEmbedder(model_id={self.model_id!r})"


_embedders: dict[str, Embedder] = {}
_embedders_lock = threading.Lock()


def get_embedder(name: str) -> Embedder:
    """The (cached) embedder for a backend name: "facenet" or "dlib"."""
    if name not in BACKENDS:
        raise ValueError(f"unknown embedding backend {name!r}; allowed values: {', '.join(BACKENDS)}")
    with _embedders_lock:
        if name not in _embedders:
            _embedders[name] = FaceNetEmbedder() if name == "facenet" else DlibEmbedder()
        return _embedders[name]
