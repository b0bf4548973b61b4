"""Private recognition of every face in a video or a camera stream, with an annotated video out.

For one frame in ``every`` the client finds all faces, embeds them and sends the whole frame's
embeddings to the two servers as ONE MPC run (frames without faces need no run). Each face gets
a box and ``name confidence`` drawn on it (known people in green, ``unknown_person`` in red).

Frames that are not processed (``every > 1``) are written to the output video with the boxes
of the last processed frame, so the video does not flicker; a processed frame without faces
clears them. Processed frames can also be saved as PNG stills.

The output video is written under a temporary name beside the target and renamed when complete;
its codec follows the suffix: ``.mp4`` -> mp4v, ``.avi`` -> MJPG (both work in the
opencv-python-headless FFmpeg build; H.264 "avc1" does not).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from preprocessing.fileio import atomic_write_bytes
from preprocessing.video import read_frames

from .app import UNKNOWN_PERSON, FaceSettings, default_threshold, recognise
from .mpspdz import MPSPDZ
from .private import Layout, PredictReport, load_client_model

logger = logging.getLogger(__name__)

Location = tuple[int, int, int, int]  # (top, right, bottom, left)

CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
KNOWN_COLOUR = (0, 200, 0)  # BGR green
UNKNOWN_COLOUR = (0, 0, 255)  # BGR red
WINDOW = "private face recognition"
DEFAULT_FPS = 25.0


class RecognizerError(RuntimeError):
    """A video/camera that cannot be read, or an output that cannot be written."""


@dataclass
class FaceResult:
    location: Location
    name: str  # a person's name or "unknown_person"
    confidence: float


@dataclass
class FrameResult:
    index: int  # 0-based position of the frame in the source
    faces: list[FaceResult]
    seconds: float  # detection, embedding and MPC for this frame
    mpc_runs: int = 0  # 1 when the frame has faces (all of them go in one run), else 0


@dataclass
class VideoReport:
    source: str
    frames: list[FrameResult] = field(default_factory=list)  # processed frames only, in order
    frames_read: int = 0
    frames_processed: int = 0
    faces: int = 0
    mpc_runs: int = 0
    seconds: float = 0.0  # wall time of the whole run
    mpc_seconds: float = 0.0
    mb_sent: float = 0.0  # between the two servers, all runs
    output: Path | None = None
    codec: str | None = None
    fps: float = 0.0
    size: tuple[int, int] | None = None  # (width, height)
    stills: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        out = f" -> {self.output} ({self.codec}, {self.fps:.1f} fps)" if self.output else ""
        return (f"{self.source}: {self.frames_read} frames read, {self.frames_processed} processed, "
                f"{self.faces} faces in {self.mpc_runs} MPC runs ({self.mpc_seconds:.1f} s, "
                f"{self.mb_sent:.1f} MB between the servers), {self.seconds:.1f} s in all{out}")


def codec_for(path: Path) -> str:
    """The fourcc used for an output suffix; ValueError naming the path for any other suffix."""
    codec = CODECS.get(Path(path).suffix.lower())
    if codec is None:
        raise ValueError(f"{path}: output video must end in {' or '.join(CODECS)} "
                         f"({', '.join(f'{s} -> {c}' for s, c in CODECS.items())})")
    return codec


def display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def annotate(frame_bgr: np.ndarray, faces: Sequence[FaceResult]) -> np.ndarray:
    """A copy of the frame with a box and ``name confidence`` on each face."""
    out = frame_bgr.copy()
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1
    for f in faces:
        top, right, bottom, left = (int(v) for v in f.location)
        colour = UNKNOWN_COLOUR if f.name == UNKNOWN_PERSON else KNOWN_COLOUR
        cv2.rectangle(out, (left, top), (right, bottom), colour, 2)
        label = f"{f.name.replace('_', ' ')} {f.confidence:.2f}"
        (tw, th), base = cv2.getTextSize(label, font, scale, thick)
        y0 = top - th - base - 4 if top - th - base - 4 >= 0 else top  # above the box, else inside it
        cv2.rectangle(out, (left, y0), (left + tw + 4, y0 + th + base + 4), colour, cv2.FILLED)
        cv2.putText(out, label, (left + 2, y0 + th + 2), font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


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


class _Writer:
    """cv2.VideoWriter into a temporary file beside ``path``; renamed to ``path`` by ``commit``."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        self.path = Path(path)
        self.codec = codec_for(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecognizerError(f"{self.path}: cannot create the output folder ({exc})") from exc
        if not os.access(self.path.parent, os.W_OK):
            raise RecognizerError(f"{self.path}: output folder {self.path.parent} is not writable")
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp{self.path.suffix}")
        self.size = size
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*self.codec), fps, size)
        if not self.writer.isOpened():
            self.writer.release()
            self.tmp.unlink(missing_ok=True)
            raise RecognizerError(f"{self.path}: cv2.VideoWriter cannot write {self.codec} video here "
                                  f"({size[0]}x{size[1]} at {fps:.1f} fps)")

    def write(self, frame_bgr: np.ndarray) -> None:
        if (frame_bgr.shape[1], frame_bgr.shape[0]) != self.size:
            frame_bgr = cv2.resize(frame_bgr, self.size)
        self.writer.write(frame_bgr)

    def commit(self) -> None:
        self.writer.release()
        if not self.tmp.exists() or self.tmp.stat().st_size == 0:
            raise RecognizerError(f"{self.path}: cv2.VideoWriter produced no data")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.release()
        self.tmp.unlink(missing_ok=True)


class FaceRecognizer:
    """Detect, embed and privately recognise every face of a frame (one MPC run per frame)."""

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
        self.embedder = get_embedder(self.face.backend)

    def recognise_frame(self, frame_bgr: np.ndarray) -> tuple[list[FaceResult], list[PredictReport]]:
        """All faces of one BGR frame (largest first) and the reports of the (single) MPC run."""
        from preprocessing import detect_faces

        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        faces = detect_faces(rgb, model=self.face.detector, upsample=self.face.upsample)
        if not faces:
            return [], []
        emb = self.embedder.embed(rgb, faces)
        names, reports = recognise(self.mp, self.layout, emb, self.threshold, host=self.host, timeout=self.timeout,
                                   batch=len(faces), service=self.service)
        return [FaceResult(tuple(int(v) for v in f.location), n, float(c))
                for f, (n, c) in zip(faces, names)], reports

    def run(self, source: str | Path | int, output: str | Path | None = None, *, frames_dir: str | Path | None = None,
            every: int = 1, show: bool = False, max_frames: int | None = None,
            on_frame: Callable[[FrameResult], None] | None = None) -> VideoReport:
        """Recognise a video file (path) or a camera (int index); write the annotated video to ``output``.

        ``every``: process one frame in K. ``max_frames``: stop after reading this many frames
        (a camera otherwise runs until Ctrl-C, or ``q``/Esc in the ``show`` window).
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

        capture, label, live = _open_source(source)
        report = VideoReport(source=label)
        fps = capture.get(cv2.CAP_PROP_FPS)
        report.fps = float(fps) if fps and 0 < fps <= 240 else DEFAULT_FPS
        writer: _Writer | None = None
        shown: list[FaceResult] = []
        t_start = time.monotonic()
        try:
            try:
                for index, frame in read_frames(capture, live=live, label=label):
                    if max_frames is not None and index >= int(max_frames):
                        break
                    if frame.ndim == 2:
                        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
                    report.frames_read += 1
                    if report.size is None:
                        report.size = (frame.shape[1], frame.shape[0])
                        if output is not None:
                            writer = _Writer(output, report.fps, report.size)
                            report.codec = writer.codec
                    if index % every == 0:
                        shown = self._process(frame, index, label, report, stills_dir, on_frame)
                    annotated = annotate(frame, shown)  # unprocessed frames keep the last boxes
                    if writer is not None:
                        writer.write(annotated)
                    if window:
                        key = _show(annotated)
                        if key is None:
                            window = False
                        elif key in (ord("q"), 27):
                            logger.info("%s: stopped from the window", label)
                            break
            except KeyboardInterrupt:
                if not live:
                    raise
                logger.info("%s: stopped by Ctrl-C", label)  # the usual way to end a camera run
            if report.frames_read == 0:
                raise RecognizerError(f"{label}: no frame could be read")
            if writer is not None:
                writer.commit()
                report.output = output
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            capture.release()
            if window:
                _close_windows()
        report.seconds = time.monotonic() - t_start
        logger.info("%s", report.summary())
        return report

    def _process(self, frame: np.ndarray, index: int, label: str, report: VideoReport, stills_dir: Path | None,
                 on_frame: Callable[[FrameResult], None] | None) -> list[FaceResult]:
        t0 = time.monotonic()
        faces, reports = self.recognise_frame(frame)
        result = FrameResult(index, faces, time.monotonic() - t0, len(reports))
        report.frames.append(result)
        report.frames_processed += 1
        report.faces += len(faces)
        report.mpc_runs += len(reports)
        report.mpc_seconds += sum(r.run.wall_seconds for r in reports)
        report.mb_sent += sum(r.run.data_sent_mb for r in reports)
        if faces:
            logger.info("%s frame %d: %s (%.1f s)", label, index,
                        ", ".join(f"{f.name} {f.confidence:.2f}" for f in faces), result.seconds)
        if stills_dir is not None:
            report.stills.append(_write_still(stills_dir / f"frame_{index:06d}.png", annotate(frame, faces)))
        if on_frame is not None:
            on_frame(result)
        return faces


def _write_still(path: Path, frame_bgr: np.ndarray) -> Path:
    ok, data = cv2.imencode(".png", frame_bgr)
    if not ok:
        raise RecognizerError(f"{path}: PNG encoding failed")
    try:
        atomic_write_bytes(path, data.tobytes())
        path.chmod(0o644)  # the temp file was private (0600); a still is an ordinary output image
    except OSError as exc:
        raise RecognizerError(f"{path}: cannot write still ({exc})") from exc
    return path


def _show(frame_bgr: np.ndarray) -> int | None:
    """Show a frame; the key pressed (-1 for none), or None when there is no usable GUI."""
    try:
        cv2.imshow(WINDOW, frame_bgr)
        return cv2.waitKey(1) & 0xFF
    except cv2.error as exc:  # opencv-python-headless: no GUI backend
        logger.warning("cannot show a window, continuing without it: %s", str(exc).strip().splitlines()[-1])
        return None


def _close_windows() -> None:
    try:
        cv2.destroyAllWindows()
    except cv2.error:
        pass


def recognise_video(mp: MPSPDZ, layout: Layout, source: str | Path | int, output: str | Path | None = None, *,
                    face: FaceSettings | None = None, threshold: float | None = None, frames_dir=None,
                    every: int = 1, show: bool = False, max_frames: int | None = None, host: str = "127.0.0.1",
                    timeout: float = 600.0) -> VideoReport:
    """Flat-function form of ``FaceRecognizer(...).run(...)``."""
    return FaceRecognizer(mp, layout, face, threshold, host=host, timeout=timeout).run(
        source, output, frames_dir=frames_dir, every=every, show=show, max_frames=max_frames)


__all__ = ["CODECS", "FaceRecognizer", "FaceResult", "FrameResult", "RecognizerError", "VideoReport", "annotate",
           "codec_for", "display_available", "recognise_video"]
