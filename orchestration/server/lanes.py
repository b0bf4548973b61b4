"""Runs on a server: one worker thread per lane of the service's MP-SPDZ party.

A lane is one of the serve program's request loops (an MP-SPDZ thread with its own gateway connection and its
own channels to the other parties). Batches on different lanes are in flight at once and their rounds
interleave; batches on one lane run in the order they were given. The gateway hands each planned batch to its
lane's worker and goes on planning; a worker's failure ends the session at the gateway's next check.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

logger = logging.getLogger(__name__)


class LaneWorkers:
    """``lanes`` threads, each running the jobs given to its lane one after the other."""

    def __init__(self, lanes: int, name: str):
        if lanes < 1:
            raise ValueError(f"{lanes} lanes: expected at least 1")
        self.queues: list[queue.Queue[Callable[[], None] | None]] = [queue.Queue() for _ in range(lanes)]
        self.busy = [0] * lanes  # jobs given to each lane and not finished
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._work, args=(k,), daemon=True, name=f"{name}-lane{k}")
                        for k in range(lanes)]
        for t in self.threads:
            t.start()

    def _work(self, lane: int) -> None:
        while True:
            job = self.queues[lane].get()
            if job is None:
                return
            try:
                if self.error is None:
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the gateway's thread by check()
                with self.cond:
                    if self.error is None:
                        self.error = exc
            finally:
                with self.cond:
                    self.busy[lane] -= 1
                    self.cond.notify_all()

    def submit(self, lane: int, job: Callable[[], None]) -> None:
        self.check()
        with self.cond:
            self.busy[lane] += 1
        self.queues[lane].put(job)

    def check(self) -> None:
        """Raise the first failure of any lane's job (once a job failed, the lanes run no more jobs)."""
        if self.error is not None:
            raise self.error

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every lane finished its jobs (or one failed); False on timeout."""
        with self.cond:
            done = self.cond.wait_for(lambda: not any(self.busy) or self.error is not None, timeout)
        self.check()
        return done

    def close(self) -> None:
        for q in self.queues:
            q.put(None)


__all__ = ["LaneWorkers"]
