"""Private recognition of every face in a video, end to end on the real protocol.

A 10-frame video is built (in a temp dir) from held-out LFW images of people the model was
trained on: three people alone (2 frames each), 2 blank frames, 2 frames with two people side
by side. Needs MP-SPDZ: without it these tests FAIL (see tests/test_mpc.py).
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers_video import FRAME_SIZE, blank_frame, pair_frame, read_rgb, read_video, single_frame, write_video
from orchestration.shared import reference
from orchestration.client.app import UNKNOWN_PERSON, FaceSettings
from orchestration.client.private import Layout, ModelError, train_private
from orchestration.client.recognizer import (
    KNOWN_COLOUR,
    UNKNOWN_COLOUR,
    FaceRecognizer,
    FaceResult,
    RecognizerError,
    annotate,
)

pytestmark = pytest.mark.mpc

REPO = Path(__file__).resolve().parents[1]
PARAMS = reference.TrainParams(epochs=1, batch=32, lr=1.0, alpha=32.0, exp_bits=7)
PEOPLE = ["Colin_Powell", "George_W_Bush", "Tony_Blair", "Vladimir_Putin"]
HELD_OUT = 2  # the first 2 images (sorted) of each person are never trained on
FACE = FaceSettings(backend="dlib", detector="hog")
# frame index -> expected names, left to right
EXPECTED = {0: ["Colin_Powell"], 1: ["Colin_Powell"], 2: ["George_W_Bush"], 3: ["George_W_Bush"],
            4: ["Tony_Blair"], 5: ["Tony_Blair"], 6: [], 7: [], 8: ["Vladimir_Putin", "Colin_Powell"],
            9: ["Vladimir_Putin", "Colin_Powell"]}
N_FRAMES = len(EXPECTED)


def _images(lfw10: Path, person: str) -> list[Path]:
    return sorted((lfw10 / person).glob("*.jpg"))


@pytest.fixture(scope="module")
def trained(mp, lfw10: Path, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """A private model of PEOPLE trained on all but their first HELD_OUT images (dlib embeddings)."""
    from preprocessing import detect_faces, get_embedder

    embedder = get_embedder(FACE.backend)
    x, labels = [], []
    for person in PEOPLE:
        for path in _images(lfw10, person)[HELD_OUT:]:
            image = read_rgb(path)
            faces = detect_faces(image)
            assert faces, f"no face in training image {path}"
            x.append(embedder.embed(image, faces[:1])[0])
            labels.append(person)
    layout = Layout(tmp_path_factory.mktemp("var"))
    train_private(mp, layout, np.stack(x), labels, PARAMS, timeout=600)
    return layout


@pytest.fixture(scope="module")
def video(lfw10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    held = {p: [read_rgb(f) for f in _images(lfw10, p)[:HELD_OUT]] for p in PEOPLE}
    pair = pair_frame(held["Vladimir_Putin"][0], held["Colin_Powell"][1])
    frames = [single_frame(held["Colin_Powell"][0])] * 2 + [single_frame(held["George_W_Bush"][0])] * 2 \
        + [single_frame(held["Tony_Blair"][0])] * 2 + [blank_frame()] * 2 + [pair] * 2
    return write_video(tmp_path_factory.mktemp("video") / "people.avi", frames)


@pytest.fixture(scope="module")
def recognizer(mp, trained: Layout) -> FaceRecognizer:
    return FaceRecognizer(mp, trained, FACE, threshold=-1e9, timeout=600)  # a logit below every z_max: all named


@pytest.fixture(scope="module")
def every1(recognizer: FaceRecognizer, video: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out")
    report = recognizer.run(video, out / "annotated.mp4", frames_dir=out / "stills", every=1)
    return report, out


def _names_left_to_right(faces: list[FaceResult]) -> list[str]:
    return [f.name for f in sorted(faces, key=lambda f: f.location[3])]


def _box_border(frame: np.ndarray, location) -> np.ndarray:
    """The pixels on the drawn rectangle (2 px thick) of one face."""
    top, right, bottom, left = location
    mask = np.zeros(frame.shape[:2], bool)
    cv2.rectangle(mask.view(np.uint8), (left, top), (right, bottom), 1, 2)
    return frame[mask.astype(bool)].astype(np.int32)


def test_every_face_of_every_frame_is_recognised(every1) -> None:
    report, _ = every1
    assert report.frames_read == N_FRAMES and report.frames_processed == N_FRAMES
    assert [r.index for r in report.frames] == list(range(N_FRAMES))
    got = {r.index: _names_left_to_right(r.faces) for r in report.frames}
    assert got == EXPECTED
    for r in report.frames:
        for f in r.faces:
            assert 0.0 < f.confidence <= 1.0 + 1e-3
            assert 0.0 < f.score < PARAMS.alpha  # the top logit of an enrolled face: about alpha/2 (1 - d^2)
            top, right, bottom, left = f.location
            assert 0 <= top < bottom <= FRAME_SIZE[1] and 0 <= left < right <= FRAME_SIZE[0]
    assert report.faces == sum(len(v) for v in EXPECTED.values()) == 10


def test_two_faces_one_mpc_run(every1) -> None:
    report, _ = every1
    by_index = {r.index: r for r in report.frames}
    for i in (8, 9):
        assert len(by_index[i].faces) == 2 and by_index[i].mpc_runs == 1
    left, right = sorted(by_index[8].faces, key=lambda f: f.location[3])
    assert left.location[1] <= FRAME_SIZE[0] // 2 <= right.location[3]  # one face in each half
    assert all(by_index[i].mpc_runs == 0 for i in (6, 7))  # no face, no MPC run
    assert report.mpc_runs == 8  # one per frame with faces
    assert report.mb_sent > 0 and report.mpc_seconds > 0 and report.seconds >= report.mpc_seconds


def test_output_video(every1, video: Path) -> None:
    report, out = every1
    assert report.output == out / "annotated.mp4" and report.codec == "mp4v"
    assert report.size == FRAME_SIZE
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    annotated, source = read_video(report.output), read_video(video)
    assert len(annotated) == len(source) == N_FRAMES
    assert all(f.shape == (FRAME_SIZE[1], FRAME_SIZE[0], 3) for f in annotated)
    for r in report.frames:
        for f in r.faces:
            diff = np.abs(_box_border(annotated[r.index], f.location) - _box_border(source[r.index], f.location))
            assert diff.mean() > 40, f"frame {r.index}: no box drawn at {f.location}"
    # frames without faces come out (nearly) unchanged: only compression noise
    for i in (6, 7):
        assert np.abs(annotated[i].astype(int) - source[i].astype(int)).mean() < 3


def test_stills(every1, video: Path) -> None:
    report, out = every1
    stills = sorted((out / "stills").iterdir())
    assert stills == report.stills == [out / "stills" / f"frame_{i:06d}.png" for i in range(N_FRAMES)]
    source = read_video(video)
    for r in report.frames:
        path = out / "stills" / f"frame_{r.index:06d}.png"
        assert path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        still = cv2.imread(str(path))
        assert still is not None and still.shape == source[r.index].shape
        changed = np.any(still != source[r.index], axis=2)  # lossless: exactly the drawn pixels differ
        if not r.faces:
            assert not changed.any()
        for f in r.faces:
            top, right, bottom, left = f.location
            assert changed[top - 1:bottom + 2, left - 1:right + 2].any()
            colour = KNOWN_COLOUR if f.name != UNKNOWN_PERSON else UNKNOWN_COLOUR
            assert tuple(still[top, (left + right) // 2]) == colour  # the box's top edge
        if r.faces:
            below = max(f.location[2] for f in r.faces) + 3
            assert not changed[below:].any()  # nothing drawn away from the faces


def test_every_2_processes_half_the_frames(recognizer: FaceRecognizer, video: Path, every1, tmp_path: Path) -> None:
    report = recognizer.run(video, tmp_path / "every2.avi", every=2)
    assert report.frames_read == N_FRAMES and report.frames_processed == N_FRAMES // 2
    assert [r.index for r in report.frames] == [0, 2, 4, 6, 8]
    assert {r.index: _names_left_to_right(r.faces) for r in report.frames} == {i: EXPECTED[i] for i in (0, 2, 4, 6, 8)}
    assert report.mpc_runs == 4 and report.codec == "MJPG"
    frames, source = read_video(tmp_path / "every2.avi"), read_video(video)
    assert len(frames) == N_FRAMES
    # an unprocessed frame carries the boxes of the last processed one
    for f in report.frames[0].faces:
        diff = np.abs(_box_border(frames[1], f.location) - _box_border(source[1], f.location))
        assert diff.mean() > 40


def test_missing_video_is_a_clear_error(recognizer: FaceRecognizer, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4: video file not found"):
        recognizer.run(missing, tmp_path / "out.mp4")
    not_video = tmp_path / "text.avi"
    not_video.write_text("not a video")
    with pytest.raises(RecognizerError, match=r"text\.avi: cannot open as a video"):
        recognizer.run(not_video, tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()


def test_unwritable_output_is_a_clear_error(recognizer: FaceRecognizer, video: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"out\.mkv: output video must end in \.mp4 or \.avi"):
        recognizer.run(video, tmp_path / "out.mkv")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RecognizerError, match=r"file/out\.mp4: cannot create the output folder"):
        recognizer.run(video, blocker / "out.mp4")
    with pytest.raises(RecognizerError, match=r"file/stills: cannot create the stills folder"):
        recognizer.run(video, tmp_path / "out.mp4", frames_dir=blocker / "stills")
    with pytest.raises(ValueError, match="every must be >= 1"):
        recognizer.run(video, tmp_path / "out.mp4", every=0)
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*"))


def test_no_model_is_a_clear_error(mp, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model.json missing"):
        FaceRecognizer(mp, Layout(tmp_path), FACE)


def test_unknown_faces_get_another_colour() -> None:
    frame = np.full((120, 200, 3), 128, np.uint8)
    out = annotate(frame, [FaceResult((40, 60, 100, 10), "Ann", 0.9), FaceResult((40, 180, 100, 120), UNKNOWN_PERSON,
                                                                                  0.2)])
    assert tuple(out[100, 35]) == KNOWN_COLOUR and tuple(out[100, 150]) == UNKNOWN_COLOUR
    assert np.array_equal(frame, np.full_like(frame, 128))  # the input is not drawn on


def _free_service_port() -> int:
    """A first port for the local service with all of its ports free (base + 0..2, +100.., +200.., +300..)."""
    from orchestration.shared.ports import CLIENT_OFFSET, LINK_OFFSET, SPDZ_OFFSET

    offsets = [k + off for off in (0, CLIENT_OFFSET, LINK_OFFSET, SPDZ_OFFSET) for k in range(3)]
    for base in range(23000, 30000, 400):
        socks = []
        try:
            for off in offsets:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + off))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.fail("no free ports for the local service between 23000 and 30000")


def test_through_the_service_every_frame(mp, trained: Layout, video: Path, every1, tmp_path: Path) -> None:
    """The same video through the running service: pipelined, every frame, the one-job mode's names."""
    from orchestration.mpspdz.toolchain import protocol
    from orchestration.client.service import ServiceClient
    from orchestration.client.local_service import LocalService

    one_job, _ = every1
    with LocalService(mp, trained, protocol(trained.protocol), port=_free_service_port(),
                      log_dir=tmp_path / "logs") as svc:
        svc.wait_ready(timeout=300)
        with ServiceClient(trained.client, svc.hosts) as client:
            report = FaceRecognizer(None, trained, FACE, threshold=-1e9, service=client).run(video, tmp_path / "s.mp4")
    assert report.pipelined and report.service and report.mpc_runs == 0
    assert report.frames_read == report.frames_processed == N_FRAMES and report.frames_dropped == 0
    assert {r.index: _names_left_to_right(r.faces) for r in report.frames} == EXPECTED
    before = {r.index: sorted(f.confidence for f in r.faces) for r in one_job.frames}
    for r in report.frames:  # the same model shares, the same computation: confidences agree to fixed-point noise
        assert np.allclose(sorted(f.confidence for f in r.faces), before[r.index], atol=0.02)
    scores = {r.index: sorted(f.score for f in r.faces) for r in one_job.frames}
    for r in report.frames:
        assert np.allclose(sorted(f.score for f in r.faces), scores[r.index], atol=2e-3)
    stages = report.stage_ms()
    assert stages["recognise"] > 0 and stages["detect"] > 0 and stages["embed"] > 0
    assert len(read_video(tmp_path / "s.mp4")) == N_FRAMES


def test_task_reports_a_missing_video(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "invoke", "recognize", "--video", str(tmp_path / "missing.mp4")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"{tmp_path / 'missing.mp4'}: video file not found" in r.stderr
