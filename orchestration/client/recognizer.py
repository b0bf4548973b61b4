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
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np

from preprocessing.fileio import atomic_write_bytes
from preprocessing.video import FrameSlot, read_frames

from orchestration.client.app import UNKNOWN_PERSON, FaceSettings, default_threshold, recognise
from orchestration.mpspdz.toolchain import MPSPDZ
from orchestration.client.private import Layout, PredictReport, load_client_model

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


class _Output:
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


@dataclass
class _Work:
    """One frame on its way through the pipeline."""

    index: int
    frame: np.ndarray  # BGR, as read
    t_read: float
    rgb: np.ndarray | None = None  # the frame in RGB, from detection to embedding
    faces: list[Any] = field(default_factory=list)  # DetectedFace
    embeddings: np.ndarray | None = None
    detect_seconds: float = 0.0
    embed_seconds: float = 0.0


@dataclass
class _Done:
    result: FrameResult
    frame: np.ndarray
    reports: list[PredictReport]


_DROPPED = "dropped"


class _Pipeline:
    """The threads after the reader: detect, embed, recognise, one thread each; results (fates) by frame index.

    Each hand-over (reader -> detect -> embed -> recognise) holds one item. Without ``drop`` a full
    one makes the stage before it wait: every frame is processed. With ``drop`` the newest item
    replaces the waiting one, which is dropped, so that every stage starts on the newest frame it
    can have and a result comes about one pass through the stages after its frame was read. (Making
    the stages before a slow one wait instead would spend no work on frames that are dropped later,
    but every hand-over would then hold a frame that ages while the slow stage works: measured with
    a 0.25 s recogniser, results came 1.5 s after their frame.) Every frame put into ``work`` ends
    with a fate: a :class:`_Done` or ``_DROPPED``.
    """

    def __init__(self, recognizer: FaceRecognizer, *, drop: bool):
        self.recognizer = recognizer
        self.cond = threading.Condition()
        self.fates: dict[int, _Done | str] = {}
        self.error: BaseException | None = None
        stages = [("detect", self._detect), ("embed", self._embed), ("recognise", self._recognise)]
        self.slots = [FrameSlot(1, drop=drop, on_drop=self._dropped) for _ in stages]  # each stage's input
        self.work = self.slots[0]
        outputs: list[FrameSlot | None] = [*self.slots[1:], None]
        self.threads = [threading.Thread(target=self._stage, args=(inp, fn, out), daemon=True, name=f"video-{name}")
                        for (name, fn), inp, out in zip(stages, self.slots, outputs)]

    def start(self) -> _Pipeline:
        for t in self.threads:
            t.start()
        return self

    def _post(self, index: int, fate: _Done | str) -> None:
        with self.cond:
            self.fates[index] = fate
            self.cond.notify_all()

    def _dropped(self, work: _Work) -> None:
        self._post(work.index, _DROPPED)

    def _stage(self, inp: FrameSlot, fn: Callable[[_Work], _Work | None], out: FrameSlot | None) -> None:
        try:
            while (work := inp.get()) is not None:
                done = fn(work)
                if done is not None and out is not None and not out.put(done):
                    self._dropped(done)  # the pipeline was cancelled
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread, which raises it
            with self.cond:
                self.error = self.error or exc
                self.cond.notify_all()
            self.cancel()
        finally:
            if out is not None:
                out.close()

    def _detect(self, work: _Work) -> _Work | None:
        work.rgb = cv2.cvtColor(work.frame, cv2.COLOR_BGR2RGB)
        t0 = time.monotonic()
        work.faces = self.recognizer.detect(work.rgb)
        t1 = time.monotonic()
        work.detect_seconds = t1 - t0
        if work.faces:
            return work
        self._post(work.index, _Done(FrameResult(work.index, [], work.detect_seconds, 0, work.detect_seconds,
                                                 latency=t1 - work.t_read), work.frame, []))
        return None

    def _embed(self, work: _Work) -> _Work:
        t0 = time.monotonic()
        work.embeddings = self.recognizer.embed(work.rgb, work.faces)
        work.embed_seconds = time.monotonic() - t0
        work.rgb = None
        return work

    def _recognise(self, work: _Work) -> None:
        t0 = time.monotonic()
        names, reports = self.recognizer.recognise_embeddings(work.embeddings)
        t1 = time.monotonic()
        faces = [FaceResult(tuple(int(v) for v in f.location), n, float(c)) for f, (n, c) in zip(work.faces, names)]
        result = FrameResult(work.index, faces, work.detect_seconds + work.embed_seconds + (t1 - t0), len(reports),
                             work.detect_seconds, work.embed_seconds, t1 - t0, t1 - work.t_read)
        self._post(work.index, _Done(result, work.frame, reports))

    def cancel(self) -> None:
        """Stop taking frames; those still waiting in a slot are dropped."""
        for slot in self.slots:
            for work in slot.cancel():
                self._dropped(work)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def check(self) -> None:
        if self.error is not None:
            raise self.error


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

        t0 = time.monotonic()
        blank = np.zeros((64, 64, 3), np.uint8)
        detect_faces(blank, model=self.face.detector, upsample=0)
        face_landmarks(blank, [(8, 56, 56, 8)])
        size = int(getattr(self.embedder, "crop_size", 160))
        self.embedder.embed_crops([np.zeros((size, size, 3), np.uint8)])
        return time.monotonic() - t0

    def detect(self, rgb: np.ndarray) -> list[Any]:
        """The faces (with landmarks) of an RGB frame, largest first."""
        from preprocessing import detect_faces

        return detect_faces(rgb, model=self.face.detector, upsample=self.face.upsample)

    def embed(self, rgb: np.ndarray, faces: Sequence[Any]) -> np.ndarray:
        """Aligned and embedded faces, one row per face."""
        return self.embedder.embed(rgb, faces)

    def recognise_embeddings(self, embeddings: np.ndarray) -> tuple[list[tuple[str, float]], list[PredictReport]]:
        """Names and confidences of one frame's faces, recognised together (one MPC run or one request)."""
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
        return ([FaceResult(tuple(int(v) for v in f.location), n, float(c)) for f, (n, c) in zip(faces, names)],
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
        out = _Output(report, output, stills_dir, window, on_frame)
        try:
            report.startup_seconds = self.warm_up()
            t_start = time.monotonic()
            frames = read_frames(capture, live=live, label=label)
            if max_frames is not None:
                frames = itertools.islice(frames, int(max_frames))
            if report.pipelined:
                self._run_pipelined(frames, out, every=every, drop=live or bool(realtime),
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
                _close_windows()
        report.frames.sort(key=lambda r: r.index)
        logger.info("%s", report.summary())
        return report

    def _run_sequential(self, frames: Iterator[tuple[int, np.ndarray]], out: _Output, *, every: int,
                        live: bool) -> None:
        """One frame after the other: read, (detect, embed, recognise), write."""
        report = out.report
        try:
            for index, frame in frames:
                frame = _bgr(frame)
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

    def _run_pipelined(self, frames: Iterator[tuple[int, np.ndarray]], out: _Output, *, every: int, drop: bool,
                       pace: bool, live: bool) -> None:
        """Read and write here; detect, embed and recognise in three threads (see the module's docstring).

        Frames are written in source order once their fate is known; with ``drop``, at most
        ``max(4, fps)`` frames wait to be written: beyond that the oldest is written with the
        boxes known so far (its result, when it comes, still counts and goes to ``on_frame``)."""
        report = out.report
        pipe = _Pipeline(self, drop=drop).start()
        pending: deque[tuple[int, np.ndarray]] = deque()  # read, not yet written, in order
        skipped: set[int] = set()  # not due for processing (every > 1)
        backlog = max(4, math.ceil(report.fps)) if drop else None
        written = -1  # the last index written

        def consume(fate: _Done | str) -> None:
            if fate == _DROPPED:
                report.frames_dropped += 1
            else:
                out.processed(fate.result, fate.frame, fate.reports)

        def take(index: int) -> _Done | str | None:
            with pipe.cond:
                return pipe.fates.pop(index, None)

        def flush(wait: bool) -> bool:
            """Write the frames whose fate is known (waiting for each with ``wait``); False to stop."""
            nonlocal written
            while pending:
                index, frame = pending[0]
                with pipe.cond:
                    while wait and index not in skipped and index not in pipe.fates and pipe.error is None:
                        pipe.cond.wait()
                    late = sorted(i for i in pipe.fates if i <= written)
                pipe.check()
                for i in late:  # results of frames written before they came
                    consume(take(i))
                fate = take(index)
                if fate is None and index not in skipped:
                    if backlog is None or len(pending) <= backlog:
                        return True
                    logger.debug("%s frame %d: written before its result (recognition is behind)", report.source,
                                 index)
                skipped.discard(index)
                pending.popleft()
                written = index
                try:
                    if fate is not None:
                        consume(fate)
                finally:
                    going_on = out.write(frame)  # with the boxes of the last result, its own if processed
                if not going_on:
                    return False
            return True

        try:
            try:
                t_first: float | None = None
                for index, frame in frames:
                    frame = _bgr(frame)
                    t_read = time.monotonic()
                    t_first = t_read if t_first is None else t_first
                    report.frames_read += 1
                    out.first(frame)
                    if index % every == 0:
                        pipe.work.put(_Work(index, frame, t_read))  # waits for the pipeline, or drops, see _Pipeline
                    else:
                        skipped.add(index)
                    pending.append((index, frame))  # after put: every pending frame due for processing gets a fate
                    report.max_unwritten = max(report.max_unwritten, len(pending))
                    pipe.check()
                    if not flush(wait=False):
                        break
                    if pace:  # a file at its own frame rate: the next frame is due at (index + 1) / fps
                        time.sleep(max(0.0, t_first + (index + 1) / report.fps - time.monotonic()))
            except KeyboardInterrupt:
                if not live:
                    raise
                logger.info("%s: stopped by Ctrl-C", report.source)  # the usual way to end a camera run
                pipe.cancel()  # what waits is dropped; the frames in the stages finish
            pipe.work.close()
            flush(wait=True)
            pipe.join()
            with pipe.cond:
                rest = sorted(pipe.fates)
            for i in rest:
                consume(take(i))
        except BaseException:
            pipe.cancel()
            pipe.join(timeout=5.0)
            raise
        finally:
            report.max_waiting = max(slot.high_water for slot in pipe.slots)


def _bgr(frame: np.ndarray) -> np.ndarray:
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


def _close_windows() -> None:
    try:
        cv2.destroyAllWindows()
    except cv2.error:
        pass


def recognise_video(mp: MPSPDZ | None, layout: Layout, source: str | Path | int, output: str | Path | None = None, *,
                    face: FaceSettings | None = None, threshold: float | None = None, frames_dir=None,
                    every: int = 1, show: bool = False, max_frames: int | None = None, host: str = "127.0.0.1",
                    timeout: float = 600.0, service: Any = None, realtime: bool = False) -> VideoReport:
    """Flat-function form of ``FaceRecognizer(...).run(...)``."""
    return FaceRecognizer(mp, layout, face, threshold, host=host, timeout=timeout, service=service).run(
        source, output, frames_dir=frames_dir, every=every, show=show, max_frames=max_frames, realtime=realtime)


__all__ = ["CODECS", "FaceRecognizer", "FaceResult", "FrameResult", "RecognizerError", "VideoReport", "annotate",
           "codec_for", "display_available", "recognise_video"]
