"""Building small test videos and frames from real face images (written to tmp dirs only)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

FRAME_SIZE = (500, 250)  # (width, height): room for two 250x250 LFW images side by side
CODEC = "MJPG"  # works in the opencv-python-headless build (FFmpeg); mp4v works too


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {path}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def single_frame(image: np.ndarray) -> np.ndarray:
    """The image on the left, a plain gray right half (one face per frame)."""
    frame = np.full((FRAME_SIZE[1], FRAME_SIZE[0], 3), 128, np.uint8)
    frame[:, :250] = cv2.resize(image, (250, 250))
    return frame


def pair_frame(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two face images side by side (two faces in one frame)."""
    return np.concatenate([cv2.resize(left, (250, 250)), cv2.resize(right, (250, 250))], axis=1)


def blurred(frame: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(frame, (0, 0), sigma)


def blank_frame() -> np.ndarray:
    return np.full((FRAME_SIZE[1], FRAME_SIZE[0], 3), 90, np.uint8)


def write_video(path: Path, frames: Sequence[np.ndarray], repeat: int = 1, fps: float = 10.0) -> Path:
    """Write RGB frames (each `repeat` times) to an MJPG .avi file."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*CODEC), fps, FRAME_SIZE)
    assert writer.isOpened(), f"cv2.VideoWriter cannot write {CODEC} to {path}"
    try:
        for frame in frames:
            assert frame.shape == (FRAME_SIZE[1], FRAME_SIZE[0], 3), frame.shape
            bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
            for _ in range(repeat):
                writer.write(bgr)
    finally:
        writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    """Every frame of a video file (BGR), as OpenCV decodes it."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"cv2 cannot open {path}"
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames
