"""Live video through the recognition service, end to end: frames per second and where the time goes.

    python benchmarks/video_service.py                       # 300 frames, 10 people, every frame processed
    python benchmarks/video_service.py --realtime            # the file read at its 25 fps, dropping like a camera
    python benchmarks/video_service.py --var /tmp/v --frames 600 --people 5

Builds a 640x480 MJPG video (in a temp folder) with one face per frame: LFW images of the enrolled
people (lfw10), each shown for ``--hold`` frames (0.4 s at 25 fps), scaled to 200-330 px (faces of
about 120-200 px) on a textured background and drifting a few pixels a frame. Starts the service in
local mode (both servers and, in the dealer mode, the client's dealer on this machine) and runs
``FaceRecognizer`` through it: detection (dlib HOG with 68 landmarks), alignment, FaceNet embedding
and private recognition of every processed frame, with the annotated video written as
``invoke recognize`` writes it.

The model: with ``--var`` holding a trained model, that one (the video then uses the first
``--held-out`` images of each person, which it may have been trained on: the benchmark says so);
otherwise a C=10 model is trained first (in ``--var``, or a temp folder) on lfw10 minus the first
``--held-out`` images of each person, and the video shows only those held-out images.

Prints ``key: value`` lines: frames read, processed and dropped, end-to-end frames per second
(processed frames over the wall time from the first frame read to the last frame written, model
loading excluded and printed apart), mean milliseconds per stage, and the accuracy of the name on
the largest face against the person shown. Speed is printed, never asserted; the machine's load
average is printed beside it (the measurement is only as good as the machine is quiet).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestration.shared import reference  # noqa: E402
from orchestration.client.app import FaceSettings  # noqa: E402
from orchestration.mpspdz.toolchain import find_mpspdz, protocol  # noqa: E402
from orchestration.client.private import Layout  # noqa: E402

logger = logging.getLogger("video_service")

FACES = Path(os.environ.get("FACES_DIR", REPO.parent / "shared" / "faces"))
SIZE = (640, 480)  # (width, height)
CODEC = "MJPG"


def _config() -> dict:
    return yaml.safe_load((REPO / "invoke.yaml").read_text())


def person_images(dataset: Path, people: int) -> dict[str, list[Path]]:
    """The first ``people`` people of the dataset (sorted), their images sorted."""
    folders = sorted(p for p in dataset.iterdir() if p.is_dir())
    if len(folders) < people:
        raise SystemExit(f"--people {people}: {dataset} has only {len(folders)} people")
    return {f.name: sorted(f.glob("*.jpg")) for f in folders[:people]}


def train_model(layout: Layout, images: dict[str, list[Path]], held_out: int, face: FaceSettings, mp) -> int:
    """Train on every image but the first ``held_out`` of each person; the number of training images."""
    from orchestration.client import app

    gallery = layout.root / "bench-gallery"
    n = 0
    for person, paths in images.items():
        (gallery / person).mkdir(parents=True, exist_ok=True)
        for p in paths[held_out:]:
            link = gallery / person / p.name
            if not link.exists():
                link.symlink_to(p)
            n += 1
    cfg = _config()["train"]
    params = reference.TrainParams(epochs=int(cfg["epochs"]), batch=int(cfg["batch"]), lr=float(cfg["lr"]),
                                   alpha=float(cfg["alpha"][face.backend]), exp_bits=int(cfg["exp_bits"]))
    embedded = app.embed_dataset(gallery, layout, face, progress=False)
    t0 = time.monotonic()
    report = app.train(mp, layout, embedded, params, host="127.0.0.1", timeout=600, face=face)
    print(f"trained: {len(report.classes)} people, {report.n} faces, {time.monotonic() - t0:.1f} s "
          f"(threshold {report.threshold.threshold:.4f})")
    return n


def _trained_here(layout: Layout, images: dict[str, list[Path]], held_out: int) -> bool:
    """Was the model in ``layout`` trained by :func:`train_model` on exactly this split?"""
    gallery = layout.root / "bench-gallery"
    if not gallery.is_dir() or not (layout.client / "gallery.npz").exists():
        return False
    linked = {(p.parent.name, p.name) for p in gallery.glob("*/*")}
    wanted = {(person, p.name) for person, paths in images.items() for p in paths[held_out:]}
    return linked == wanted and gallery.stat().st_mtime <= layout.client_model.stat().st_mtime


def _background(rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(0, 256, (SIZE[1], SIZE[0], 3)).astype(np.uint8)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 6), None, 40, 200, cv2.NORM_MINMAX)


def build_video(path: Path, shown: list[tuple[str, Path]], frames: int, fps: float, hold: int,
                seed: int = 0) -> list[str]:
    """Write the video; the person shown in each frame.

    Each image (the central 180x180 of the 250x250 LFW image, which holds the face and little of any
    other) is shown for ``hold`` frames at a size of 200-330 px, moving 0-3 px a frame."""
    rng = np.random.default_rng(seed)
    background = _background(rng)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*CODEC), fps, SIZE)
    if not writer.isOpened():
        raise SystemExit(f"{path}: cv2.VideoWriter cannot write {CODEC}")
    truth: list[str] = []
    try:
        for start in range(0, frames, hold):
            person, image_path = shown[(start // hold) % len(shown)]
            image = cv2.imread(str(image_path))
            if image is None:
                raise SystemExit(f"{image_path}: cannot read")
            h, w = image.shape[:2]
            crop = image[(h - 180) // 2:(h + 180) // 2, (w - 180) // 2:(w + 180) // 2]
            s = int(rng.integers(200, 331))
            face = cv2.resize(crop, (s, s), interpolation=cv2.INTER_LINEAR)
            x, y = rng.uniform(0, SIZE[0] - s), rng.uniform(0, SIZE[1] - s)
            dx, dy = rng.uniform(-3, 3, 2)
            for _ in range(min(hold, frames - start)):
                x, y = float(np.clip(x + dx, 0, SIZE[0] - s)), float(np.clip(y + dy, 0, SIZE[1] - s))
                frame = background.copy()
                frame[int(y):int(y) + s, int(x):int(x) + s] = face
                writer.write(frame)
                truth.append(person)
    finally:
        writer.release()
    return truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--var", type=Path, help="run-state folder with a trained model, or where to train one "
                                                 "(default: a temp folder)")
    parser.add_argument("--frames", type=int, default=300, help="frames in the video")
    parser.add_argument("--people", type=int, default=10, help="enrolled people shown (of lfw10's 10)")
    parser.add_argument("--realtime", action="store_true", help="read the file at its frame rate and drop frames "
                        "when recognition is behind (as a camera); default: process every frame")
    parser.add_argument("--sequential", action="store_true", help="no pipeline: read, detect, embed, recognise and "
                        "write one frame after the other (for comparison)")
    parser.add_argument("--fps", type=float, default=25.0, help="frame rate of the video")
    parser.add_argument("--hold", type=int, default=10, help="frames each image is shown")
    parser.add_argument("--held-out", type=int, default=2, help="images per person kept out of training, shown")
    parser.add_argument("--upsample", type=int, help="detector upsampling (default: invoke.yaml face.upsample)")
    parser.add_argument("--backend", default="facenet", choices=["facenet", "dlib"])
    parser.add_argument("--port", type=int, default=7300, help="the service's first port (local mode)")
    parser.add_argument("--batch", type=int, default=16, help="the service's batch size")
    parser.add_argument("--output", type=Path, help="keep the annotated video here (.mp4 or .avi)")
    parser.add_argument("--dataset", type=Path, default=FACES / "lfw10")
    args = parser.parse_args(argv)
    if args.sequential and args.realtime:
        parser.error("--realtime drops frames, which needs the pipeline: not with --sequential")
    if args.frames < 1 or args.hold < 1 or args.people < 1 or args.held_out < 1:
        parser.error("--frames, --hold, --people and --held-out must be 1 or more")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from orchestration.client.recognizer import FaceRecognizer
    from orchestration.client.service import ServiceClient
    from orchestration.client.local_service import LocalService

    cfg = _config()
    upsample = int(cfg["face"]["upsample"]) if args.upsample is None else args.upsample
    face = FaceSettings(backend=args.backend, detector="hog", upsample=upsample)
    proto_name = cfg["mpspdz"]["protocol"]
    mp = find_mpspdz(None)
    images = person_images(args.dataset, args.people)
    with tempfile.TemporaryDirectory(prefix="video-bench-") as tmp:
        tmp = Path(tmp)
        var = args.var or tmp / "var"
        layout = Layout(root=var, protocol=proto_name)
        if layout.client_model.exists():
            if _trained_here(layout, images, args.held_out):
                print(f"model: from {var}, trained earlier by this benchmark on the same split: the video shows the "
                      f"{args.held_out * len(images)} held-out images ({args.held_out} per person), never trained on")
            else:
                print(f"model: from {var} (the video shows the first {args.held_out} images of each person; that "
                      "model may have been trained on them)")
        else:
            n = train_model(layout, images, args.held_out, face, mp)
            print(f"model: trained in {var} on {n} images; the video shows the {args.held_out * len(images)} "
                  f"held-out ones ({args.held_out} per person), never trained on")
        shown = [(person, p) for k in range(args.held_out) for person, paths in images.items() for p in paths[k:k + 1]]
        video = tmp / "people.avi"
        truth = build_video(video, shown, args.frames, args.fps, args.hold)
        output = args.output or tmp / "annotated.mp4"
        print(f"video: {video.name} {SIZE[0]}x{SIZE[1]} {CODEC} {args.fps:g} fps, {len(truth)} frames, one face per "
              f"frame, {len(shown)} distinct images of {len(images)} people, each for {args.hold} frames")
        mode = "realtime (read at the file rate, frames dropped when behind)" if args.realtime else "every frame processed"
        print(f"mode: {mode}, {'one stage after the other' if args.sequential else 'pipelined'}")
        print(f"detector: hog upsample {upsample}; embedder: {args.backend}; protocol: {proto_name}")
        print(f"machine: {os.cpu_count()} cores, load average before {os.getloadavg()[0]:.2f}")
        with LocalService(mp, layout, protocol(proto_name), port=args.port, batch=args.batch,
                          log_dir=tmp / "service-logs") as svc:
            t0 = time.monotonic()
            svc.wait_ready()
            print(f"service_ready_seconds: {time.monotonic() - t0:.1f}")
            with ServiceClient(layout.client, svc.hosts) as client:
                rec = FaceRecognizer(mp, layout, face, service=client)
                report = rec.run(video, output, realtime=args.realtime, pipeline=not args.sequential)
        load_after = os.getloadavg()[0]

        stages = report.stage_ms()
        correct = sum(1 for r in report.frames if r.faces and r.faces[0].name == truth[r.index])
        no_face = sum(1 for r in report.frames if not r.faces)
        several = sum(1 for r in report.frames if len(r.faces) > 1)
        unknown = sum(1 for r in report.frames if r.faces and r.faces[0].name == "unknown_person")
        written = _count_frames(output)
        print(f"frames_read: {report.frames_read}")
        print(f"frames_processed: {report.frames_processed}")
        print(f"frames_dropped: {report.frames_dropped}")
        print(f"frames_in_output_video: {written}")
        print(f"seconds: {report.seconds:.2f} (model loading before it: {report.startup_seconds:.2f})")
        print(f"end_to_end_fps: {report.processed_fps:.2f} frames processed per second "
              f"({report.frames_read / report.seconds:.2f} frames read and written per second)")
        print(f"stage_ms: detect {stages['detect']:.1f}, embed {stages['embed']:.1f}, "
              f"recognise {stages['recognise']:.1f} (mean per processed frame; the stages overlap)")
        print(f"latency_ms: {stages['latency']:.1f} (frame read to its result)")
        print(f"accuracy: {correct / max(1, report.frames_processed):.4f} ({correct} of {report.frames_processed} "
              f"processed frames named right on the largest face; {no_face} without a face found, {several} with "
              f"more than one, {unknown} unknown_person)")
        print(f"machine: load average after {load_after:.2f}")
        if args.output:
            print(f"annotated video: {output}")
    return 0


def _count_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


if __name__ == "__main__":
    sys.exit(main())
