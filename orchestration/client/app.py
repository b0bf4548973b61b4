"""What the invoke tasks do, as plain functions: embed, train, predict, on top of the client pipeline.

The tasks (``orchestration.cli``) parse flags and print; this module does the work and returns data.
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
from orchestration.shared.model import PREDICT_PROGRAM, TRAIN_PROGRAM
from orchestration.client.jobs import model_generation, record_threshold

logger = logging.getLogger(__name__)

NO_FACE = "no_face_found"
UNKNOWN_PERSON = "unknown_person"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class FaceSettings:
    backend: str = "facenet"
    detector: str = "cascade"  # invoke.yaml face.detector; video frames run it as HOG (faces.frame_detector)
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


def recognise(mp: MPSPDZ | None, layout: Layout, embeddings: np.ndarray, threshold: float | None, *,
              host: str = "127.0.0.1",
              timeout: float = 600.0, batch: int = 64, encrypted: bool = True, service: Any = None
              ) -> tuple[list[tuple[str, float, float]], list[PredictReport]]:
    """(name, confidence 1/S, score z_max) for each embedding; unknown_person where z_max < the threshold.

    With ``service`` (an :class:`orchestration.client.service.ServiceClient`) through the running
    service, in requests of at most ``batch`` faces; otherwise one MPC run per batch of at most
    ``batch`` faces (the reports of those runs are returned; the service gives none). ``threshold`` (a logit
    on z_max) None: the record's own, of the generation that answered."""
    record = load_client_model(layout)
    classes = record["classes"]
    thr = record_threshold(record, layout.client_model) if threshold is None else threshold
    out: list[tuple[str, float, float]] = []
    reports = []
    for s in range(0, len(embeddings), batch):
        if service is not None:
            answer = service.recognise(embeddings[s:s + batch], thr)
            preds = answer.predictions
            if answer.gen != model_generation(record):
                # the service client moved on to a newer record while it retried (one the data owner copied
                # here, or fetched from service.model_record): name the classes after the answer's generation,
                # and decide with its threshold unless the caller gave one
                record = load_client_model(layout)
                classes = record["classes"]
                if model_generation(record) != answer.gen:
                    raise ValueError(f"the service answered with model generation {answer.gen}, this client's "
                                     f"record is generation {model_generation(record)}")
                if threshold is None:
                    thr = record_threshold(record, layout.client_model)
                    preds = [Prediction(p.best if p.score >= thr else UNKNOWN, p.confidence, p.best, p.score)
                             for p in preds]
        else:
            if mp is None:
                raise ValueError("no MP-SPDZ installation and no service to recognise with")
            rep = predict_private(mp, layout, embeddings[s:s + batch], thr, host=host, timeout=timeout,
                                  encrypted=encrypted)
            reports.append(rep)
            preds = rep.predictions
        out += [(UNKNOWN_PERSON if p.label == UNKNOWN else classes[p.label], p.confidence, p.score) for p in preds]
    return out, reports


def names(layout: Layout, predictions: Sequence[Prediction]) -> list[tuple[str, float, float]]:
    """Class indices to names (or ``unknown_person``), with confidences 1/S and scores z_max."""
    classes = load_client_model(layout)["classes"]
    return [(UNKNOWN_PERSON if p.label == UNKNOWN else classes[p.label], p.confidence, p.score) for p in predictions]


def check_backend(layout: Layout, backend: str) -> None:
    """Queries must be embedded like the training faces were."""
    trained_with = load_client_model(layout).get("backend")
    if trained_with is not None and trained_with != backend:
        raise ValueError(f"the model was trained on {trained_with} embeddings; recognise with --backend {trained_with} "
                         f"(got {backend}) or retrain")


def default_threshold(layout: Layout) -> float:
    """The model record's threshold on the top logit z_max (ModelError for an old record's 1/S threshold)."""
    return record_threshold(load_client_model(layout), layout.client_model)


@dataclass(frozen=True)
class Recognised:
    """One line of a recognition's answer: a face's name (or ``unknown_person``), or ``no_face_found``."""

    path: Path
    name: str
    confidence: float | None  # 1/S, for display; None for NO_FACE
    score: float | None = None  # the open-set score, the top logit z_max; None for NO_FACE


def recognise_images(mp: MPSPDZ | None, layout: Layout, queries: Iterable[FaceQuery], threshold: float | None, *,
                     batch: int = 64, host: str = "127.0.0.1", timeout: float = 600.0, encrypted: bool = True,
                     service: Any = None) -> Iterator[list[Recognised]]:
    """Every query's answer, in input order, a list per batch: the faces among up to ``batch`` of them go to
    the servers together (one MPC run, or one service request); a query without a face is ``no_face_found``."""
    pending: list[FaceQuery] = []
    for q in queries:
        pending.append(q)
        if sum(e.embedding is not None for e in pending) >= batch:
            yield _recognise_pending(mp, layout, pending, threshold, batch=batch, host=host, timeout=timeout,
                                     encrypted=encrypted, service=service)
            pending = []
    yield _recognise_pending(mp, layout, pending, threshold, batch=batch, host=host, timeout=timeout,
                             encrypted=encrypted, service=service)


def _recognise_pending(mp: MPSPDZ | None, layout: Layout, pending: Sequence[FaceQuery], threshold: float | None, *,
                       batch: int, **run: Any) -> list[Recognised]:
    faces = [q for q in pending if q.embedding is not None]
    results = iter([])
    if faces:
        found, _ = recognise(mp, layout, np.stack([q.embedding for q in faces]), threshold, batch=batch, **run)
        results = iter(found)
    out = []
    for q in pending:
        if q.embedding is None:
            out.append(Recognised(q.path, NO_FACE, None))
        else:
            name, conf, score = next(results)
            out.append(Recognised(q.path, name, conf, score))
    return out


def collected_rows(layout: Layout, predictions: Sequence[Prediction], info: dict[str, Any] | None) -> list[Recognised]:
    """A collected recognition job's answer, one line per image of its ``rows`` (path, has a face) as shared."""
    named = iter(names(layout, predictions))
    out = []
    for path, has_face in (info or {}).get("rows", []):
        if has_face:
            name, conf, score = next(named)
            out.append(Recognised(path, name, conf, score))
        else:
            out.append(Recognised(path, NO_FACE, None))
    return out


class NoFaceError(ValueError):
    """None of the images given has a face."""


def share_queries(layout: Layout, queries: Iterable[FaceQuery], threshold: float, out: Path) -> tuple[Any, int]:
    """Two hosts: one recognition share bundle per server for the faces among ``queries``; (the bundles, how
    many faces). NoFaceError when no image has a face."""
    from orchestration.client import jobs

    queries = list(queries)
    faces = [q for q in queries if q.embedding is not None]
    if not faces:
        raise NoFaceError("no face found in any of the images: nothing to send")
    rows = [[str(q.path), q.embedding is not None] for q in queries]
    sent = jobs.share_predict(layout.client, np.stack([q.embedding for q in faces]), threshold, out,
                              info={"rows": rows}, protocol=layout.protocol)
    return sent, len(faces)


DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def build_programs(mp: MPSPDZ, layout: Layout, params: reference.TrainParams, *, n: int = 0, classes: int = 0,
                   batches: Sequence[int] = DEFAULT_BATCHES, force: bool = False) -> Iterator[str | None]:
    """Compile (cached) the training program for ``n`` faces of ``classes`` people and the recognition program
    for each batch size; sizes not given come from the last trained model, with its parameters. Yields each
    compiled program's name, and None in place of the training program when it has no sizes yet."""
    import json

    from orchestration.mpspdz.toolchain import compile_program, protocol

    proto = protocol(layout.protocol)
    d1 = 129
    if not (n and classes) and layout.client_model.exists():
        rec = json.loads(layout.client_model.read_text())
        n, classes, d1 = n or rec["n"], classes or len(rec["classes"]), rec["d"] + 1
        params = reference.TrainParams(**rec["params"])
    if n and classes:
        yield compile_program(mp, TRAIN_PROGRAM, params.program_args(int(n), d1, int(classes)), layout.build,
                              force=force, proto=proto)
    else:
        yield None
    if classes:
        for q in batches:
            yield compile_program(mp, PREDICT_PROGRAM, [str(q), str(d1), str(classes), str(params.exp_bits)],
                                  layout.build, force=force, proto=proto)


__all__ = ["FaceSettings", "FaceQuery", "Prediction", "NO_FACE", "UNKNOWN_PERSON", "embed_dataset", "train",
           "image_paths", "face_queries", "recognise", "default_threshold", "previous_gallery", "Recognised",
           "recognise_images", "collected_rows", "share_queries", "build_programs"]
