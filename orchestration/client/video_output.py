"""What a video's recognition gives and where its frames go: the results of each frame and the whole run,
the drawing of boxes and names, the annotated video (written aside, renamed when complete), the PNG stills
and the live window. :mod:`orchestration.client.recognizer` produces the results; this module only shows
and writes them (see its docstring for the whole of the video recognition).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from preprocessing.fileio import atomic_write_bytes

from orchestration.client.app import UNKNOWN_PERSON
from orchestration.client.private import PredictReport

logger = logging.getLogger(__name__)

Location = tuple[int, int, int, int]  # (top, right, bottom, left)

CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
KNOWN_COLOUR = (0, 200, 0)  # BGR green
UNKNOWN_COLOUR = (0, 0, 255)  # BGR red
WINDOW = "private face recognition"


class RecognizerError(RuntimeError):
    """A video/camera that cannot be read, or an output that cannot be written."""


@dataclass
class FaceResult:
    location: Location
    name: str  # a person's name or "unknown_person"
    confidence: float  # 1/S, drawn on the frame
    score: float = float("nan")  # the top logit z_max the unknown decision is made on


@dataclass
class FrameResult:
    index: int  # 0-based position of the frame in the source
    faces: list[FaceResult]
    seconds: float  # detection, embedding and recognition of this frame (work, not waiting)
    mpc_runs: int = 0  # 1 when the frame has faces and no service is used (all faces in one run), else 0
    detect_seconds: float = 0.0  # finding the faces and their landmarks
    embed_seconds: float = 0.0  # aligning and embedding them (0 without faces)
    recognise_seconds: float = 0.0  # private recognition: one MPC run or one service request (0 without faces)
    latency: float = 0.0  # from reading the frame to its result, waiting between stages included


@dataclass
class VideoReport:
    source: str
    frames: list[FrameResult] = field(default_factory=list)  # processed frames only, in order
    frames_read: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0  # read, due for processing, but replaced by a newer frame while the pipeline was busy
    faces: int = 0
    mpc_runs: int = 0  # one-job mode only; the service's runs are its own
    seconds: float = 0.0  # wall time from the first frame read to the last frame written
    startup_seconds: float = 0.0  # loading the models before the first frame
    mpc_seconds: float = 0.0
    mb_sent: float = 0.0  # between the two servers, all runs (one-job mode)
    output: Path | None = None
    codec: str | None = None
    fps: float = 0.0  # of the source (and the output video)
    size: tuple[int, int] | None = None  # (width, height)
    stills: list[Path] = field(default_factory=list)
    pipelined: bool = False
    service: bool = False  # recognised through the running service
    max_waiting: int = 0  # pipelined: the most frames that waited at once in any hand-over between stages (1)
    max_unwritten: int = 0  # pipelined: the most frames read and not yet written at once

    @property
    def processed_fps(self) -> float:
        """Frames processed (detected, embedded, recognised) per second of wall time."""
        return self.frames_processed / self.seconds if self.seconds > 0 else 0.0

    def stage_ms(self) -> dict[str, float]:
        """Mean milliseconds per processed frame: ``detect`` over all of them, ``embed`` and ``recognise`` over
        those with faces, ``latency`` (reading to result) over all."""
        with_faces = [r for r in self.frames if r.faces]

        def mean(values: list[float]) -> float:
            return 1000.0 * sum(values) / len(values) if values else 0.0

        return {"detect": mean([r.detect_seconds for r in self.frames]),
                "embed": mean([r.embed_seconds for r in with_faces]),
                "recognise": mean([r.recognise_seconds for r in with_faces]),
                "latency": mean([r.latency for r in self.frames])}

    def summary(self) -> str:
        out = f" -> {self.output} ({self.codec}, {self.fps:.1f} fps)" if self.output else ""
        how = "through the service" if self.service else (f"in {self.mpc_runs} MPC runs ({self.mpc_seconds:.1f} s, "
                                                          f"{self.mb_sent:.1f} MB between the servers)")
        return (f"{self.source}: {self.frames_read} frames read, {self.frames_processed} processed, "
                f"{self.frames_dropped} dropped, {self.faces} faces {how}, {self.seconds:.1f} s in all "
                f"({self.processed_fps:.1f} frames/s processed){out}")


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


class FrameOutput:
    """Where frames go, in source order: the report, the output video, the window, the stills, ``on_frame``."""

    def __init__(self, report: VideoReport, output: Path | None, stills_dir: Path | None, window: bool,
                 on_frame: Callable[[FrameResult], None] | None):
        self.report, self.output, self.stills_dir, self.window = report, output, stills_dir, window
        self.on_frame = on_frame
        self.writer: _Writer | None = None
        self.shown: list[FaceResult] = []  # the boxes drawn on the next frames written: the last result's
        self.shown_index = -1  # the processed frame they come from

    def first(self, frame: np.ndarray) -> None:
        """Called with the first frame read: sizes the output video."""
        if self.report.size is None:
            self.report.size = (frame.shape[1], frame.shape[0])
            if self.output is not None:
                self.writer = _Writer(self.output, self.report.fps, self.report.size)
                self.report.codec = self.writer.codec

    def processed(self, result: FrameResult, frame: np.ndarray, reports: Sequence[PredictReport]) -> None:
        """A frame's result: counted, logged, saved as a still, passed to ``on_frame``; its boxes are shown on
        the frames after it."""
        report = self.report
        report.frames.append(result)
        report.frames_processed += 1
        report.faces += len(result.faces)
        report.mpc_runs += len(reports)
        report.mpc_seconds += sum(r.run.wall_seconds for r in reports)
        report.mb_sent += sum(r.run.data_sent_mb for r in reports)
        if result.faces:
            logger.info("%s frame %d: %s (%.1f s)", report.source, result.index,
                        ", ".join(f"{f.name} {f.confidence:.2f}" for f in result.faces), result.seconds)
        if self.stills_dir is not None:
            report.stills.append(_write_still(self.stills_dir / f"frame_{result.index:06d}.png",
                                              annotate(frame, result.faces)))
        if result.index > self.shown_index:
            self.shown, self.shown_index = result.faces, result.index
        if self.on_frame is not None:
            self.on_frame(result)

    def write(self, frame: np.ndarray) -> bool:
        """Write and show one frame with the current boxes; False when the window asks to stop."""
        annotated = annotate(frame, self.shown)
        if self.writer is not None:
            self.writer.write(annotated)
        if self.window:
            key = _show(annotated)
            if key is None:
                self.window = False
            elif key in (ord("q"), 27):
                logger.info("%s: stopped from the window", self.report.source)
                return False
        return True


def as_bgr(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR) if frame.ndim == 2 else frame


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


def close_windows() -> None:
    try:
        cv2.destroyAllWindows()
    except cv2.error:
        pass

__all__ = ["CODECS", "KNOWN_COLOUR", "UNKNOWN_COLOUR", "FaceResult", "FrameOutput", "FrameResult", "RecognizerError",
           "VideoReport", "annotate", "as_bgr", "close_windows", "codec_for", "display_available"]
