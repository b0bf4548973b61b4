"""Where the time of one 640x480 video frame goes on the client, and what the candidate speedups buy.

    python benchmarks/video_stages.py                 # detection settings and FaceNet call styles
    python benchmarks/video_stages.py --skip-embed    # detection only (no TensorFlow)

Detection: every lfw10 image is placed on a 640x480 textured frame with its face box (dlib HOG,
upsample 1, on the 250 px original) scaled to each of ``--face-sizes`` pixels; for each setting
the mean milliseconds of the dlib HOG call and how many of the faces it finds. Settings: full
frame with upsample 1 and 0, the frame halved with upsample 1 (boxes mapped back), grayscale
with upsample 0. Landmarks (68 points) and alignment are timed once, on the faces found.

Embedding: one aligned face through FaceNet as ``model.predict``, eagerly as ``model(x)``, as the
``tf.function`` preprocessing/facenet.py uses, and as an XLA-compiled ``tf.function``, with the
first call of each (tracing, compiling) reported apart. Prints ``key: value`` lines; numbers
depend on the machine and its load (printed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FACES = Path(os.environ.get("FACES_DIR", REPO.parent / "shared" / "faces"))
SIZE = (640, 480)


def _frames(images: list[Path], face_px: int, rng: np.random.Generator) -> list[tuple[np.ndarray, tuple]]:
    """(RGB frame, (x, y, side)) with each image scaled so that its face box is about ``face_px``."""
    from preprocessing import faces as F

    hog = F._hog_detector()
    background = cv2.normalize(cv2.GaussianBlur(rng.integers(0, 256, (SIZE[1], SIZE[0], 3)).astype(np.uint8),
                                                (0, 0), 6), None, 40, 200, cv2.NORM_MINMAX)
    out = []
    for path in images:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        rects = hog(image, 1)
        if not rects:
            continue
        box = max(rects, key=lambda r: r.area()).width()
        side = int(round(image.shape[1] * face_px / box))
        if side > min(SIZE):
            continue
        scaled = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if side < 250 else cv2.INTER_LINEAR)
        x, y = int(rng.integers(0, SIZE[0] - side + 1)), int(rng.integers(0, SIZE[1] - side + 1))
        frame = background.copy()
        frame[y:y + side, x:x + side] = scaled
        out.append((frame, (x, y, side)))
    return out


def _detector(scale: float, upsample: int, gray: bool) -> Callable[[np.ndarray], list[tuple[float, float]]]:
    """A HOG call on the frame as the setting prepares it; the box centres in frame pixels."""
    from preprocessing import faces as F

    hog = F._hog_detector()

    def detect(frame: np.ndarray) -> list[tuple[float, float]]:
        img = frame if scale == 1 else cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if gray:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        return [((r.left() + r.right()) / 2 / scale, (r.top() + r.bottom()) / 2 / scale) for r in hog(img, upsample)]

    return detect


def detection(images: list[Path], sizes: list[int]) -> None:
    settings = [("full frame, upsample 1", 1.0, 1, False), ("full frame, upsample 0", 1.0, 0, False),
                ("half frame, upsample 1", 0.5, 1, False), ("full frame gray, upsample 0", 1.0, 0, True)]
    rng = np.random.default_rng(0)
    for face_px in sizes:
        frames = _frames(images, face_px, rng)
        for name, scale, upsample, gray in settings:
            detect = _detector(scale, upsample, gray)
            detect(frames[0][0])
            found, t = 0, 0.0
            for frame, (x, y, side) in frames:
                t0 = time.perf_counter()
                centres = detect(frame)
                t += time.perf_counter() - t0
                cx, cy = x + side / 2, y + side / 2
                found += any(abs(u - cx) < 0.2 * side and abs(v - cy) < 0.2 * side for u, v in centres)
            print(f"detect[{face_px} px faces, {name}]: {1000 * t / len(frames):.1f} ms, found {found}/{len(frames)}")
    from preprocessing import detect_faces, get_embedder

    frames = _frames(images, 150, rng)
    faces = [detect_faces(f, upsample=0) for f, _ in frames]
    t0 = time.perf_counter()
    for (f, _), fs in zip(frames, faces):
        detect_faces(f, upsample=0)
    t_with = (time.perf_counter() - t0) / len(frames)
    t_hog = sum(_time(lambda f=f: _detector(1.0, 0, False)(f)) for f, _ in frames) / len(frames)
    print(f"landmarks_ms: {1000 * (t_with - t_hog):.1f} (detect_faces upsample 0 minus the HOG call alone, 150 px faces)")
    embedder = get_embedder("facenet")
    t0 = time.perf_counter()
    for (f, _), fs in zip(frames, faces):
        embedder.crops(f, fs[:1])
    print(f"align_ms: {1000 * (time.perf_counter() - t0) / len(frames):.2f} (one 160x160 crop)")


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def embedding(reps: int) -> None:
    import tensorflow as tf

    from preprocessing import facenet

    model = facenet.load_model()
    crop = np.random.default_rng(0).integers(0, 256, (1, 160, 160, 3)).astype(np.uint8)
    x = tf.constant(facenet.prewhiten(crop))
    spec = [tf.TensorSpec((None, 160, 160, 3), tf.float32)]
    styles: dict[str, Callable[[Any], Any]] = {
        "predict": lambda v: model.predict(v, verbose=0),
        "eager model(x)": lambda v: model(v, training=False),
        "tf.function (used)": facenet._forward,
        "tf.function jit_compile (XLA)": tf.function(lambda v: model(v, training=False), input_signature=spec,
                                                     jit_compile=True),
    }
    reference = facenet._forward(x).numpy()
    for name, fn in styles.items():
        first = _time(lambda: np.asarray(fn(x)))
        times = []
        for _ in range(reps):
            times.append(_time(lambda: np.asarray(fn(x))))
        diff = float(np.abs(np.asarray(fn(x)) - reference).max())
        print(f"embed[{name}]: {1000 * float(np.median(times)):.1f} ms median of {reps}, first call {first:.2f} s, "
              f"max difference {diff:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=FACES / "lfw10")
    parser.add_argument("--face-sizes", default="50,60,70,110,160", help="face box sizes in pixels, comma-separated")
    parser.add_argument("--reps", type=int, default=30, help="FaceNet calls per style")
    parser.add_argument("--skip-embed", action="store_true")
    args = parser.parse_args(argv)
    images = sorted(args.dataset.glob("*/*.jpg"))
    if not images:
        parser.error(f"{args.dataset}: no <person>/<image>.jpg")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    detection(images, [int(s) for s in args.face_sizes.split(",")])
    if not args.skip_embed:
        embedding(args.reps)
    print(f"machine: load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
