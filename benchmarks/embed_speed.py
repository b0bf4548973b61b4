"""Client-side throughput: load + detect + align + embed, image by image.

    python benchmarks/embed_speed.py --backend facenet --n 100

Uses the first N images of <faces>/lfw10 (cycled if N is larger), after one
warm-up image that builds the model (reported separately). Prints plain
`key: value` lines, including peak resident memory of the process.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import detect_faces, get_embedder, load_image_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = Path(os.environ.get("FACES_DIR", REPO.parent / "shared" / "faces")) / "lfw10"


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="facenet", choices=["facenet", "dlib"])
    parser.add_argument("--n", type=int, default=100, help="number of images to process")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="folder with <Person>/<image>")
    parser.add_argument("--model", default="hog", choices=["hog", "cnn"], help="face detector")
    parser.add_argument("--upsample", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    files = sorted(p for p in args.dataset.glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        parser.error(f"{args.dataset}: no images under <Person>/ folders")
    if args.n < 1:
        parser.error("--n must be >= 1")
    files = [files[i % len(files)] for i in range(args.n)]
    rss_start = peak_rss_mib()

    embedder = get_embedder(args.backend)
    t0 = time.perf_counter()
    warm = load_image_file(files[0])
    embedder.embed(warm, detect_faces(warm, model=args.model, upsample=args.upsample)[:1])
    warmup = time.perf_counter() - t0

    t_load = t_detect = t_align = t_embed = 0.0
    faces_found = 0
    start = time.perf_counter()
    for path in files:
        t = time.perf_counter()
        image = load_image_file(path)
        t_load += time.perf_counter() - t
        t = time.perf_counter()
        faces = detect_faces(image, model=args.model, upsample=args.upsample)[:1]
        t_detect += time.perf_counter() - t
        if not faces:
            continue
        faces_found += 1
        t = time.perf_counter()
        crops = embedder.crops(image, faces)
        t_align += time.perf_counter() - t
        t = time.perf_counter()
        embedder.embed_crops(crops)
        t_embed += time.perf_counter() - t
    total = time.perf_counter() - start
    n = len(files)

    print(f"backend: {embedder.name}")
    print(f"model_id: {embedder.model_id}")
    print(f"detector: {args.model} upsample={args.upsample}")
    print(f"images: {n}")
    print(f"faces: {faces_found}")
    print(f"warmup_seconds: {warmup:.2f}")
    print(f"seconds: {total:.2f}")
    print(f"images_per_second: {n / total:.2f}")
    print(f"load_ms_per_image: {1000 * t_load / n:.1f}")
    print(f"detect_ms_per_image: {1000 * t_detect / n:.1f}")
    print(f"align_ms_per_face: {1000 * t_align / max(faces_found, 1):.1f}")
    print(f"embed_ms_per_face: {1000 * t_embed / max(faces_found, 1):.1f}")
    print(f"peak_rss_mib: {peak_rss_mib():.0f}")
    print(f"peak_rss_mib_before_model: {rss_start:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
