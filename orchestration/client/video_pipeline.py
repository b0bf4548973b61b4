"""The pipelined video mode: detection (two threads), embedding and recognition (one thread each), on
successive frames, with hand-overs of one frame (``FrameSlot``) between them; the calling thread reads and writes the frames in
source order. See :mod:`orchestration.client.recognizer` for when it runs and how frames are dropped.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import cv2
import numpy as np

from preprocessing.video import FrameSlot

from orchestration.client.private import PredictReport
from orchestration.client.video_output import FaceResult, FrameOutput, FrameResult, as_bgr

if TYPE_CHECKING:
    from orchestration.client.recognizer import FaceRecognizer

logger = logging.getLogger(__name__)


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


#: Detection threads. dlib's HOG detector releases the GIL, and on a 640x480 frame at upsample 1 it is the
#: slowest stage (about 130 ms against 60 for the embedding), so two threads take alternate frames: two
#: frames detected at once take 0.28 s where one after the other take 0.52 s (measured here). The frames
#: may then reach the embedder out of order; results are kept by frame index and written in order. Only when
#: every frame is processed: when frames are dropped (a camera, --realtime) a frame overtaken by a later one
#: would come back after frames that already carry newer boxes, so that mode keeps one detection thread.
DETECT_THREADS = 2


class _Pipeline:
    """The threads after the reader: detect (DETECT_THREADS), embed, recognise; results (fates) by frame index.

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
        stages = [("detect", self._detect, 1 if drop else DETECT_THREADS), ("embed", self._embed, 1),
                  ("recognise", self._recognise, 1)]
        self.slots = [FrameSlot(1, drop=drop, on_drop=self._dropped) for _ in stages]  # each stage's input
        self.work = self.slots[0]
        outputs: list[FrameSlot | None] = [*self.slots[1:], None]
        # a stage's output is closed when the last of its threads ends
        self.running = {id(out): n for (_, _, n), out in zip(stages, outputs) if out is not None}
        self.threads = [threading.Thread(target=self._stage, args=(inp, fn, out), daemon=True,
                                         name=f"video-{name}" + (f"-{k}" if n > 1 else ""))
                        for (name, fn, n), inp, out in zip(stages, self.slots, outputs) for k in range(n)]

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
                with self.cond:
                    self.running[id(out)] -= 1
                    last = self.running[id(out)] == 0
                if last:
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
        faces = [FaceResult(tuple(int(v) for v in f.location), n, float(c), float(z)) for f, (n, c, z) in zip(work.faces, names)]
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


def run_pipelined(recognizer: FaceRecognizer, frames: Iterator[tuple[int, np.ndarray]], out: FrameOutput, *,
                  every: int, drop: bool, pace: bool, live: bool) -> None:
    """Read and write here; detect, embed and recognise in three threads (see the recognizer module's docstring).

    Frames are written in source order once their fate is known; with ``drop``, at most
    ``max(4, fps)`` frames wait to be written: beyond that the oldest is written with the
    boxes known so far (its result, when it comes, still counts and goes to ``on_frame``)."""
    report = out.report
    pipe = _Pipeline(recognizer, drop=drop).start()
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
                frame = as_bgr(frame)
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

__all__ = ["run_pipelined"]
