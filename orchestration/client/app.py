"""What the invoke tasks do, as plain functions: embed, train, predict, on top of the client pipeline.

``tasks.py`` parses flags and prints; this module does the work and returns data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from orchestration.shared import reference
from orchestration.mpspdz.toolchain import MPSPDZ
from orchestration.client.private import UNKNOWN, Layout, Prediction, PredictReport, TrainReport, load_client_model, predict_private, \
    train_private

logger = logging.getLogger(__name__)

NO_FACE = "no_face_found"
UNKNOWN_PERSON = "unknown_person"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class FaceSettings:
    backend: str = "facenet"
    detector: str = "hog"
    upsample: int = 1


def embed_dataset(dataset: Path, layout: Layout, face: FaceSettings, progress: bool = True):
    """Embed a gallery folder incrementally (cache under the client folder)."""
    from preprocessing.dataset import embed_gallery

    return embed_gallery(Path(dataset), backend=face.backend, detector=face.detector,
                         cache_dir=layout.client / "cache", progress=progress)


def previous_gallery(layout: Layout):
    from preprocessing.dataset import GalleryEmbeddings

    path = layout.client / "gallery.npz"
    if not path.exists():
        return None
    try:
        return GalleryEmbeddings.load(path)
    except Exception as exc:  # an unreadable old record only loses the change summary
        logger.warning("could not read previous gallery record %s: %s", path, exc)
        return None


def train(mp: MPSPDZ, layout: Layout, gallery, params: reference.TrainParams, *, host: str,
          timeout: float, face: FaceSettings | None = None, encrypted: bool = True) -> TrainReport:
    """Train under MPC on a GalleryEmbeddings and keep the gallery record for the next change summary."""
    meta = {"backend": face.backend, "detector": face.detector} if face else None
    report = train_private(mp, layout, gallery.embeddings, gallery.labels, params, host=host, timeout=timeout,
                           meta=meta, encrypted=encrypted)
    gallery.save(layout.client / "gallery.npz")
    return report


@dataclass
class FaceQuery:
    path: Path
    location: tuple[int, int, int, int] | None  # None: no face in this image
    embedding: np.ndarray | None
    error: str | None = None


def image_paths(images: Sequence[str | Path] = (), directory: str | Path | None = None) -> list[Path]:
    """The images to recognise: explicit paths first, then a folder's images (sorted, recursive)."""
    out = [Path(p) for p in images]
    if directory is not None:
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not a folder of images")
        out += sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and not p.name.startswith("."))
    return out


def face_queries(paths: Iterable[Path], face: FaceSettings) -> Iterator[FaceQuery]:
    """Every face of every image (largest first), or one entry saying no face / unreadable."""
    from preprocessing import detect_faces, get_embedder, load_image_file
    from preprocessing.errors import PreprocessingError

    embedder = get_embedder(face.backend)
    for path in paths:
        try:
            image = load_image_file(path)
        except PreprocessingError as exc:
            yield FaceQuery(path, None, None, error=str(exc))
            continue
        faces = detect_faces(image, model=face.detector, upsample=face.upsample)
        if not faces:
            yield FaceQuery(path, None, None)
            continue
        vecs = embedder.embed(image, faces)
        for f, v in zip(faces, vecs):
            yield FaceQuery(path, tuple(int(t) for t in f.location), v)


def recognise(mp: MPSPDZ | None, layout: Layout, embeddings: np.ndarray, threshold: float, *, host: str = "127.0.0.1",
              timeout: float = 600.0, batch: int = 64, encrypted: bool = True, service: Any = None
              ) -> tuple[list[tuple[str, float]], list[PredictReport]]:
    """Names and confidences for embeddings.

    With ``service`` (an :class:`orchestration.client.service.ServiceClient`) through the running
    service, in requests of at most ``batch`` faces; otherwise one MPC run per batch of at most
    ``batch`` faces (the reports of those runs are returned; the service gives none)."""
    record = load_client_model(layout)
    classes = record["classes"]
    out: list[tuple[str, float]] = []
    reports = []
    for s in range(0, len(embeddings), batch):
        if service is not None:
            preds = service.recognise(embeddings[s:s + batch], threshold).predictions
        else:
            if mp is None:
                raise ValueError("no MP-SPDZ installation and no service to recognise with")
            rep = predict_private(mp, layout, embeddings[s:s + batch], threshold, host=host, timeout=timeout,
                                  encrypted=encrypted)
            reports.append(rep)
            preds = rep.predictions
        out += [(UNKNOWN_PERSON if p.label == UNKNOWN else classes[p.label], p.confidence) for p in preds]
    return out, reports


def names(layout: Layout, predictions: Sequence[Prediction]) -> list[tuple[str, float]]:
    """Class indices to names (or ``unknown_person``), with confidences."""
    classes = load_client_model(layout)["classes"]
    return [(UNKNOWN_PERSON if p.label == UNKNOWN else classes[p.label], p.confidence) for p in predictions]


def check_backend(layout: Layout, backend: str) -> None:
    """Queries must be embedded like the training faces were."""
    trained_with = load_client_model(layout).get("backend")
    if trained_with is not None and trained_with != backend:
        raise ValueError(f"the model was trained on {trained_with} embeddings; recognise with --backend {trained_with} "
                         f"(got {backend}) or retrain")


def default_threshold(layout: Layout) -> float:
    record = load_client_model(layout)
    return float(record.get("threshold", 0.0))


__all__ = ["FaceSettings", "FaceQuery", "Prediction", "NO_FACE", "UNKNOWN_PERSON", "embed_dataset", "train",
           "image_paths", "face_queries", "recognise", "default_threshold", "previous_gallery"]
