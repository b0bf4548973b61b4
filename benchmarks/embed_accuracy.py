"""Detection rate and leave-one-out 1-nearest-neighbour accuracy of an embedding backend.

Dataset layout: <dir>/<Person>/<image>. The largest face of each image is
detected, aligned and embedded; each embedding's nearest other embedding
(cosine on L2-normalised vectors) must belong to the same person.

    python benchmarks/embed_accuracy.py /work/shared/faces/lfw10 --backend facenet
    python benchmarks/embed_accuracy.py ../shared/faces/lfw-devtrain/people --model cascade --landmarks 5

Prints plain `key: value` lines. Embeddings are cached under the system's
temporary folder (never in the repository); --no-cache disables that.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import (  # noqa: E402
    PreprocessingError,
    detect_faces,
    get_embedder,
    load_image_file,
)
from preprocessing.embedders import FaceNetEmbedder  # noqa: E402
from preprocessing.faces import DETECTOR_MODELS, LANDMARK_MODELS, use_landmarks  # noqa: E402

logger = logging.getLogger("embed_accuracy")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def list_images(root: Path) -> list[tuple[str, Path]]:
    """(person, path) for every image in root/<person>/, sorted."""
    items = []
    for person_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(person_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                items.append((person_dir.name, path))
    return items


def loo_1nn(embeddings: np.ndarray, labels: list[str]) -> float:
    """Leave-one-out 1-NN accuracy with cosine similarity (embeddings are L2-normalised)."""
    if len(labels) < 2:
        return float("nan")
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1)
    labels_arr = np.array(labels)
    return float((labels_arr[nearest] == labels_arr).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="folder with <Person>/<image> files")
    parser.add_argument("--backend", default="facenet", choices=["facenet", "dlib"])
    parser.add_argument("--model", default="hog", choices=list(DETECTOR_MODELS), help="face detector")
    parser.add_argument("--landmarks", default="68", choices=list(LANDMARK_MODELS),
                        help="landmark model the faces are aligned on (68: iBUG 300-W, not for commercial use; 5: "
                             "public domain)")
    parser.add_argument("--upsample", type=int, default=1)
    parser.add_argument("--padding", type=float, default=None, help="facenet only: alignment padding override")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "face-embed-cache")
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    root = args.dataset.resolve()
    if not root.is_dir():
        parser.error(f"{root}: not a folder (expected <dir>/<Person>/<image>)")
    items = list_images(root)
    if args.limit:
        items = items[: args.limit]
    if not items:
        parser.error(f"{root}: no .jpg/.jpeg/.png images under <Person>/ folders")

    use_landmarks(args.landmarks)
    if args.padding is not None:
        if args.backend != "facenet":
            parser.error("--padding applies to --backend facenet only")
        embedder = FaceNetEmbedder(padding=args.padding)
    else:
        embedder = get_embedder(args.backend)

    key = hashlib.sha256(
        json.dumps([str(root), [str(p) for _, p in items], embedder.model_id, args.model, args.upsample]).encode()
    ).hexdigest()[:16]
    cache = args.cache_dir / f"{embedder.name}-{key}.npz"

    start = time.perf_counter()
    if not args.no_cache and cache.exists():
        data = np.load(cache)
        found = [bool(v) for v in data["found"]]
        embeddings = data["embeddings"]
        cached = True
    else:
        found = []
        vectors = []
        for _, path in items:
            try:
                image = load_image_file(path)
            except PreprocessingError as exc:
                logger.warning("%s", exc)
                found.append(False)
                continue
            faces = detect_faces(image, model=args.model, upsample=args.upsample)
            if not faces:
                found.append(False)
                continue
            vectors.append(embedder.embed(image, faces[:1])[0])
            found.append(True)
        embeddings = np.array(vectors, dtype=np.float32).reshape(-1, embedder.dim)
        cached = False
        if not args.no_cache:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
            np.savez(cache, found=np.array(found), embeddings=embeddings)
    elapsed = time.perf_counter() - start

    labels = [person for (person, _), ok in zip(items, found) if ok]
    n_found = sum(found)
    acc = loo_1nn(embeddings, labels)
    missed = [path.name for (_, path), ok in zip(items, found) if not ok]

    print(f"dataset: {root}")
    print(f"backend: {embedder.name}")
    print(f"model_id: {embedder.model_id}")
    print(f"detector: {args.model} upsample={args.upsample}")
    print(f"landmarks: {args.landmarks}")
    print(f"people: {len({p for p, _ in items})}")
    print(f"images: {len(items)}")
    print(f"faces_found: {n_found}")
    print(f"detection_rate: {n_found / len(items):.4f}")
    print(f"loo_1nn_accuracy: {acc:.4f}")
    print(f"loo_1nn_correct: {int(round(acc * n_found)) if n_found > 1 else 0}/{n_found}")
    print(f"loo_1nn_accuracy_all_images: {(acc * n_found) / len(items):.4f}")
    print(f"missed: {' '.join(missed) if missed else '-'}")
    print(f"seconds: {elapsed:.1f}{' (cached)' if cached else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
