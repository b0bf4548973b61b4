"""The end-to-end demo: enrol a sample gallery, train privately, recognise held-out and unknown faces.

Every secure result is printed beside the plaintext reference of the same algorithm.
"""
from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestration.shared import reference
from orchestration.mpspdz.toolchain import DEFAULT_PROTOCOL, MPSPDZ
from orchestration.client.private import Layout, train_private

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def lfw_sample(dest: Path, min_faces: int = 20, people: int = 8) -> Path:
    """A gallery folder of LFW people with at least ``min_faces`` photos, via scikit-learn's loader.

    scikit-learn downloads LFW once (internet needed) and caches it under ~/scikit_learn_data.
    """
    from PIL import Image
    from sklearn.datasets import fetch_lfw_people

    lfw = fetch_lfw_people(min_faces_per_person=min_faces, resize=1.0, color=True, slice_=None, funneled=False)
    names = lfw.target_names
    chosen = sorted(set(lfw.target), key=lambda k: names[k])[:people]
    dest.mkdir(parents=True, exist_ok=True)
    counters: dict[int, int] = {}
    for img, k in zip(lfw.images, lfw.target):
        if k not in chosen:
            continue
        counters[k] = counters.get(k, 0) + 1
        folder = dest / str(names[k]).replace(" ", "_")
        folder.mkdir(exist_ok=True)
        arr = np.clip(np.asarray(img) * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{folder.name}_{counters[k]:04d}.png")
    return dest


@dataclass
class DemoRow:
    path: Path
    truth: str  # a person's name, or "unknown_person" for someone never enrolled
    name: str
    confidence: float
    reference_name: str
    score: float = float("nan")  # the top logit z_max the unknown decision is made on


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def run_demo(mp: MPSPDZ, dataset: Path, work: Path, params: reference.TrainParams, *, backend: str,
             detector: str, held_out: int = 2, people: int = 10, seed: int = 0, host: str = "127.0.0.1",
             timeout: float = 1800.0, protocol: str = DEFAULT_PROTOCOL):
    """Enrol, train and recognise; returns (rows, train report, threshold)."""
    from preprocessing.dataset import embed_gallery
    from preprocessing.enroll import enroll

    from orchestration.client.app import FaceSettings, face_queries, recognise

    persons = sorted(p for p in Path(dataset).iterdir() if p.is_dir() and len(_images(p)) >= held_out + 2)
    if len(persons) < 3:
        raise ValueError(f"{dataset}: need at least 3 people with {held_out + 2}+ images each, found {len(persons)}")
    rng = random.Random(seed)
    persons = persons[:people + 1]
    unknown_person = persons[rng.randrange(len(persons))]
    enrolled = [p for p in persons if p != unknown_person]
    if work.exists():
        shutil.rmtree(work)
    gallery = work / "gallery"
    queries: list[tuple[Path, str]] = []
    for person in enrolled:
        imgs = _images(person)
        rng.shuffle(imgs)
        queries += [(p, person.name) for p in imgs[:held_out]]
        src = work / "enroll-source" / person.name
        src.mkdir(parents=True)
        for img in imgs[held_out:]:
            (src / img.name).symlink_to(img.resolve())
        res = enroll(person.name, str(src), gallery, count=len(imgs) - held_out, backend=backend, detector=detector)
        logger.info("enrolled %s: %s", person.name, res)
    queries.append((rng.choice(_images(unknown_person)), "unknown_person"))

    layout = Layout(work / "var", protocol)
    g = embed_gallery(gallery, backend=backend, detector=detector, cache_dir=work / "cache", progress=False)
    report = train_private(mp, layout, g.embeddings, g.labels, params, host=host, timeout=timeout,
                           meta={"backend": backend, "detector": detector})
    index = {n: k for k, n in enumerate(report.classes)}
    w = reference.train(g.embeddings, np.array([index[n] for n in g.labels]), len(report.classes), params)

    face = FaceSettings(backend=backend, detector=detector)
    truth_of = dict(queries)
    found = []
    seen: set[Path] = set()
    for q in face_queries([p for p, _ in queries], face):
        if q.path not in seen:  # the largest face of each photo (a photo may show bystanders too)
            seen.add(q.path)
            found.append((q, truth_of[q.path]))
    faces = [(q, t) for q, t in found if q.embedding is not None]
    emb = np.stack([q.embedding for q, _ in faces])
    secure, reports = recognise(mp, layout, emb, report.threshold.threshold, host=host, timeout=timeout)
    ref_idx, _, ref_score = reference.predict_scores(w, emb, params.exp_bits)
    rows = []
    for (q, truth), (name, conf, score), ri, rz in zip(faces, secure, ref_idx, ref_score):
        ref_name = report.classes[ri] if rz >= report.threshold.threshold else "unknown_person"
        rows.append(DemoRow(q.path, truth, name, conf, ref_name, score))
    for q, truth in found:
        if q.embedding is None:
            rows.append(DemoRow(q.path, truth, "no_face_found", float("nan"), "no_face_found"))
    return rows, report, reports
