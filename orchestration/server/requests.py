"""Runs on a server: the gateway's table of requests, the one state machine both gateways keep.

A request is a client's ``n`` x ``d1`` shares of its queries, waiting to be computed. Both gateways
hold a table; server 0's *plans* the batches (in arrival order), server 1's *follows* the plans it is
sent. Every transition happens here, under one lock, and every way out answers the request's client
exactly once: with a result, or with an error code of :data:`orchestration.shared.wire.ERROR_CODES`.

What the table guarantees against any client, honest or not (tests/test_request_table.py fuzzes it):

* a request is checked against the model being served or started (``d1``) before it is held, and
  both servers compute it only when both hold it **with the same sizes** (each announces ``id, n,
  d1`` to the other); a disagreement fails that request at both, and nothing else;
* a plan from server 0 is checked against server 1's own copy (bounds, sizes, batch) before a share
  is used: a plan that does not fit fails the requests it names, never the gateway;
* memory is bounded: at most ``max_queued`` queries in all and ``max_per_client`` per client
  certificate; beyond either, ``busy`` at once;
* time is bounded: half a request (held by one server only) is failed after ``half_timeout``; any
  request not answered within ``request_timeout`` of its arrival is failed (``unavailable``), so
  none waits for ever, whatever the other server or the client does;
* a client that goes away takes its waiting requests with it.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol as TypingProtocol

import numpy as np

from orchestration.shared.wire import shares_body

logger = logging.getLogger(__name__)

MAX_QUERIES = 4096  # per request
MAX_D1 = 4097  # an embedding of at most 4,096 values, and the trailing 1
MAX_QUEUED = 131072  # queries a gateway holds waiting, by default (about 135 MB of shares at 128-d embeddings)
MAX_PER_CLIENT = 32768  # queries one client certificate may have waiting, by default
REQUEST_TIMEOUT = 300.0  # seconds: a request not answered by then is failed
MAX_VERDICTS = 10000


class Conn(TypingProtocol):
    """What the table needs of a client connection: its certificate's name and a way to answer."""

    name: str

    def reply(self, header: dict[str, Any], body: bytes = b"") -> None: ...


@dataclass
class Request:
    id: str
    gen: str
    n: int
    shares: np.ndarray  # n x d1, this server's shares
    conn: Conn
    t0: float = field(default_factory=time.monotonic)
    out: np.ndarray | None = None  # n x k answer shares (k = 3: best, S, z_max; names mode: L name words, accept*z_max)
    filled: int = 0  # queries answered
    scheduled: int = 0  # queries already put into a plan (server 0: planned; server 1: gathered from plans)
    both: bool = False  # the other server announced that it holds this request too, with the same sizes
    finished: bool = False

    @property
    def d1(self) -> int:
        return int(self.shares.shape[1])


Slot = tuple[Request | None, int, int]  # (request or None for zeros, first query, count)


class RequestTable:
    """One gateway's requests. ``party`` 0 leads (plans), 1 follows. Thread-safe."""

    def __init__(self, party: int, batch: int, *, max_queued: int = MAX_QUEUED, max_per_client: int = MAX_PER_CLIENT,
                 half_timeout: float = 20.0, request_timeout: float = REQUEST_TIMEOUT, pending_wait: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_queued < MAX_QUERIES:
            raise ValueError(f"service max_queued {max_queued}: expected at least {MAX_QUERIES} (one request's maximum)")
        if not MAX_QUERIES <= max_per_client <= max_queued:
            raise ValueError(f"service max_per_client {max_per_client}: expected {MAX_QUERIES}..{max_queued} "
                             "(one request's maximum .. max_queued)")
        if request_timeout <= half_timeout:
            raise ValueError(f"request timeout {request_timeout} s must exceed the half-request timeout {half_timeout} s")
        self.party, self.batch = party, batch
        self.max_queued, self.max_per_client = max_queued, max_per_client
        self.half_timeout, self.request_timeout, self.pending_wait = half_timeout, request_timeout, pending_wait
        self.clock = clock
        self.lock = threading.Condition()
        self.requests: dict[str, Request] = {}
        self.queued = 0  # queries of the requests held (sum of their n)
        self.per_client: collections.Counter[str] = collections.Counter()
        self.queue: collections.deque[str] = collections.deque()  # leader: ids in arrival order
        self.verdicts: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()  # follower
        self.partner_has: dict[str, tuple[int, int, float]] = {}  # announced before they reached us: n, d1, when
        self.to_announce: list[list[Any]] = []  # [id, n, d1] that reached us since our last message to the other
        self.to_reject: list[list[str]] = []  # leader: [id, code, message] server 1 must fail too
        self.served = 0

    # -- arrivals -------------------------------------------------------------------------------------

    def take(self, req: Request, model_d1: int | None) -> bool:
        """A checked request from a client. ``model_d1``: the sizes of the model served or being started
        (None: no model yet). Returns True when it is held (and must be announced)."""
        with self.lock:
            if req.id in self.requests:
                req.conn.reply({"type": "error", "id": req.id, "code": "bad-request",
                                "message": f"request id {req.id} is in use"})
                return False
            if model_d1 is None:
                self._refuse(req, "unavailable", f"server {self.party} serves no model yet; retry later")
                return False
            if req.d1 != model_d1:
                self._refuse(req, "bad-request", f"queries have {req.d1} values, the model takes {model_d1}")
                return False
            if self.party == 1 and req.id in self.verdicts:
                code, msg = self.verdicts.pop(req.id)
                self._refuse(req, code, msg)
                return False
            if self.queued + req.n > self.max_queued:
                self._refuse(req, "busy", f"server {self.party} holds {self.queued} queries waiting (at most "
                                          f"{self.max_queued}, service.max_queued); retry later")
                return False
            mine = self.per_client[req.conn.name]
            if mine + req.n > self.max_per_client:
                self._refuse(req, "busy", f"server {self.party} holds {mine} queries of this client waiting (at most "
                                          f"{self.max_per_client} per client, service.max_per_client); retry later")
                return False
            self.requests[req.id] = req
            self.queued += req.n
            self.per_client[req.conn.name] += req.n
            other = self.partner_has.pop(req.id, None)
            if other is not None:
                self._match(req, other[0], other[1])
            self.to_announce.append([req.id, req.n, req.d1])  # also when refused: the other then fails its copy
            if not req.finished and self.party == 0:
                self.queue.append(req.id)
            self.lock.notify_all()
            return not req.finished

    def mark_held(self, items: Any) -> None:
        """The other server announced requests ``items`` ([id, n, d1] each) that reached it.
        Raises ValueError for a malformed announcement (the link is then dropped)."""
        if not isinstance(items, list):
            raise ValueError("an announcement without a list of requests")
        now = self.clock()
        with self.lock:
            for item in items:
                rid, n, d1 = _id_and_two_ints(item, "an announced request", "[id, n, d1]")
                req = self.requests.get(rid)
                if req is not None:
                    self._match(req, n, d1)
                elif len(self.partner_has) < 2 * self.max_queued:  # it may reach this server a moment later
                    self.partner_has[rid] = (n, d1, now)

    def _match(self, req: Request, n: int, d1: int) -> None:
        """(Under lock.) The other server holds ``req`` with ``n`` x ``d1`` queries."""
        if (n, d1) == (req.n, req.d1):
            req.both = True
            return
        msg = (f"the two servers got different sizes for request {req.id} ({req.n} x {req.d1} here, {n} x {d1} at "
               f"server {1 - self.party}): refused")
        self._fail(req, "bad-request", msg)

    # -- leaving ----------------------------------------------------------------------------------------

    def _release(self, req: Request) -> bool:
        """(Under lock.) ``req`` is answered: no longer held. False when it was answered already."""
        if req.finished:
            return False
        req.finished = True
        if self.requests.get(req.id) is req:
            del self.requests[req.id]
            self.queued -= req.n
            self.per_client[req.conn.name] -= req.n
            if self.per_client[req.conn.name] <= 0:
                del self.per_client[req.conn.name]
        return True

    def _refuse(self, req: Request, code: str, message: str) -> None:
        """(Under lock.) An error for a request that was never held."""
        req.finished = True
        req.conn.reply({"type": "error", "id": req.id, "code": code, "message": message})
        logger.info("request %s: %d queries refused, %s", req.id[:12], req.n, code)

    def _fail(self, req: Request, code: str, message: str) -> None:
        """(Under lock.) Answer ``req`` with an error; server 0 tells server 1 to fail its copy too."""
        if not self._release(req):
            return
        req.conn.reply({"type": "error", "id": req.id, "code": code, "message": message})
        if self.party == 0 and (req.both or req.scheduled):
            self.to_reject.append([req.id, code, message])
        logger.info("request %s: %d queries, generation %s, %.1f ms, error %s", req.id[:12], req.n, req.gen,
                    1000 * (self.clock() - req.t0), code)

    def fail(self, rid: str, code: str, message: str) -> None:
        with self.lock:
            req = self.requests.get(rid)
            if req is not None:
                self._fail(req, code, message)

    def fail_all(self, code: str, message: str) -> None:
        with self.lock:
            for req in list(self.requests.values()):
                self._fail(req, code, message)
            self.queue.clear()
            self.to_reject.clear()  # the link they were for is gone

    def drop_client(self, conn: Conn) -> int:
        """The connection ``conn`` closed: its requests are failed (nobody reads the answers). Returns how many."""
        with self.lock:
            mine = [r for r in self.requests.values() if r.conn is conn]
            for req in mine:
                self._fail(req, "unavailable", "the client went away")
            return len(mine)

    def expire(self) -> None:
        """Fail half requests after ``half_timeout`` and every request after ``request_timeout``."""
        now = self.clock()
        with self.lock:
            other = 1 - self.party
            for req in list(self.requests.values()):
                age = now - req.t0
                if not req.both and age > self.half_timeout:
                    self._fail(req, "unavailable", f"server {other} did not confirm request {req.id} within "
                                                   f"{self.half_timeout:.0f} s (it did not get it, or the service is "
                                                   "restarting); retry")
                elif age > self.request_timeout:
                    self._fail(req, "unavailable", f"request {req.id} was not answered within "
                                                   f"{self.request_timeout:.0f} s (service.request_timeout); retry")
            for rid, (_, _, t) in list(self.partner_has.items()):
                if now - t > self.half_timeout:
                    del self.partner_has[rid]

    def new_link(self, announce_all: bool) -> list[list[Any]]:
        """What the other server announced on the old link is void. Every request held is to be announced
        again: with the next message (``announce_all``), or returned to be sent at once."""
        with self.lock:
            self.partner_has.clear()
            self.to_reject.clear()
            for req in self.requests.values():
                req.both = False
            held = [[r.id, r.n, r.d1] for r in self.requests.values()]
            self.to_announce = held if announce_all else []
            return [] if announce_all else held

    def take_announcements(self, limit: int | None = None) -> list[list[Any]]:
        """The announcements not yet sent (at most ``limit``; the rest wait for the next message)."""
        with self.lock:
            k = len(self.to_announce) if limit is None else limit
            out, self.to_announce = self.to_announce[:k], self.to_announce[k:]
            return out

    def announcing(self) -> int:
        with self.lock:
            return len(self.to_announce)

    def take_rejects(self, limit: int | None = None) -> list[list[str]]:
        with self.lock:
            k = len(self.to_reject) if limit is None else limit
            out, self.to_reject = self.to_reject[:k], self.to_reject[k:]
            return out

    # -- server 0: plans ------------------------------------------------------------------------------

    def ready(self) -> bool:
        with self.lock:
            return any(r is not None and r.both for r in (self.requests.get(rid) for rid in self.queue))

    def ready_queries(self) -> int:
        """Queries of requests both servers hold that no plan has taken yet (any generation)."""
        with self.lock:
            return sum(r.n - r.scheduled for r in (self.requests.get(rid) for rid in self.queue)
                       if r is not None and r.both and not r.finished)

    def plan(self, gen: str, pending: str | None, room: int | None = None) -> tuple[list[Slot], int]:
        """Up to ``room`` queries (default ``batch``) from the oldest requests for ``gen`` that server 1 holds
        too, and how many requests wait for a switch. Requests refused here go to :meth:`take_rejects`.

        A request for ``pending`` (the generation this server installed, not yet served because server 1
        does not hold it yet) waits up to ``pending_wait``; a request for any other generation is refused.
        A request server 1 has not announced stays queued (:meth:`expire` fails it if server 1 never does)."""
        slots: list[Slot] = []
        room = self.batch if room is None else min(room, self.batch)
        held = 0
        with self.lock:
            waiting: list[str] = []
            while self.queue and room > 0:
                rid = self.queue.popleft()
                req = self.requests.get(rid)
                if req is None or req.finished:
                    continue
                if not req.both:
                    waiting.append(rid)
                    continue
                if req.gen != gen:
                    if req.gen == pending and self.clock() - req.t0 < self.pending_wait:
                        waiting.append(rid)
                        held += 1
                        continue
                    self._fail(req, "generation", f"the service serves model generation {gen}, the request "
                                                  f"expects {req.gen}")
                    continue
                take = min(room, req.n - req.scheduled)
                slots.append((req, req.scheduled, take))
                req.scheduled += take
                room -= take
                if req.scheduled < req.n:
                    self.queue.appendleft(rid)
            self.queue.extendleft(reversed(waiting))
        return slots, held

    # -- server 1: following ----------------------------------------------------------------------------

    def apply_rejects(self, rejects: Any) -> None:
        """Server 0 refused these requests ([id, code, message] each): fail our copies, or remember the
        verdict for a copy still on its way."""
        if not isinstance(rejects, list):
            raise ValueError("a plan's rejects are not a list")
        with self.lock:
            for item in rejects:
                if not isinstance(item, list) or len(item) != 3 or not all(isinstance(v, str) for v in item):
                    raise ValueError(f"a rejected request {str(item)[:80]!r} is not [id, code, message]")
                rid, code, msg = item
                req = self.requests.get(rid)
                if req is not None:
                    self._fail(req, code, msg)
                else:
                    self._remember(rid, code, msg)

    def gather(self, wanted: Any, gen: str, d1: int, room: int | None = None) -> list[Slot]:
        """The requests of server 0's plan, each checked against this server's own copy. A slot that does
        not fit (unknown request, other generation, out of the request's bounds, another size, a batch
        overflow) is fed as zeros and its request is failed here, which the client sees. Server 0 plans
        only requests this server announced, so one that is not here any more was answered already."""
        if not isinstance(wanted, list):
            raise ValueError("a plan's slots are not a list")
        slots: list[Slot] = []
        total = 0
        room = self.batch if room is None else min(room, self.batch)
        with self.lock:
            for item in wanted:
                rid, start, count = _id_and_two_ints(item, "a planned slot", "[id, start, count]")
                if count < 1 or total + count > room:
                    raise ValueError(f"plan of {total + max(count, 0)} queries or a slot of {count}: the batch is "
                                     f"{room}")
                total += count
                req = self.requests.get(rid)
                if req is None:
                    self._remember(rid, "unavailable", f"request {rid} is no longer on server 1")
                elif req.gen != gen:
                    self._fail(req, "generation", f"the service serves model generation {gen}, the request expects "
                                                  f"{req.gen}")
                    req = None
                elif not 0 <= start or start + count > req.n or start != req.scheduled or req.d1 != d1:
                    self._fail(req, "failed", f"server 0 planned queries {start}..{start + count - 1} of request "
                                              f"{rid}, which has {req.n} x {req.d1} here: refused")
                    req = None
                else:
                    req.scheduled += count  # the next plan of it starts here (plans of two lanes may be in flight)
                slots.append((req, start, count))
        return slots

    def _remember(self, rid: str, code: str, msg: str) -> None:
        self.verdicts[rid] = (code, msg)
        while len(self.verdicts) > MAX_VERDICTS:
            self.verdicts.popitem(last=False)

    # -- both: a batch's inputs and answers --------------------------------------------------------------

    def batch_input(self, slots: list[Slot], d1: int, rows: int | None = None) -> np.ndarray:
        """This server's shares for one batch: ``rows`` (default ``batch``) x ``d1``, zeros where no query is."""
        x = np.zeros((self.batch if rows is None else rows, d1), dtype=np.uint64)
        pos = 0
        with self.lock:
            for req, start, count in slots:
                if req is not None and not req.finished and req.d1 == d1 and start + count <= req.n:
                    x[pos:pos + count] = req.shares[start:start + count]
                pos += count
        return x

    def deliver(self, slots: list[Slot], out: np.ndarray, gen: str) -> None:
        """A batch's answers (``batch`` x k shares) to the requests of ``slots``."""
        pos = 0
        with self.lock:
            for req, start, count in slots:
                if req is not None and not req.finished:
                    if req.out is None:
                        req.out = np.zeros((req.n, out.shape[1]), dtype=np.uint64)
                    req.out[start:start + count] = out[pos:pos + count]
                    req.filled += count
                    if req.filled == req.n:
                        self._answer(req, gen)
                pos += count

    def _answer(self, req: Request, gen: str) -> None:
        assert req.out is not None
        if not self._release(req):
            return
        # column after column: all queries' first value, then all second values (best, then S, then z_max)
        req.conn.reply({"type": "result", "id": req.id, "gen": gen, "n": req.n, "k": int(req.out.shape[1])},
                       shares_body(np.ascontiguousarray(req.out.T).reshape(-1)))
        self.served += 1
        logger.info("request %s: %d queries, generation %s, %.1f ms", req.id[:12], req.n, gen,
                    1000 * (self.clock() - req.t0))

    def queued_by(self, name: str) -> int:
        with self.lock:
            return self.per_client.get(name, 0)


def _id_and_two_ints(item: Any, what: str, shape: str) -> tuple[str, int, int]:
    """A link message's ``[id, int, int]`` (an announcement or a planned slot), or ValueError."""
    if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item[1:])):
        raise ValueError(f"{what} {str(item)[:80]!r} is not {shape}")
    return item[0], item[1], item[2]


__all__ = ["MAX_D1", "MAX_PER_CLIENT", "MAX_QUERIES", "MAX_QUEUED", "REQUEST_TIMEOUT", "Request", "RequestTable",
           "Slot"]
