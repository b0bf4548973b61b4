"""Client-side throughput: load + detect + align + embed.

    python benchmarks/embed_speed.py                               # lfw-devtrain/people, as `invoke train` embeds
    python benchmarks/embed_speed.py --mode images --n 100         # image by image, with per-stage times

--mode gallery (the default) runs preprocessing.embed_gallery, the path enrolment and training take:
FaceNet batches of 32, and the network on a worker thread while the next images are loaded and
detected. No cache is read or written. --mode images processes one image at a time (load, detect,
align, embed, each timed), the path of a single query or a video frame. The first image builds the
model and is timed apart (warmup). Prints plain `key: value` lines, including peak resident memory.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import detect_faces, get_embedder, load_image_file  # noqa: E402
from preprocessing.dataset import embed_gallery  # noqa: E402
from preprocessing.faces import DETECTOR_MODELS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = Path(os.environ.get("FACES_DIR", REPO.parent / "shared" / "faces")) / "lfw-devtrain" / "people"


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="facenet", choices=["facenet", "dlib"])
    parser.add_argument("--mode", default="gallery", choices=["gallery", "images"],
                        help="gallery: embed_gallery (batched, overlapped); images: one image at a time, per stage")
    parser.add_argument("--n", type=int, default=0, help="number of images (0: all; --mode images: 100)")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="folder with <Person>/<image>")
    parser.add_argument("--model", default="hog", choices=list(DETECTOR_MODELS), help="face detector")
    parser.add_argument("--upsample", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    files = sorted(p for p in args.dataset.glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        parser.error(f"{args.dataset}: no images under <Person>/ folders")
    if args.n < 0:
        parser.error("--n must be >= 0 (0: every image)")
    if args.mode == "gallery":
        return run_gallery(args, files[:args.n] if args.n else files)
    n_images = args.n or 100
    files = [files[i % len(files)] for i in range(n_images)]
    rss_start = peak_rss_mib()

    embedder, warmup = warm_up(args, files[0])

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

    print("mode: images (one at a time)")
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


def warm_up(args: argparse.Namespace, first: Path) -> tuple[Any, float]:
    """The embedder, after one image has built its model (kept out of the timing), and the seconds that took."""
    embedder = get_embedder(args.backend)
    t0 = time.perf_counter()
    image = load_image_file(first)
    embedder.embed(image, detect_faces(image, model=args.model, upsample=args.upsample)[:1])
    return embedder, time.perf_counter() - t0


def run_gallery(args: argparse.Namespace, files: list[Path]) -> int:
    """embed_gallery over ``files`` (a gallery of links to them), no cache: what enrolment does."""
    rss_start = peak_rss_mib()
    embedder, warmup = warm_up(args, files[0])
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            person = Path(tmp) / path.parent.name
            person.mkdir(exist_ok=True)
            (person / path.name).symlink_to(path.resolve())
        start = time.perf_counter()
        g = embed_gallery(tmp, embedder=embedder, detector=args.model, upsample=args.upsample,
                          cache_dir=None, progress=False)
        total = time.perf_counter() - start
    print("mode: gallery (embed_gallery: batches of 32, network on a worker thread)")
    print(f"backend: {embedder.name}")
    print(f"model_id: {embedder.model_id}")
    print(f"detector: {args.model} upsample={args.upsample}")
    print(f"dataset: {args.dataset}")
    print(f"images: {len(files)}")
    print(f"faces: {len(g)}")
    print(f"skipped: {len(g.skipped)}")
    print(f"warmup_seconds: {warmup:.2f}")
    print(f"seconds: {total:.2f}")
    print(f"images_per_second: {len(files) / total:.2f}")
    print(f"faces_per_second: {len(g) / total:.2f}")
    print(f"peak_rss_mib: {peak_rss_mib():.0f}")
    print(f"peak_rss_mib_before_model: {rss_start:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
