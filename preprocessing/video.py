"""Reading frames from an open OpenCV capture (video file or live camera), for enrollment and recognition."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

#: a live camera may drop frames; this many failed reads in a row end the stream
MAX_CAMERA_FAILURES = 50


def read_frames(capture: Any, *, live: bool, label: str,
                decode: Callable[[int], bool] = lambda index: True) -> Iterator[tuple[int, np.ndarray | None]]:
    """Yield ``(index, frame)`` for every frame of ``capture`` (BGR as OpenCV gives it).

    Frames for which ``decode(index)`` is false are only grabbed, not decoded, and come as ``None``.
    A video file ends at its first failed read; a live camera tolerates up to
    :data:`MAX_CAMERA_FAILURES` failed reads in a row.
    """
    failures = 0
    index = 0
    while True:
        if decode(index):
            grabbed, frame = capture.read()
            grabbed = grabbed and frame is not None
        else:
            grabbed, frame = capture.grab(), None
        if not grabbed:
            if not live:
                return  # end of the video
            failures += 1
            if failures >= MAX_CAMERA_FAILURES:
                logger.warning("%s: %d failed reads in a row, stopping", label, failures)
                return
            continue
        failures = 0
        yield index, frame
        index += 1
