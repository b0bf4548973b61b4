"""Faces found and time per image of each face detector, on LFW photos no one here tuned on.

    python benchmarks/detect_bench.py                                  # hog and cascade on lfw-devtrain and lfw10
    python benchmarks/detect_bench.py --detector hog --detector cnn --detector cascade

For every image of lfw-devtrain (people/ and unknown/: 3,146 photos of 150x150) and of lfw10 (100 photos
of 250x250), each detector looks for faces (upsample as given, like `invoke train`); an image counts as
found when at least one face of at least --min-size pixels comes back, as enrolment requires. Prints plain
`key: value` lines per detector and data set: images, found, the share found, mean and p95 milliseconds per
image (detection only: the image is decoded before the clock starts), how often the cascade ran the CNN,
and the images no face was found in.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import load_image_file  # noqa: E402
from preprocessing.faces import DEFAULT_MIN_SIZE, DETECTOR_MODELS, face_locations  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FACES = Path(os.environ.get("FACES_DIR", REPO.parent / "shared" / "faces"))
SUFFIXES = {".jpg", ".jpeg", ".png"}


def images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


def run(name: str, files: list[Path], detector: str, upsample: int, min_size: int) -> None:
    times: list[float] = []
    missed: list[str] = []
    cnn_runs = 0
    for path in files:
        image = load_image_file(path)
        t = time.perf_counter()
        boxes = face_locations(image, model=detector, upsample=upsample)
        times.append(time.perf_counter() - t)
        if detector == "cascade" and not face_locations(image, model="hog", upsample=upsample):
            cnn_runs += 1  # counted outside the clock
        if not any(min(b - t_, r - l) >= min_size for t_, r, b, l in boxes):
            missed.append(str(path.relative_to(FACES)) if path.is_relative_to(FACES) else str(path))
    p = f"{name}.{detector}."
    n = len(files)
    print(f"{p}images: {n}")
    print(f"{p}found: {n - len(missed)}")
    print(f"{p}found_share: {(n - len(missed)) / n:.4f}")
    print(f"{p}ms_per_image_mean: {1000 * statistics.fmean(times):.1f}")
    print(f"{p}ms_per_image_p95: {1000 * sorted(times)[int(0.95 * (n - 1))]:.1f}")
    if detector == "cascade":
        print(f"{p}cnn_runs: {cnn_runs}")
    print(f"{p}missed: {', '.join(missed) if missed else 'none'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", action="append", choices=list(DETECTOR_MODELS),
                        help="detector to measure (repeat; default: hog and cascade; cnn takes ~0.2 s an image)")
    parser.add_argument("--upsample", type=int, default=1)
    parser.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE, help="smallest usable face, pixels")
    parser.add_argument("--faces", type=Path, default=FACES, help="folder with lfw-devtrain/ and lfw10/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sets = {"lfw-devtrain": images(args.faces / "lfw-devtrain"), "lfw10": images(args.faces / "lfw10")}
    for name, files in sets.items():
        if not files:
            parser.error(f"{args.faces / name}: no images")
    print(f"load_average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for detector in args.detector or ["hog", "cascade"]:
        for name, files in sets.items():
            run(name, files, detector, args.upsample, args.min_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
