"""Enrollment from videos and folders built from real LFW images (in temp dirs)."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers_video import blank_frame, blurred, pair_frame, read_rgb, single_frame, write_video
from preprocessing.dataset import embed_gallery
from preprocessing.embedders import get_embedder
from preprocessing.enroll import (
    DEFAULT_MIN_SHARPNESS,
    SAVE_SIZE,
    EnrollSourceError,
    enroll,
    validate_name,
)
from preprocessing.errors import InvalidNameError, PreprocessingError
from preprocessing.faces import detect_faces
from preprocessing.images import load_image_file

PERSON = "George_W_Bush"
REPEAT = 3


def lfw(lfw10: Path, person: str, n: int) -> Path:
    return lfw10 / person / f"{person}_{n:04d}.jpg"


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory, lfw10: Path) -> Path:
    """18 frames: 4 sharp single-face images of PERSON x3, 2 two-face frames, 2 blurred, 2 blank."""
    sharp = [single_frame(read_rgb(lfw(lfw10, PERSON, n))) for n in (1, 2, 3, 4)]
    two = pair_frame(read_rgb(lfw(lfw10, "Tony_Blair", 1)), read_rgb(lfw(lfw10, "Colin_Powell", 1)))
    blur = blurred(single_frame(read_rgb(lfw(lfw10, PERSON, 5))), 4.0)
    frames = [f for f in sharp for _ in range(REPEAT)] + [two, two, blur, blur, blank_frame(), blank_frame()]
    return write_video(tmp_path_factory.mktemp("video") / "enroll.avi", frames)


def _numbers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{name}_*.png"))


def test_video_enrollment_policy(video: Path, tmp_path: Path) -> None:
    gallery = tmp_path / "gallery"
    result = enroll("Ann", str(video), gallery, count=100, backend="dlib")
    assert result.frames_read == 18 and result.frames_checked == 18
    assert result.n_kept == 4 * REPEAT
    assert dict(result.rejected) == {"several faces": 2, "too blurry": 2, "no face found": 2}
    assert result.n_rejected == 6
    assert _numbers(gallery / "Ann", "Ann") == [f"Ann_{i:04d}.png" for i in range(1, 13)]
    assert result.saved == sorted(result.saved)
    assert not [p for p in (gallery / "Ann").iterdir() if p.suffix != ".png"]  # no temp files left
    crop = load_image_file(result.saved[0])
    assert crop.shape == (SAVE_SIZE, SAVE_SIZE, 3)
    assert "12 face(s) saved" in str(result) and "2 several faces" in str(result)


def test_count_every_and_numbering_continue(video: Path, tmp_path: Path) -> None:
    gallery = tmp_path / "gallery"
    first = enroll("Ann", video, gallery, count=2, backend="dlib")
    assert first.n_kept == 2 and first.frames_read == 2  # stops as soon as count faces are kept
    second = enroll("Ann", video, gallery, count=3, every=REPEAT, backend="dlib")
    # every 3rd frame: one frame per sharp image
    assert second.n_kept == 3 and second.frames_checked == 3 and second.frames_read == 7
    assert [p.name for p in second.saved] == ["Ann_0003.png", "Ann_0004.png", "Ann_0005.png"]
    # every=3 over the whole video: 6 frames looked at (0, 3, ..., 15)
    third = enroll("Ann", video, gallery, count=100, every=REPEAT, backend="dlib")
    assert third.frames_read == 18 and third.frames_checked == 6
    assert third.n_kept == 4 and sum(third.rejected.values()) == 2
    assert _numbers(gallery / "Ann", "Ann")[-1] == "Ann_0009.png"


def test_numbering_skips_existing_files(video: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gallery" / "Ann"
    folder.mkdir(parents=True)
    (folder / "Ann_0041.jpg").write_bytes(b"x")  # any extension counts
    (folder / "other_0100.png").write_bytes(b"x")  # other names do not
    result = enroll("Ann", video, tmp_path / "gallery", count=1, backend="dlib")
    assert [p.name for p in result.saved] == ["Ann_0042.png"]


def test_folder_enrollment_and_crops_are_the_person(tmp_path: Path, lfw10: Path) -> None:
    source = tmp_path / "shots"
    source.mkdir()
    for n in (1, 2, 3, 4, 5, 6):
        shutil.copy(lfw(lfw10, PERSON, n), source / f"{PERSON}_{n:04d}.jpg")
    shutil.copy(lfw(lfw10, "Ariel_Sharon", 4), source / "z_two_faces.jpg")  # two faces in this LFW image
    (source / "z_text.jpg").write_text("not an image")
    (source / ".hidden.jpg").write_text("ignored")
    (source / "notes.txt").write_text("ignored")

    gallery = tmp_path / "gallery"
    result = enroll("George", str(source), gallery, count=10, backend="dlib")
    assert result.frames_read == 8
    assert result.n_kept == 6
    assert dict(result.rejected) == {"several faces": 1, "unreadable image": 1}

    # the saved aligned crops are found again by embed_gallery, and their embeddings are the person
    embedded = embed_gallery(gallery, "dlib", progress=False)
    assert embedded.skipped == [] and len(embedded) == 6
    embedder = get_embedder("dlib")
    refs, ref_labels = [], []
    for person in ("George_W_Bush", "Tony_Blair", "Colin_Powell", "Donald_Rumsfeld"):
        for n in (7, 8):
            image = load_image_file(lfw(lfw10, person, n))
            refs.append(embedder.embed(image, detect_faces(image)[:1])[0])
            ref_labels.append(person)
    sims = embedded.embeddings @ np.array(refs).T
    assert all(ref_labels[i] == PERSON for i in sims.argmax(axis=1))
    # and each crop's embedding is nearly that of its source image
    for crop_path, n in zip(sorted(embedded.paths), (1, 2, 3, 4, 5, 6)):
        original = load_image_file(lfw(lfw10, PERSON, n))
        expected = embedder.embed(original, detect_faces(original)[:1])[0]
        row = embedded.paths.index(crop_path)
        assert float(embedded.embeddings[row] @ expected) > 0.98


def test_facenet_enrollment_round_trip(tmp_path: Path, lfw10: Path) -> None:
    source = tmp_path / "shots"
    source.mkdir()
    for n in (1, 2):
        shutil.copy(lfw(lfw10, "Tony_Blair", n), source / f"{n}.jpg")
    result = enroll("Tony", source, tmp_path / "gallery", count=2, backend="facenet")
    assert result.n_kept == 2
    embedded = embed_gallery(tmp_path / "gallery", "facenet", progress=False)
    embedder = get_embedder("facenet")
    for n, row in zip((1, 2), embedded.embeddings):
        original = load_image_file(lfw(lfw10, "Tony_Blair", n))
        assert float(row @ embedder.embed(original, detect_faces(original)[:1])[0]) > 0.95


def test_blur_threshold_separates_sharp_from_blurred(tmp_path: Path, lfw10: Path) -> None:
    source = tmp_path / "shots"
    source.mkdir()
    for n in (1, 2, 3):
        image = cv2.imread(str(lfw(lfw10, "Vladimir_Putin", n)))
        cv2.imwrite(str(source / f"a{n}.png"), image)
        cv2.imwrite(str(source / f"b{n}.png"), cv2.GaussianBlur(image, (0, 0), 3.0))
    result = enroll("Vlad", source, tmp_path / "g", count=10, backend="dlib")
    assert result.n_kept == 3 and result.rejected["too blurry"] == 3
    assert DEFAULT_MIN_SHARPNESS == 10.0
    # a threshold of 0 keeps the blurred faces too
    assert enroll("Vlad2", source, tmp_path / "g", count=10, min_sharpness=0, backend="dlib").n_kept == 6


@pytest.mark.parametrize(
    "name, rule",
    [
        ("", "empty"),
        ("   ", "empty"),
        (" Ann", "whitespace"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("..", "reserved"),
        (".", "reserved"),
        (".hidden", "starts with a dot"),
        ("Ann\x00", "control characters"),
        ("Ann\nBob", "control characters"),
        ("x" * 101, "at most 100"),
        (42, "must be a string"),
    ],
)
def test_invalid_names_rejected(name: object, rule: str, tmp_path: Path, video: Path) -> None:
    with pytest.raises(InvalidNameError, match=rule) as info:
        enroll(name, str(video), tmp_path / "g", backend="dlib")  # type: ignore[arg-type]
    assert isinstance(info.value, PreprocessingError)
    if isinstance(name, str) and name.strip():
        assert repr(name)[:15] in str(info.value)
    assert not (tmp_path / "g").exists()


def test_valid_names_accepted() -> None:
    for name in ("Ann", "George_W_Bush", "Zoë Ångström", "x" * 100, "O'Brien-2"):
        assert validate_name(name) == name


@pytest.mark.parametrize(
    "source",
    ["webcam", "camera:x", "camera:-1", "camera:", "missing/file.mp4", "", "IMAGE", "TEXTFILE", "EMPTYDIR"],
)
def test_bad_source_rejected(source: str, tmp_path: Path, lfw10: Path) -> None:
    if source == "IMAGE":
        source = str(lfw(lfw10, PERSON, 1))
    elif source == "TEXTFILE":
        source = str(tmp_path / "clip.mp4")
        Path(source).write_text("not a video")
    elif source == "EMPTYDIR":
        source = str(tmp_path / "empty")
        Path(source).mkdir()
    elif source.startswith("missing"):
        source = str(tmp_path / source)
    with pytest.raises(EnrollSourceError) as info:
        enroll("Ann", source, tmp_path / "g", backend="dlib")
    message = str(info.value)
    assert '"camera:N"' in message and "folder" in message  # lists the allowed forms
    assert repr(source) in message or source in message
    assert not list((tmp_path / "g").glob("*/*.png")) if (tmp_path / "g").exists() else True


def test_missing_camera_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EnrollSourceError, match=r"camera 57 could not be opened") as info:
        enroll("Ann", "camera:57", tmp_path / "g", backend="dlib")
    assert "cv2.VideoCapture(57)" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"count": 0}, {"every": 0}, {"count": 2.5}, {"backend": "vgg"}])
def test_bad_arguments(kwargs: dict, video: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        enroll("Ann", video, tmp_path / "g", **{"backend": "dlib", **kwargs})
