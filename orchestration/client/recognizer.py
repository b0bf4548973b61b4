"""Private recognition of every face in a video or a camera stream, with an annotated video out.

For one frame in ``every`` the client finds all faces, embeds them and sends the whole frame's
embeddings to the two servers as ONE recognition (one MPC run, or one request to the running
service; frames without faces need none). Each face gets a box and ``name confidence`` drawn on
it (known people in green, ``unknown_person`` in red).

Frames that are not processed (``every > 1``, or dropped, see below) are written to the output
video with the boxes of the last processed frame before them, so the video keeps every frame and
does not flicker; a processed frame without faces clears them. Processed frames can also be
saved as PNG stills.

**Pipelined mode** (with a service, a camera, or ``realtime``): the stages run at the same time
on successive frames, so the frame rate is set by the slowest stage, not by their sum. The
calling thread reads frames and writes the output; one thread each detects, embeds and
recognises (``FrameSlot`` hand-overs of one item between them; dlib, TensorFlow and the
service's sockets release the GIL). Reading a camera, or a file at its own frame rate
(``realtime``), never waits for recognition: at every hand-over, a frame that arrives while the
previous one still waits replaces it, and the replaced one is counted in ``frames_dropped``. A
video file read as fast as possible (the default) loses no frame: each stage, and the reading,
waits for the next stage instead.
Frames waiting to be written are bounded too: when recognition stalls in a live run, frames are
written with the last boxes rather than queued (at most about one second of frames waits).
Without a service, a file is processed one frame after the other (one MPC job per frame).

The output video is written under a temporary name beside the target and renamed when complete;
its codec follows the suffix: ``.mp4`` -> mp4v, ``.avi`` -> MJPG (both work in the
opencv-python-headless FFmpeg build; H.264 "avc1" does not).
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np

from preprocessing.video import read_frames

from orchestration.client.app import FaceSettings, default_threshold, recognise
from orchestration.mpspdz.toolchain import MPSPDZ
from orchestration.client.private import Layout, PredictReport, load_client_model
from orchestration.client.video_output import (  # noqa: F401  (KNOWN_COLOUR, UNKNOWN_COLOUR, annotate: re-exported)
    CODECS,
    KNOWN_COLOUR,
    UNKNOWN_COLOUR,
    FaceResult,
    FrameOutput,
    FrameResult,
    RecognizerError,
    VideoReport,
    annotate,
    as_bgr,
    close_windows,
    codec_for,
    display_available,
)
from orchestration.client.video_pipeline import run_pipelined

logger = logging.getLogger(__name__)

DEFAULT_FPS = 25.0


def _open_source(source: str | Path | int) -> tuple[Any, str, bool]:
    """(capture, label, live) for a camera index or a video file."""
    if isinstance(source, int):
        capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            capture.release()
            raise RecognizerError(f"camera {source} could not be opened (cv2.VideoCapture({source})): check that a "
                                  f"camera is connected, free, and readable (e.g. /dev/video{source} on Linux)")
        return capture, f"camera {source}", True
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: video file not found")
    if not path.is_file():
        raise RecognizerError(f"{path}: not a video file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise RecognizerError(f"{path}: cannot open as a video (OpenCV/FFmpeg could not decode it)")
    return capture, str(path), False


class FaceRecognizer:
    """Detect, embed and privately recognise every face of a frame (one MPC run per frame, or the service)."""

    def __init__(self, mp: MPSPDZ | None, layout: Layout, face: FaceSettings | None = None,
                 threshold: float | None = None, *, host: str = "127.0.0.1", timeout: float = 600.0,
                 service: Any = None):
        from preprocessing import get_embedder

        self.mp, self.layout = mp, layout
        self.face = face or FaceSettings()
        load_client_model(layout)  # fail now, not at the first face, when there is no model
        self.threshold = default_threshold(layout) if threshold is None else float(threshold)
        self.host, self.timeout = host, timeout
        self.service = service  # a ServiceClient: recognition through the running service
        if service is None and mp is None:
            raise ValueError("no MP-SPDZ installation and no service to recognise with")
        self.embedder = get_embedder(self.face.backend)

    # -- the stages -------------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """Load the detector, landmark and embedding models (and trace the embedder) now; the seconds it took."""
        from preprocessing import detect_faces, face_landmarks
        from preprocessing.faces import frame_detector

        t0 = time.monotonic()
        blank = np.zeros((64, 64, 3), np.uint8)
        detect_faces(blank, model=frame_detector(self.face.detector), upsample=0)
        face_landmarks(blank, [(8, 56, 56, 8)])
        size = int(getattr(self.embedder, "crop_size", 160))
        self.embedder.embed_crops([np.zeros((size, size, 3), np.uint8)])
        return time.monotonic() - t0

    def detect(self, rgb: np.ndarray) -> list[Any]:
        """The faces (with landmarks) of an RGB frame, largest first (the cascade runs as HOG on frames:
        preprocessing.faces.frame_detector)."""
        from preprocessing import detect_faces
        from preprocessing.faces import frame_detector

        return detect_faces(rgb, model=frame_detector(self.face.detector), upsample=self.face.upsample)

    def embed(self, rgb: np.ndarray, faces: Sequence[Any]) -> np.ndarray:
        """Aligned and embedded faces, one row per face."""
        return self.embedder.embed(rgb, faces)

    def recognise_embeddings(self, embeddings: np.ndarray) -> tuple[list[tuple[str, float, float]], list[PredictReport]]:
        """(name, confidence, score) of one frame's faces, recognised together (one MPC run or one request)."""
        return recognise(self.mp, self.layout, embeddings, self.threshold, host=self.host, timeout=self.timeout,
                         batch=len(embeddings), service=self.service)

    def recognise_frame(self, frame_bgr: np.ndarray) -> tuple[list[FaceResult], list[PredictReport]]:
        """All faces of one BGR frame (largest first) and the reports of the (single) MPC run."""
        faces, reports, _ = self._frame(frame_bgr)
        return faces, reports

    def _frame(self, frame_bgr: np.ndarray) -> tuple[list[FaceResult], list[PredictReport], tuple[float, float, float]]:
        """As :meth:`recognise_frame`, with the seconds of each stage (detect, embed, recognise)."""
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        t0 = time.monotonic()
        faces = self.detect(rgb)
        t1 = time.monotonic()
        if not faces:
            return [], [], (t1 - t0, 0.0, 0.0)
        emb = self.embed(rgb, faces)
        t2 = time.monotonic()
        names, reports = self.recognise_embeddings(emb)
        t3 = time.monotonic()
        return ([FaceResult(tuple(int(v) for v in f.location), n, float(c), float(z)) for f, (n, c, z) in zip(faces, names)],
                reports, (t1 - t0, t2 - t1, t3 - t2))

    # -- a whole video ----------------------------------------------------------------------------------

    def run(self, source: str | Path | int, output: str | Path | None = None, *, frames_dir: str | Path | None = None,
            every: int = 1, show: bool = False, max_frames: int | None = None,
            on_frame: Callable[[FrameResult], None] | None = None, realtime: bool = False,
            pipeline: bool | None = None) -> VideoReport:
        """Recognise a video file (path) or a camera (int index); write the annotated video to ``output``.

        ``every``: process one frame in K. ``max_frames``: stop after reading this many frames
        (a camera otherwise runs until Ctrl-C, or ``q``/Esc in the ``show`` window). ``realtime``:
        read a video file at its own frame rate and drop frames when recognition falls behind, as
        a camera does (a camera always does). ``pipeline``: run the stages pipelined (see the
        module's docstring); by default with a service, a camera or ``realtime``, and one after the
        other for a file in the one-job mode. ``pipeline=False`` with a camera or ``realtime`` is a
        ValueError: only the pipeline drops frames.
        """
        every = int(every)
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if max_frames is not None and int(max_frames) < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        output = Path(output) if output is not None else None
        if output is not None:
            codec_for(output)
            if not isinstance(source, int) and output.resolve() == Path(source).resolve():
                raise ValueError(f"{output}: the output would overwrite the source video")
        stills_dir = Path(frames_dir) if frames_dir is not None else None
        if stills_dir is not None:
            try:
                stills_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RecognizerError(f"{stills_dir}: cannot create the stills folder ({exc})") from exc
            if not os.access(stills_dir, os.W_OK):
                raise RecognizerError(f"{stills_dir}: stills folder is not writable")
        window = bool(show) and display_available()
        if show and not window:
            logger.warning("no live window: no display (DISPLAY is not set)")

        if pipeline is False and realtime:
            raise ValueError("realtime reading drops frames, which needs the pipeline: pipeline=False conflicts")
        capture, label, live = _open_source(source)
        if pipeline is False and live:
            capture.release()
            raise ValueError(f"{label}: a camera is always read pipelined (frames are dropped when behind); "
                             "pipeline=False conflicts")
        report = VideoReport(source=label, service=self.service is not None)
        report.pipelined = (self.service is not None or live or bool(realtime)) if pipeline is None else bool(pipeline)
        fps = capture.get(cv2.CAP_PROP_FPS)
        report.fps = float(fps) if fps and 0 < fps <= 240 else DEFAULT_FPS
        out = FrameOutput(report, output, stills_dir, window, on_frame)
        try:
            report.startup_seconds = self.warm_up()
            t_start = time.monotonic()
            frames = read_frames(capture, live=live, label=label)
            if max_frames is not None:
                frames = itertools.islice(frames, int(max_frames))
            if report.pipelined:
                run_pipelined(self, frames, out, every=every, drop=live or bool(realtime),
                              pace=bool(realtime) and not live, live=live)
            else:
                self._run_sequential(frames, out, every=every, live=live)
            if report.frames_read == 0:
                raise RecognizerError(f"{label}: no frame could be read")
            if out.writer is not None:
                out.writer.commit()
                report.output = output
            report.seconds = time.monotonic() - t_start
        except BaseException:
            if out.writer is not None:
                out.writer.abort()
            raise
        finally:
            capture.release()
            if out.window:
                close_windows()
        report.frames.sort(key=lambda r: r.index)
        logger.info("%s", report.summary())
        return report

    def _run_sequential(self, frames: Iterator[tuple[int, np.ndarray]], out: FrameOutput, *, every: int,
                        live: bool) -> None:
        """One frame after the other: read, (detect, embed, recognise), write."""
        report = out.report
        try:
            for index, frame in frames:
                frame = as_bgr(frame)
                t_read = time.monotonic()
                report.frames_read += 1
                out.first(frame)
                if index % every == 0:
                    faces, reports, (t_det, t_emb, t_rec) = self._frame(frame)
                    seconds = time.monotonic() - t_read
                    out.processed(FrameResult(index, faces, seconds, len(reports), t_det, t_emb, t_rec, seconds),
                                  frame, reports)
                if not out.write(frame):  # frames not processed keep the last boxes
                    break
        except KeyboardInterrupt:
            if not live:
                raise
            logger.info("%s: stopped by Ctrl-C", report.source)  # the usual way to end a camera run


def recognise_video(mp: MPSPDZ | None, layout: Layout, source: str | Path | int, output: str | Path | None = None, *,
                    face: FaceSettings | None = None, threshold: float | None = None, frames_dir=None,
                    every: int = 1, show: bool = False, max_frames: int | None = None, host: str = "127.0.0.1",
                    timeout: float = 600.0, service: Any = None, realtime: bool = False) -> VideoReport:
    """Flat-function form of ``FaceRecognizer(...).run(...)``."""
    return FaceRecognizer(mp, layout, face, threshold, host=host, timeout=timeout, service=service).run(
        source, output, frames_dir=frames_dir, every=every, show=show, max_frames=max_frames, realtime=realtime)


__all__ = ["CODECS", "FaceRecognizer", "FaceResult", "FrameResult", "RecognizerError", "VideoReport", "annotate",
           "codec_for", "display_available", "recognise_video"]
