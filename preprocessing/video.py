"""Reading frames from an open OpenCV capture (video file or live camera), for enrollment and recognition,
and :class:`FrameSlot`, the bounded hand-over between the threads of a frame pipeline."""
from __future__ import annotations

import logging
import threading
from collections import deque
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


class FrameSlot:
    """A bounded hand-over of items (frames, or work on them) from one thread to the next.

    At most ``size`` items wait. When the slot is full, :meth:`put` either blocks until the
    consumer takes one (back-pressure: nothing is lost), or, with ``drop=True``, removes the
    oldest waiting item, hands it to ``on_drop`` and counts it in :attr:`dropped`, so that the
    newest item always gets in and the producer (a camera) never waits. :meth:`close` ends the
    stream: :meth:`get` then returns what still waits, then ``None``; :meth:`cancel` ends it and
    discards what waits.
    """

    def __init__(self, size: int = 1, *, drop: bool = False, on_drop: Callable[[Any], None] | None = None):
        if int(size) != size or size < 1:
            raise ValueError(f"a slot holds 1 or more items, got size {size!r}")
        self.size, self.drop, self.on_drop = int(size), bool(drop), on_drop
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0  # items removed unseen to make room (drop=True only)
        self.high_water = 0  # the most items that ever waited at once: never more than size

    def put(self, item: Any) -> bool:
        """Hand over ``item``; False when the slot is closed (the item is not taken)."""
        with self._cond:
            while not self.drop and len(self._items) >= self.size and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            while len(self._items) >= self.size:
                old = self._items.popleft()
                self.dropped += 1
                if self.on_drop is not None:
                    self.on_drop(old)
            self._items.append(item)
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify_all()
            return True

    def get(self) -> Any | None:
        """The oldest waiting item; blocks while none waits; None once the slot is closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """No more items: the consumer gets what waits, then None; a blocked producer gets False."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self) -> list[Any]:
        """Close and discard what waits (returned, not counted as dropped)."""
        with self._cond:
            self._closed = True
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
