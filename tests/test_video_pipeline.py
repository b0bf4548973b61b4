"""The pipelined video mode with a stand-in for the service: frames are dropped, never queued without bound.

The recogniser here is a stub with the service client's ``recognise(embeddings, threshold)`` that
sleeps, so recognition is the slow stage; detection and embedding are the real dlib ones on LFW
faces. No MP-SPDZ needed (the real service is exercised in tests/test_recognizer.py).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers_video import FRAME_SIZE, blank_frame, read_rgb, read_video, single_frame, write_video
from orchestration.client import recognizer as recognizer_mod
from orchestration.client.app import FaceSettings
from orchestration.client.jobs import Prediction
from orchestration.client.private import Layout
from orchestration.client.recognizer import FaceRecognizer, FrameResult
from orchestration.client.service import ServiceAnswer
from orchestration.shared.wire import ServiceError
from preprocessing.video import FrameSlot

FACE = FaceSettings(backend="dlib", detector="hog", upsample=0)
CLASSES = ["Ann", "Bob"]
FPS = 25.0
N_FRAMES = 40


class SlowService:
    """Answers every face with class ``label`` after ``seconds``; fails from call ``fail_at`` on."""

    def __init__(self, seconds: float, label: int = 0, fail_at: int | None = None):
        self.seconds, self.label, self.fail_at = seconds, label, fail_at
        self.calls = 0
        self.busy = 0
        self.most_busy = 0  # concurrent calls: the client is not thread-safe, the pipeline must not overlap them
        self.lock = threading.Lock()

    def recognise(self, embeddings: np.ndarray, threshold: float) -> ServiceAnswer:
        with self.lock:
            self.calls += 1
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
            call = self.calls
        try:
            assert embeddings.ndim == 2 and embeddings.shape[1] == 128
            time.sleep(self.seconds)
            if self.fail_at is not None and call >= self.fail_at:
                raise ServiceError("server 1 did not answer within 30 s", "unavailable")
            return ServiceAnswer([Prediction(self.label, 0.9, self.label, 2.0) for _ in embeddings], "gen0", self.seconds)
        finally:
            with self.lock:
                self.busy -= 1


class FakeCamera:
    """A cv2.VideoCapture look-alike that gives frames at ``fps`` (read blocks like a camera's)."""

    def __init__(self, frames: list[np.ndarray], fps: float = FPS):
        self.frames, self.fps, self.k = frames, fps, 0
        self.next_at = time.monotonic()

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.k >= len(self.frames):
            return False, None
        time.sleep(max(0.0, self.next_at - time.monotonic()))
        self.next_at += 1.0 / self.fps
        self.k += 1
        return True, self.frames[self.k - 1].copy()

    def grab(self) -> bool:
        return self.read()[0]

    def get(self, prop: int) -> float:
        return self.fps if prop == cv2.CAP_PROP_FPS else 0.0

    def isOpened(self) -> bool:  # noqa: N802 - cv2's name
        return True

    def release(self) -> None:
        pass


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """A client folder with a model record only: the stub answers in place of the servers."""
    lay = Layout(tmp_path_factory.mktemp("var"))
    lay.client.mkdir(parents=True)
    (lay.client / "model.json").write_text(json.dumps({"classes": CLASSES, "d": 128, "threshold": 0.5, "threshold_score": "zmax", "run_id": "r0",
                                                    "gen": "gen0"}))
    return lay


@pytest.fixture(scope="module")
def frames_bgr(lfw10: Path) -> list[np.ndarray]:
    """N_FRAMES frames: one LFW face each (a new image every 5 frames), the face always in the left half."""
    images = [read_rgb(p) for p in sorted((lfw10 / "Colin_Powell").glob("*.jpg"))[:N_FRAMES // 5]]
    return [cv2.cvtColor(single_frame(images[k // 5]), cv2.COLOR_RGB2BGR) for k in range(N_FRAMES)]


@pytest.fixture(scope="module")
def video(frames_bgr: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    rgb = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames_bgr]
    return write_video(tmp_path_factory.mktemp("video") / "faces.avi", rgb, fps=FPS)


def _boxed(frame: np.ndarray, source: np.ndarray, location) -> bool:
    """Is the box of ``location`` drawn on ``frame`` (its border differs from the source)?"""
    top, right, bottom, left = location
    mask = np.zeros(frame.shape[:2], np.uint8)
    cv2.rectangle(mask, (left, top), (right, bottom), 1, 2)
    on = mask.astype(bool)
    return np.abs(frame[on].astype(int) - source[on].astype(int)).mean() > 40


def _no_pipeline_threads_left(timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith("video-")]:
            return True
        time.sleep(0.05)
    return False


# ---- FrameSlot -------------------------------------------------------------------------------------

def test_slot_makes_the_producer_wait_when_full() -> None:
    slot = FrameSlot(1)
    assert slot.put("a")
    done = threading.Event()
    threading.Thread(target=lambda: (slot.put("b"), done.set()), daemon=True).start()
    assert not done.wait(0.2)  # blocked: the slot holds "a"
    assert slot.get() == "a"
    assert done.wait(2.0) and slot.get() == "b"
    assert slot.high_water == 1 and slot.dropped == 0


def test_slot_with_drop_keeps_the_newest_and_counts_the_rest() -> None:
    dropped: list[int] = []
    slot = FrameSlot(1, drop=True, on_drop=dropped.append)
    for k in range(5):
        assert slot.put(k)  # never blocks
    assert slot.get() == 4 and dropped == [0, 1, 2, 3] and slot.dropped == 4 and slot.high_water == 1
    slot.put(5)
    slot.close()
    assert not slot.put(6)
    assert slot.get() == 5 and slot.get() is None  # closed: what waited, then None


def test_slot_cancel_discards_and_wakes_a_blocked_producer() -> None:
    slot = FrameSlot(2)
    slot.put(1)
    slot.put(2)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(slot.put(3)), daemon=True)
    t.start()
    time.sleep(0.1)
    assert slot.cancel() == [1, 2]
    t.join(2.0)
    assert result == [False] and slot.get() is None and slot.dropped == 0


def test_slot_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="a slot holds 1 or more items, got size 0"):
        FrameSlot(0)


# ---- the pipeline ----------------------------------------------------------------------------------

def test_a_file_is_processed_frame_by_frame_by_default(layout: Layout, video: Path, tmp_path: Path) -> None:
    service = SlowService(0.02, label=1)
    seen: list[int] = []
    report = FaceRecognizer(None, layout, FACE, service=service).run(
        video, tmp_path / "out.avi", on_frame=lambda r: seen.append(r.index))
    assert report.pipelined and report.service
    assert report.frames_read == report.frames_processed == N_FRAMES and report.frames_dropped == 0
    assert seen == list(range(N_FRAMES)) and [r.index for r in report.frames] == seen
    assert all(len(r.faces) == 1 and r.faces[0].name == "Bob" for r in report.frames)
    assert service.calls == N_FRAMES and service.most_busy == 1
    assert report.max_waiting == 1
    stages = report.stage_ms()
    assert stages["detect"] > 0 and stages["embed"] > 0 and stages["recognise"] >= 20
    assert len(read_video(tmp_path / "out.avi")) == N_FRAMES
    assert _no_pipeline_threads_left()


def test_realtime_drops_frames_when_recognition_is_slow(layout: Layout, video: Path, frames_bgr: list[np.ndarray],
                                                        tmp_path: Path) -> None:
    service = SlowService(0.25)  # 4 frames/s against a 25 fps file
    t0 = time.monotonic()
    report = FaceRecognizer(None, layout, FACE, service=service).run(video, tmp_path / "out.mp4", realtime=True)
    wall = time.monotonic() - t0
    assert wall >= N_FRAMES / FPS * 0.9  # read at the file's rate
    assert report.frames_read == N_FRAMES
    assert report.frames_dropped > N_FRAMES // 2 and report.frames_processed >= 2
    assert report.frames_processed + report.frames_dropped == report.frames_read
    assert service.calls == report.frames_processed and service.most_busy == 1
    # bounded: one frame waits in each hand-over at most, and at most about a second of frames waits to be written
    assert report.max_waiting == 1
    assert report.max_unwritten <= FPS + 1
    indices = [r.index for r in report.frames]
    assert indices == sorted(set(indices))
    # the output keeps every frame; from the first processed one on, each carries the boxes of the last
    # processed frame before it (its own when it was processed)
    out = read_video(tmp_path / "out.mp4")
    assert len(out) == N_FRAMES
    for k in range(indices[0], N_FRAMES):
        last = max((r for r in report.frames if r.index <= k), key=lambda r: r.index)
        assert _boxed(out[k], frames_bgr[k], last.faces[0].location), f"frame {k}: not the boxes of {last.index}"
    assert _no_pipeline_threads_left()


def test_a_camera_always_drops(layout: Layout, frames_bgr: list[np.ndarray], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    camera = FakeCamera(frames_bgr)
    monkeypatch.setattr(recognizer_mod, "_open_source", lambda source: (camera, f"camera {source}", True))
    report = FaceRecognizer(None, layout, FACE, service=SlowService(0.2)).run(0, tmp_path / "cam.avi", max_frames=30)
    assert report.frames_read == 30 and report.frames_dropped > 0
    assert report.frames_processed + report.frames_dropped == 30
    assert report.max_waiting == 1 and len(read_video(tmp_path / "cam.avi")) == 30
    with pytest.raises(ValueError, match="camera 0: a camera is always read pipelined"):
        FaceRecognizer(None, layout, FACE, service=SlowService(0.0)).run(0, pipeline=False)


def test_ctrl_c_on_a_camera_keeps_what_was_read(layout: Layout, frames_bgr: list[np.ndarray], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    camera = FakeCamera(frames_bgr * 5)  # 8 s: still running when the interrupt comes
    monkeypatch.setattr(recognizer_mod, "_open_source", lambda source: (camera, f"camera {source}", True))
    processed: list[FrameResult] = []

    def on_frame(result: FrameResult) -> None:
        processed.append(result)
        if len(processed) == 2:
            raise KeyboardInterrupt

    report = FaceRecognizer(None, layout, FACE, service=SlowService(0.1)).run(0, tmp_path / "cam.mp4",
                                                                               on_frame=on_frame)
    assert report.frames_read < 5 * N_FRAMES  # stopped early
    assert report.frames_processed >= 2 and report.frames_processed + report.frames_dropped == report.frames_read
    assert report.output == tmp_path / "cam.mp4"
    assert len(read_video(report.output)) == report.frames_read
    assert _no_pipeline_threads_left()


def test_every_k_with_the_pipeline(layout: Layout, video: Path, tmp_path: Path) -> None:
    report = FaceRecognizer(None, layout, FACE, service=SlowService(0.0)).run(video, tmp_path / "e.avi", every=3)
    assert [r.index for r in report.frames] == list(range(0, N_FRAMES, 3))
    assert report.frames_dropped == 0 and report.frames_read == N_FRAMES
    assert len(read_video(tmp_path / "e.avi")) == N_FRAMES


def test_frames_without_faces_need_no_recognition(layout: Layout, tmp_path: Path) -> None:
    video = write_video(tmp_path / "blank.avi", [blank_frame()] * 6, fps=FPS)
    service = SlowService(0.0)
    report = FaceRecognizer(None, layout, FACE, service=service).run(video, tmp_path / "b.avi")
    assert report.frames_processed == 6 and report.faces == 0 and service.calls == 0
    assert report.stage_ms()["recognise"] == 0.0 and report.size == FRAME_SIZE


def test_a_failing_service_stops_the_run_and_leaves_no_output(layout: Layout, video: Path, tmp_path: Path) -> None:
    service = SlowService(0.01, fail_at=3)
    with pytest.raises(ServiceError, match="server 1 did not answer within 30 s"):
        FaceRecognizer(None, layout, FACE, service=service).run(video, tmp_path / "out.mp4")
    assert not list(tmp_path.iterdir())  # neither the video nor its temporary file
    assert _no_pipeline_threads_left()
    with pytest.raises(ServiceError):
        FaceRecognizer(None, layout, FACE, service=SlowService(0.01, fail_at=1)).run(video, realtime=True)
    assert _no_pipeline_threads_left()


def test_realtime_needs_the_pipeline(layout: Layout, video: Path) -> None:
    with pytest.raises(ValueError, match="realtime reading drops frames, which needs the pipeline"):
        FaceRecognizer(None, layout, FACE, service=SlowService(0.0)).run(video, realtime=True, pipeline=False)


def test_no_service_and_no_mpspdz_is_a_clear_error(layout: Layout) -> None:
    with pytest.raises(ValueError, match="no MP-SPDZ installation and no service"):
        FaceRecognizer(None, layout, FACE)
