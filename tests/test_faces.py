"""Face detection, landmarks, alignment geometry and sharpness (dlib + OpenCV, real LFW images)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocessing import (
    DetectedFace,
    align_face,
    alignment_matrix,
    detect_faces,
    face_landmarks,
    face_locations,
    load_image_file,
    sharpness,
    template_points,
)
from preprocessing.faces import FACENET_PADDING


@pytest.fixture(scope="module")
def bush(lfw10: Path) -> np.ndarray:
    return load_image_file(lfw10 / "George_W_Bush" / "George_W_Bush_0001.jpg")


@pytest.fixture(scope="module")
def blair(lfw10: Path) -> np.ndarray:
    return load_image_file(lfw10 / "Tony_Blair" / "Tony_Blair_0001.jpg")


@pytest.fixture(scope="module")
def bush_face(bush: np.ndarray) -> DetectedFace:
    """The 68-point face (the default is 5 points: test_five_point_landmarks_align_like_the_68_point_ones)."""
    faces = detect_faces(bush, landmarks="68")
    assert faces, "no face found in George_W_Bush_0001.jpg"
    return faces[0]


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _seven(landmarks: np.ndarray) -> np.ndarray:
    lm = landmarks
    return np.stack([lm[36], lm[45], lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


# --- detection ------------------------------------------------------------------------
def test_flat_gray_image_has_no_face() -> None:
    gray = np.full((200, 200, 3), 128, np.uint8)
    assert face_locations(gray) == []
    assert detect_faces(gray) == []
    assert detect_faces(gray, min_size=0) == []


def test_detect_faces_on_lfw(bush: np.ndarray, bush_face: DetectedFace) -> None:
    top, right, bottom, left = bush_face.location
    assert 0 <= top < bottom <= bush.shape[0] and 0 <= left < right <= bush.shape[1]
    # LFW images are centred on the labelled face.
    assert abs((left + right) / 2 - 125) < 25 and abs((top + bottom) / 2 - 125) < 35
    assert bush_face.landmarks.shape == (68, 2) and bush_face.landmarks.dtype == np.float64
    assert bush_face.area == (bottom - top) * (right - left)
    assert bush_face.size == min(bottom - top, right - left)
    # Landmarks sit inside (or close to) the box.
    xs, ys = bush_face.landmarks[:, 0], bush_face.landmarks[:, 1]
    assert xs.min() > left - 15 and xs.max() < right + 15 and ys.min() > top - 15 and ys.max() < bottom + 15
    with pytest.raises(dataclasses.FrozenInstanceError):
        bush_face.location = (0, 0, 0, 0)  # type: ignore[misc]


def test_face_locations_and_landmarks_agree_with_detect_faces(bush: np.ndarray, bush_face: DetectedFace) -> None:
    locations = face_locations(bush)
    assert locations[0] == bush_face.location
    landmarks = face_landmarks(bush, locations[:1], landmarks="68")
    assert len(landmarks) == 1 and landmarks[0].shape == (68, 2)
    assert face_landmarks(bush, locations[:1])[0].shape == (5, 2)  # the default model
    assert np.abs(landmarks[0] - bush_face.landmarks).max() < 3.0


def test_faces_sorted_largest_first_and_min_size(bush: np.ndarray) -> None:
    canvas = np.full((300, 520, 3), 100, np.uint8)
    canvas[25:275, 0:250] = bush
    small = cv2.resize(bush, (150, 150), interpolation=cv2.INTER_AREA)
    canvas[75:225, 330:480] = small
    faces = detect_faces(canvas, min_size=0)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].location[3] < 250 <= faces[1].location[3]  # the big one is on the left
    assert [f.location for f in faces] == face_locations(canvas)
    cut = (faces[0].size + faces[1].size) // 2
    kept = detect_faces(canvas, min_size=cut)
    assert len(kept) == 1 and kept[0].location == faces[0].location
    assert detect_faces(canvas, min_size=faces[0].size + 1) == []


def test_locations_are_clipped_to_the_image(bush: np.ndarray) -> None:
    corner = np.ascontiguousarray(bush[70:, 75:])  # the face touches the top-left border
    for top, right, bottom, left in face_locations(corner):
        assert 0 <= top < bottom <= corner.shape[0] and 0 <= left < right <= corner.shape[1]


def test_cnn_detector(bush: np.ndarray, bush_face: DetectedFace) -> None:
    locations = face_locations(bush, model="cnn")
    assert locations
    top, right, bottom, left = locations[0]
    htop, hright, hbottom, hleft = bush_face.location
    assert abs((left + right) - (hleft + hright)) / 2 < 20 and abs((top + bottom) - (htop + hbottom)) / 2 < 25


def test_invalid_arguments(bush: np.ndarray) -> None:
    with pytest.raises(ValueError, match="hog, cnn"):
        face_locations(bush, model="mtcnn")
    with pytest.raises(ValueError, match="upsample"):
        face_locations(bush, upsample=-1)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        face_locations(bush[:, :, 0])
    with pytest.raises(ValueError, match="uint8"):
        detect_faces(bush.astype(np.float32))


# --- alignment ------------------------------------------------------------------------
def test_template_points_layout() -> None:
    pts = template_points(160, FACENET_PADDING)
    assert pts.shape == (7, 2)
    assert (pts > 0).all() and (pts < 160).all()
    left_corner, right_corner, left_eye, right_eye, nose, left_mouth, right_mouth = pts
    assert left_corner[0] < left_eye[0] < 80 < right_eye[0] < right_corner[0]
    assert abs(left_eye[1] - right_eye[1]) < 1e-9 and left_eye[1] < nose[1] < left_mouth[1]
    assert abs(nose[0] - 80) < 3
    # Symmetric about the vertical centre line.
    assert abs((left_eye[0] + right_eye[0]) / 2 - nose[0]) < 2
    with pytest.raises(ValueError):
        template_points(0)


def test_template_padding_formula() -> None:
    # Nose tip of dlib's mean face is at (0.490127, 0.515625) in the unit square.
    np.testing.assert_allclose(template_points(160, 0.3)[4], [160 * 0.790127 / 1.6, 160 * 0.815625 / 1.6])
    unit = template_points(1, 0.0)
    for size, pad in [(160, 0.3), (150, 0.25), (96, 0.0)]:
        np.testing.assert_allclose(template_points(size, pad), size * (unit + pad) / (1 + 2 * pad))


def test_exact_similarity_is_recovered() -> None:
    """Landmarks that are an exact similarity of the template map back onto it exactly."""
    size, pad = 160, FACENET_PADDING
    target = template_points(size, pad)
    angle, scale, shift = np.deg2rad(25.0), 1.7, np.array([310.0, -42.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = target @ rot.T + shift
    lm = np.zeros((68, 2))
    lm[36], lm[45], lm[30], lm[48], lm[54] = src[0], src[1], src[4], src[5], src[6]
    lm[37:42] = (6 * src[2] - src[0]) / 5  # so that mean(36..41) == src[2]
    lm[42:45] = lm[46:48] = (6 * src[3] - src[1]) / 5  # so that mean(42..47) == src[3]
    matrix = alignment_matrix(lm, size, pad)
    np.testing.assert_allclose(_apply(matrix, _seven(lm)), target, atol=1e-6)
    # The matrix is the inverse of the similarity we applied: a rotation by -25 deg, scale 1/1.7.
    lin = matrix[:, :2]
    assert abs(np.sqrt(np.linalg.det(lin)) - 1 / scale) < 1e-9
    assert abs(np.degrees(np.arctan2(lin[1, 0], lin[0, 0])) + 25.0) < 1e-6


def test_aligned_landmarks_land_near_template(bush: np.ndarray, bush_face: DetectedFace) -> None:
    size = 160
    crop = align_face(bush, bush_face.landmarks, size=size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    matrix = alignment_matrix(bush_face.landmarks, size)
    moved = _apply(matrix, _seven(bush_face.landmarks))
    residual = np.linalg.norm(moved - template_points(size), axis=1)
    assert residual.mean() < 0.04 * size and residual.max() < 0.08 * size
    # The eyes end up level.
    assert abs(moved[2, 1] - moved[3, 1]) < 0.03 * size
    # The crop shows what the matrix says: warping the image again with it gives the same pixels.
    again = cv2.warpAffine(bush, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    np.testing.assert_array_equal(crop, again)


def test_other_sizes_and_paddings(bush: np.ndarray, bush_face: DetectedFace) -> None:
    assert align_face(bush, bush_face.landmarks, size=150, padding=0.25).shape == (150, 150, 3)
    tight = alignment_matrix(bush_face.landmarks, 160, 0.1)
    loose = alignment_matrix(bush_face.landmarks, 160, 0.5)
    assert np.linalg.det(tight[:, :2]) > np.linalg.det(loose[:, :2])  # more padding = face smaller
    with pytest.raises(ValueError, match=r"\(68, 2\) or \(5, 2\) array of \(x, y\), got shape \(6, 2\)"):
        align_face(bush, bush_face.landmarks[:6])


def _mean_abs_diff(a: np.ndarray, b: np.ndarray, border: int = 16) -> float:
    inner = (slice(border, -border), slice(border, -border))
    return float(np.abs(a[inner].astype(float) - b[inner].astype(float)).mean())


def _rotate_scale(image: np.ndarray, degrees: float, scale: float, out: tuple[int, int]) -> np.ndarray:
    """Similarity warp of image about its centre, placed in the middle of an out=(w, h) canvas."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, scale)
    matrix[:, 2] += (out[0] / 2 - w / 2, out[1] / 2 - h / 2)
    return matrix


def test_rotated_scaled_copy_aligns_to_same_crop(bush: np.ndarray, bush_face: DetectedFace, blair: np.ndarray) -> None:
    reference = align_face(bush, bush_face.landmarks)
    matrix = _rotate_scale(bush, 12.0, 1.4, (420, 420))
    warped = cv2.warpAffine(bush, matrix, (420, 420), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)

    # Same landmarks carried through the warp: only resampling differs.
    exact = align_face(warped, _apply(matrix, bush_face.landmarks))
    assert _mean_abs_diff(exact, reference) < 4.0

    # Landmarks detected afresh on the rotated, scaled copy.
    unaligned = cv2.resize(warped[130:290, 130:290], (160, 160))
    for points in ("68", "5"):
        reference = align_face(bush, detect_faces(bush, landmarks=points)[0].landmarks)
        faces = detect_faces(warped, landmarks=points)
        assert faces, "no face found in the rotated copy"
        redetected = align_face(warped, faces[0].landmarks)
        other_person = align_face(blair, detect_faces(blair, landmarks=points)[0].landmarks)
        d_same = _mean_abs_diff(redetected, reference)
        assert d_same < 12.0, points
        assert d_same < 0.5 * _mean_abs_diff(unaligned, reference), points
        assert d_same < 0.5 * _mean_abs_diff(other_person, reference), points


def test_large_face_is_downscaled_without_aliasing(bush: np.ndarray, bush_face: DetectedFace) -> None:
    # Nearest-neighbour 4x upscaling adds blocky edges; sampling them 4:1 without
    # prefiltering would alias them into the crop (Laplacian variance ~3x higher).
    big = cv2.resize(bush, (1000, 1000), interpolation=cv2.INTER_NEAREST)
    crop = align_face(big, bush_face.landmarks * 4.0 + 1.5)
    reference = align_face(bush, bush_face.landmarks)
    assert _mean_abs_diff(crop, reference) < 6.0
    assert sharpness(crop) < 1.5 * sharpness(reference)


# --- sharpness ------------------------------------------------------------------------
def test_sharpness_drops_with_blur(bush: np.ndarray, bush_face: DetectedFace) -> None:
    crop = align_face(bush, bush_face.landmarks)
    blurred = cv2.GaussianBlur(crop, (0, 0), 2.0)
    assert sharpness(crop) > 3 * sharpness(blurred) > 0
    assert sharpness(np.full((50, 50, 3), 7, np.uint8)) == 0.0
    assert sharpness(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)) == pytest.approx(sharpness(crop))


# --- cascade detector and 5-point landmarks ---------------------------------------------
# An lfw-devtrain photo in which dlib's HOG detector (upsample 1) finds no face (benchmarks/detect_bench.py
# lists all 19 of 3,146).
HOG_MISSES = ("Angela_Merkel", "Angela_Merkel_0003.jpg")


def test_cascade_finds_the_face_hog_misses(devtrain_people: Path) -> None:
    image = load_image_file(devtrain_people / HOG_MISSES[0] / HOG_MISSES[1])
    assert face_locations(image, model="hog") == []
    found = face_locations(image, model="cascade")
    assert found and found == face_locations(image, model="cnn")
    faces = detect_faces(image, model="cascade", min_size=0)
    assert faces and faces[0].location == found[0]


def test_cascade_is_hog_where_hog_finds_a_face(bush: np.ndarray, blair: np.ndarray) -> None:
    for image in (bush, blair):
        hog = face_locations(image, model="hog")
        assert hog and face_locations(image, model="cascade") == hog
        assert hog != face_locations(image, model="cnn")  # the CNN's boxes differ: it really was not run


def test_unknown_detector_and_landmark_model_list_the_allowed_values(bush: np.ndarray) -> None:
    with pytest.raises(ValueError, match="allowed values: hog, cnn, cascade"):
        face_locations(bush, model="mtcnn")
    with pytest.raises(ValueError, match="allowed values: 68, 5"):
        detect_faces(bush, landmarks="17")


def test_five_point_landmarks_align_like_the_68_point_ones(bush: np.ndarray) -> None:
    five = detect_faces(bush)[0]  # 5 points: the default
    assert np.array_equal(five.landmarks, detect_faces(bush, landmarks="5")[0].landmarks)
    sixty_eight = detect_faces(bush, landmarks="68")[0]
    assert five.landmarks.shape == (5, 2) and five.location == sixty_eight.location
    # the 5 points are the eye corners and the base of the nose: close to the 68-point model's own
    lm = sixty_eight.landmarks
    assert np.abs(five.landmarks[[0, 1, 2, 3]] - lm[[45, 42, 36, 39]]).max() < 6.0
    assert np.abs(five.landmarks[4] - lm[33]).max() < 8.0
    size = 160
    matrix = alignment_matrix(five.landmarks, size)
    moved = _apply(matrix, five.landmarks)
    residual = np.linalg.norm(moved - template_points(size, points=5), axis=1)
    assert residual.max() < 0.05 * size
    assert abs(moved[0, 1] - moved[2, 1]) < 0.03 * size  # the eyes end up level
    # both crops show the same face at about the same place and scale
    a = align_face(bush, five.landmarks).astype(np.float64)
    b = align_face(bush, sixty_eight.landmarks).astype(np.float64)
    assert _mean_abs_diff(a, b) < 20.0
    m68 = alignment_matrix(sixty_eight.landmarks, size)
    assert abs(np.sqrt(np.linalg.det(matrix[:, :2])) / np.sqrt(np.linalg.det(m68[:, :2])) - 1) < 0.1
    with pytest.raises(ValueError, match="points must be 7"):
        template_points(size, points=6)
